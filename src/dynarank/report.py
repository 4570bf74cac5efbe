"""Pictures of a run: final ranks as layers x heads heatmaps, parameters and ranks over training."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

HEATMAP = "ranks_heatmap.png"
EVOLUTION = "ranks_over_time.png"


def split_name(module: str) -> tuple[int | None, str]:
    """('bert.encoder.layer.3.attention.self.query') -> (3, 'attention.self.query')."""
    match = re.search(r"\.(\d+)\.(.+)$", module)
    if match is None:
        return None, module
    return int(match.group(1)), match.group(2)


def rank_grid(ranks: dict[str, list[int]]) -> dict[str, list[list[int]]]:
    """projection type -> rows (one per layer) of per-group ranks."""
    by_kind: dict[str, dict[int, list[int]]] = defaultdict(dict)
    for module, groups in ranks.items():
        layer, kind = split_name(module)
        by_kind[kind][layer if layer is not None else 0] = groups
    return {kind: [layers[i] for i in sorted(layers)] for kind, layers in by_kind.items()}


def draw(run_dir: str | Path) -> list[Path]:
    """(Re)draw the pictures of ``run_dir`` from its ranks.jsonl / metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    ranks_file = run_dir / "ranks.jsonl"
    if not ranks_file.is_file():
        raise FileNotFoundError(f"{run_dir} has no ranks.jsonl: is it a dynarank run directory?")
    snapshots = [json.loads(line) for line in ranks_file.read_text().splitlines() if line.strip()]
    written = []
    grid = rank_grid(snapshots[-1]["ranks"])
    fig, axes = plt.subplots(1, len(grid), figsize=(3.2 * len(grid), 3.2), squeeze=False)
    vmax = max((max(max(row, default=0) for row in rows) for rows in grid.values()), default=1)
    for ax, (kind, rows) in zip(axes[0], grid.items()):
        width = max(len(r) for r in rows)
        padded = [r + [float("nan")] * (width - len(r)) for r in rows]
        image = ax.imshow(padded, cmap="viridis", vmin=0, vmax=max(vmax, 1), aspect="auto")
        ax.set_title(kind, fontsize=8)
        ax.set_xlabel("head" if width > 1 else "matrix")
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="final rank")
    fig.suptitle(f"final ranks (step {snapshots[-1]['step']})")
    fig.savefig(run_dir / HEATMAP, dpi=100)
    plt.close(fig)
    written.append(run_dir / HEATMAP)

    metrics_file = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [m["step"] for m in metrics if "trainable_parameters" in m]
    left.plot(steps, [m["trainable_parameters"] for m in metrics if "trainable_parameters" in m])
    left.set_xlabel("optimizer step")
    left.set_ylabel("trainable parameters")
    per_layer: dict[int, list[float]] = defaultdict(list)
    for snap in snapshots:
        totals: dict[int, int] = defaultdict(int)
        for module, groups in snap["ranks"].items():
            totals[split_name(module)[0] or 0] += sum(groups)
        for layer, total in totals.items():
            per_layer[layer].append(total)
    xs = [s["step"] for s in snapshots]
    for layer in sorted(per_layer):
        right.plot(xs, per_layer[layer], marker=".", label=f"layer {layer}")
    right.set_xlabel("optimizer step")
    right.set_ylabel("total rank of the layer")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(run_dir / EVOLUTION, dpi=100)
    plt.close(fig)
    written.append(run_dir / EVOLUTION)
    return written
