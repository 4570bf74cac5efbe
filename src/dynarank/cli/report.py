"""Pictures of a run: training curves (every method), and for rank methods the final ranks as layers x heads
heatmaps and the ranks over training."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from ..files import RunFileError, naming
from ..naming import split_name
from .run_dir import RunDir

MAX_TICKS = 12  # tick labels per axis before they are thinned (every k-th layer or head)
MAX_ANNOTATED = 64  # cells per heatmap panel up to which each cell shows its rank as a number


def rank_grid(ranks: dict[str, list[int]]) -> dict[str, list[list[int]]]:
    """projection type -> rows (one per layer) of per-group ranks."""
    return {kind: [layers[i] for i in sorted(layers)] for kind, layers in _by_kind(ranks).items()}


def _by_kind(ranks: dict[str, list[int]]) -> dict[str, dict[int, list[int]]]:
    by_kind: dict[str, dict[int, list[int]]] = defaultdict(dict)
    for module, groups in ranks.items():
        layer, kind = split_name(module)
        by_kind[kind][layer if layer is not None else 0] = groups
    return by_kind


def draw(run: RunDir | str | Path) -> list[Path]:
    """(Re)draw the pictures of ``run`` from what it holds: training curves from its metrics log (every method),
    rank heatmap and rank evolution from its rank log (the rank methods). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = RunDir.of(run)
    metrics, snapshots = run.read_metrics(), run.read_ranks()
    if not metrics and not snapshots:
        raise FileNotFoundError(f"{run.path} has no {run.METRICS} or {run.RANKS}: nothing to draw.")
    panels = []  # (picture, how to draw it, from what, the log it comes from)
    if metrics:
        panels.append((run.CURVES, _curves, metrics, run.METRICS))
    if snapshots:
        panels.append((run.HEATMAP, _heatmap, snapshots[-1], run.RANKS))
        panels.append((run.EVOLUTION, _evolution, snapshots, run.RANKS))
    already_open = set(plt.get_fignums())
    written = []
    try:
        for name, panel, data, source in panels:
            try:
                figure = panel(plt, data)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                raise RunFileError(f"{run.file(source)} is damaged: cannot draw {name} from it ({exc!r}).") from None
            with naming(run.file(name)):
                figure.savefig(run.file(name), dpi=100)
            written.append(run.file(name))
    finally:  # every figure drawn here is closed, also those of a panel that failed half-way
        for number in set(plt.get_fignums()) - already_open:
            plt.close(number)
    return written


def _integer_ticks(axis, labels: list[int]) -> None:
    """Ticks at 0..n-1 labelled ``labels``, thinned to about MAX_TICKS."""
    step = max(1, math.ceil(len(labels) / MAX_TICKS))
    positions = list(range(0, len(labels), step))
    axis.set_ticks(positions, [str(labels[i]) for i in positions])


def _heatmap(plt, snapshot: dict):
    """One panel per projection type: layers down, heads across, colour = final rank."""
    from matplotlib.ticker import MaxNLocator

    by_kind = _by_kind(snapshot["ranks"])
    n_layers = max(len(layers) for layers in by_kind.values())
    rows = math.ceil(len(by_kind) / 4)
    cols = math.ceil(len(by_kind) / rows)
    height = max(2.4, 1.0 + 0.22 * n_layers)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols + 1.0, height * rows + 0.6), squeeze=False, layout="constrained"
    )
    vmax = max(1, max(max(g, default=0) for layers in by_kind.values() for g in layers.values()))
    image = None
    for index, (kind, layers) in enumerate(by_kind.items()):
        ax = axes[index // cols][index % cols]
        numbers = sorted(layers)
        width = max(len(layers[n]) for n in numbers)
        cells = [layers[n] + [math.nan] * (width - len(layers[n])) for n in numbers]
        image = ax.imshow(cells, cmap="viridis", vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(kind, fontsize=9)
        _integer_ticks(ax.yaxis, numbers)
        _integer_ticks(ax.xaxis, list(range(width)))
        ax.tick_params(labelsize=8)
        ax.set_xlabel("head" if width > 1 else "whole matrix", fontsize=8)
        if index % cols == 0:
            ax.set_ylabel("layer", fontsize=8)
        if len(numbers) * width <= MAX_ANNOTATED:
            for y, row in enumerate(cells):
                for x, value in enumerate(row):
                    if not math.isnan(value):
                        colour = "black" if value > 0.6 * vmax else "white"
                        ax.text(x, y, str(int(value)), ha="center", va="center", fontsize=7, color=colour)
    for ax in axes.flat[len(by_kind) :]:
        fig.delaxes(ax)
    bar = fig.colorbar(image, ax=list(axes.flat[: len(by_kind)]), shrink=0.8)
    bar.set_label("final rank")
    bar.locator = MaxNLocator(integer=True)
    bar.update_ticks()
    fig.suptitle(f"final ranks (step {snapshot['step']})")
    return fig


def _evolution(plt, snapshots: list[dict]):
    """The total rank of every layer over training (trainable parameters are in the training curves)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    per_layer: dict[int, list[float]] = defaultdict(list)
    for snap in snapshots:
        totals: dict[int, int] = defaultdict(int)
        for module, groups in snap["ranks"].items():
            totals[split_name(module)[0] or 0] += sum(groups)
        for layer, total in totals.items():
            per_layer[layer].append(total)
    xs = [s["step"] for s in snapshots]
    colours = plt.get_cmap("viridis")
    for i, layer in enumerate(sorted(per_layer)):
        ax.plot(xs, per_layer[layer], marker=".", label=f"layer {layer}", color=colours(i / max(1, len(per_layer))))
    ax.set_ylabel("total rank of the layer")
    if len(per_layer) <= 16:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.set_title("dark: first layers, light: last", fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


def _curves(plt, metrics: list[dict]):
    """Training loss (and held-out metrics logged while training), and trainable parameters, per step."""
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
    steps = [m for m in metrics if m.get("loss") is not None]
    left.plot([m["step"] for m in steps], [m["loss"] for m in steps], label="training loss")
    left.set_ylabel("training loss")
    evals = [m for m in metrics if isinstance(m.get("eval"), dict) and m["eval"]]
    if evals:
        key = next(iter(evals[-1]["eval"]))
        held = left.twinx()
        held.plot([m["step"] for m in evals], [m["eval"].get(key) for m in evals], "o--", color="tab:orange")
        held.set_ylabel(f"held-out {key}", color="tab:orange")
    logged = [m for m in metrics if m.get("trainable_parameters") is not None]
    right.plot([m["step"] for m in logged], [m["trainable_parameters"] for m in logged])
    right.set_ylabel("trainable parameters")
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig
