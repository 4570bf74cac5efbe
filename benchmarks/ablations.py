"""The ablations the ARD-LoRA paper proposes, on the planted-rank task (where the right ranks are known).

1. lambda x beta grid (relative strength x TV weight): loss / oracle and parameters / oracle;
2. l1 only (beta 0), TV only (lambda 0), both;
3. lr_alpha / lr_theta: the alphas' travel over the active phase (lr_alpha = travel / active steps)
   against the A/B learning rate, plus the paper's fixed 5e-5;
4. granularity: per head vs per matrix;
5. the TV term where ranks do oscillate: the paper's soft mask and round read-out, label noise 1.0,
   alpha travel 8 (a separate task draw), step-TV and anchor-TV at several beta, against the hard mask.

    python benchmarks/ablations.py            # 1 seed, about 2 minutes on 2 cores
    python benchmarks/ablations.py --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from dynarank import DynaRankConfig
from planted_task import make_planted_task, train_planted, within_one

RESULTS = Path(__file__).parent / "results"
BASE = {"method": "ard", "r": 8, "target_modules": ["query"], "head_layout": "own"}  # own A: the planted heads
LR_THETA = 3e-3


def _run(task, seed: int, oracle: dict, **overrides) -> dict:
    knobs = {k: v for k, v in {**BASE, **overrides}.items() if v is not None}  # None: the base's knob dropped
    out = train_planted(task, DynaRankConfig(**knobs), lr=LR_THETA, seed=seed)
    controller = out.pop("controller")
    return {
        "loss / oracle": out["mse"] / oracle["mse"],
        "params / oracle": out["params"] / oracle["params"],
        "within 1": within_one(out["ranks"], task.true_ranks),
        "rank changes": controller.rank_changes,
        "reversing groups": controller.motion.reversing_fraction(),
        "ranks": out["ranks"],
        "lr_alpha": controller.settings.lr_alpha,
    }


def experiments() -> dict[str, dict[str, dict]]:
    grid = {
        f"lambda={lam:g}, beta={beta:g}": {"ard_lambda": lam, "ard_beta": beta}
        for lam in (0.3, 1.0, 3.0, 10.0)
        for beta in (0.0, 0.1, 1.0, 10.0)
    }
    parts = {"l1 only (beta=0)": {"ard_beta": 0.0}, "TV only (lambda=0)": {"ard_lambda": 0.0}, "l1 + TV (defaults)": {}}
    ratio = {f"alpha travel {t:g}": {"alpha_travel": t} for t in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)}
    ratio["paper lr_alpha 5e-5"] = {"lr_alpha": 5e-5}
    granularity = {"per head": {}, "per matrix": {"granularity": "matrix", "head_layout": None}}  # no layout per matrix
    return {"lambda x beta": grid, "l1 / TV": parts, "lr_alpha / lr_theta": ratio, "granularity": granularity}


OSCILLATING = {"mask": "soft", "readout": "round", "alpha_travel": 8.0}  # the paper's relaxation, a fast alpha


def oscillation_experiments() -> dict[str, dict]:
    """TV forms where read-out ranks flip back and forth (run on a task with label noise 1.0)."""
    cases = {f"soft mask, step-TV beta={b:g}": {**OSCILLATING, "ard_beta": b} for b in (0.0, 10.0, 1000.0)}
    cases.update(
        {f"soft mask, anchor-TV beta={b:g}": {**OSCILLATING, "tv_form": "anchor", "ard_beta": b} for b in (1.0, 10.0)}
    )
    cases["hard mask (default), beta=0"] = {"alpha_travel": 8.0, "ard_beta": 0.0}
    return cases


def _oracle(task, seed: int) -> dict:
    """Per-head LoRA cut to the true ranks: the loss and size every ablation is measured against."""
    config = DynaRankConfig(method="dynarank-lora", r=8, target_modules=["query"])
    return train_planted(task, config, fixed_ranks=task.true_ranks, lr=LR_THETA, seed=seed)


def run(seeds: int) -> dict:
    results: dict[str, dict[str, list[dict]]] = {}
    for seed in range(seeds):
        task, noisy = make_planted_task(seed=seed, noise=0.1), make_planted_task(seed=seed, noise=1.0)
        on_task, on_noisy = (task, _oracle(task, seed)), (noisy, _oracle(noisy, seed))
        groups = {g: (on_task, cases) for g, cases in experiments().items()}
        groups["TV where ranks oscillate"] = (on_noisy, oscillation_experiments())
        for group, ((planted, oracle), cases) in groups.items():
            for name, overrides in cases.items():
                row = _run(planted, seed, oracle, **overrides)
                results.setdefault(group, {}).setdefault(name, []).append(row)
                print(
                    f"seed {seed} {group:20s} {name:28s} loss/oracle {row['loss / oracle']:.3f} "
                    f"params/oracle {row['params / oracle']:.2f} within1 {row['within 1']:.0%}",
                    flush=True,
                )
    return results


def mean(rows: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in rows)


def plots(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = results["lambda x beta"]
    lams, betas = (0.3, 1.0, 3.0, 10.0), (0.0, 0.1, 1.0, 10.0)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key in zip(axes, ("loss / oracle", "params / oracle")):
        values = [[mean(grid[f"lambda={lam:g}, beta={b:g}"], key) for b in betas] for lam in lams]
        image = ax.imshow(values, cmap="viridis", norm=matplotlib.colors.LogNorm())
        ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
        ax.set_yticks(range(len(lams)), [f"{lam:g}" for lam in lams])
        ax.set_xlabel("beta (TV weight)")
        ax.set_ylabel("lambda (relative strength)")
        ax.set_title(key)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "ablation_lambda_beta.png", dpi=100)
    plt.close(fig)
    for group, stem in (
        ("l1 / TV", "ablation_l1_tv"),
        ("lr_alpha / lr_theta", "ablation_lr_ratio"),
        ("granularity", "ablation_granularity"),
    ):
        names = list(results[group])
        fig, ax = plt.subplots(figsize=(7, 3.4))
        x = range(len(names))
        ax.bar(
            [i - 0.2 for i in x], [mean(results[group][n], "loss / oracle") for n in names], 0.4, label="loss / oracle"
        )
        ax.bar(
            [i + 0.2 for i in x],
            [mean(results[group][n], "params / oracle") for n in names],
            0.4,
            label="params / oracle",
        )
        ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"ARD-LoRA ablation: {group} (planted ranks)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=100)
        plt.close(fig)
    cases = results["TV where ranks oscillate"]
    names = list(cases)
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.bar(range(len(names)), [mean(cases[n], "rank changes") for n in names], color="tab:orange")
    for i, n in enumerate(names):
        ax.text(
            i,
            mean(cases[n], "rank changes"),
            f"{mean(cases[n], 'reversing groups'):.0%} rev.",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("read-out rank changes")
    ax.set_title("TV where ranks oscillate (soft mask, label noise 1.0, alpha travel 8)")
    fig.tight_layout()
    fig.savefig(out / "ablation_tv_oscillation.png", dpi=100)
    plt.close(fig)


def markdown(results: dict, command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for group, cases in results.items():
        lines += [
            f"### {group}",
            "",
            "| setting | loss / oracle | params / oracle | groups within 1 | rank changes | groups reversing twice |",
            "|---|---|---|---|---|---|",
        ]
        for name, rows in cases.items():
            lines.append(
                f"| {name} | {mean(rows, 'loss / oracle'):.3f} | {mean(rows, 'params / oracle'):.2f} | "
                f"{mean(rows, 'within 1'):.0%} | {mean(rows, 'rank changes'):.0f} | "
                f"{mean(rows, 'reversing groups'):.0%} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1, help="seeds (tasks and runs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = run(args.seeds)
    command = f"python benchmarks/ablations.py --seeds {args.seeds}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablations.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    (args.out / "ablations.md").write_text(markdown(results, command))
    plots(results, args.out)
    print(markdown(results, command))
    print(f"results: {args.out / 'ablations.md'}")


if __name__ == "__main__":
    main()
