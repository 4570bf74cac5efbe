"""ARD-LoRA on planted rank patterns it was never tuned on.

The planted-rank task (planted_task.py) was the one pattern the ARD defaults were developed on: 8 heads of 16,
d_in 64, ranks [0, 1, 2, 4, 8, 0, 3, 6], unit singular values. Here every pattern is drawn at random from a seed
of its own: the number of heads (4-12), the head size (8-32), the input width (32-128), each head's true rank
(0 to min(8, head size), about a quarter of the heads at 0) and singular values that fall geometrically from 1
to 1/spread over a head's rank (spread 1-8: the small directions are hard to tell from noise). ARD runs with its
defaults (r0 = 8, no budget) but for the head layout: each head has its own A rows (head_layout='own'), as the
planted heads read independent input directions; the oracle is per-head LoRA cut to the true ranks; reported per
pattern: heads within 1 of the truth, exact patterns, loss / oracle, parameters / oracle, and the share of the
planted change the adapter learned, 1 - ||delta_learned - delta_true||^2 / ||delta_true||^2.

    python benchmarks/planted_patterns.py --seeds 2          # 8 patterns x 2 seeds, a few minutes
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dynarank import DynaRankConfig, elastic_layers  # noqa: E402
from planted_task import make_planted_task, train_planted, within_one  # noqa: E402

RESULTS = Path(__file__).parent / "results"
R0 = 8


def draw_pattern(index: int) -> dict:
    """Pattern ``index``: its shapes, true ranks and singular-value spread (deterministic, not tuned on)."""
    rng = random.Random(1000 + index)
    n_heads = rng.choice([4, 6, 8, 12])
    head_size = rng.choice([8, 16, 32])
    d_in = rng.choice([32, 64, 128])
    top = min(R0, head_size)
    ranks = [0 if rng.random() < 0.25 else rng.randint(1, top) for _ in range(n_heads)]
    return {"true_ranks": ranks, "head_size": head_size, "d_in": d_in, "spread": rng.choice([1.0, 2.0, 4.0, 8.0])}


def learned_share(model, task) -> float:
    """1 - ||delta_learned - delta_true||^2 / ||delta_true||^2 of the adapted projection."""
    layer = elastic_layers(model)["query"]
    with torch.no_grad():
        learned = layer.delta_weight().float()
    true = task.teacher_weight - task.base_weight
    return float(1 - (learned - true).pow(2).sum() / true.pow(2).sum())


def run_pattern(pattern: dict, seed: int, steps: int, lr: float) -> dict:
    task = make_planted_task(seed=seed, noise=0.1, **pattern)
    config = {"r": R0, "target_modules": ["query"], "seed": seed}
    own = {"head_layout": "own"}  # ARD: the planted heads read independent input directions (own A rows)
    out = {}
    for name, method, fixed in (("oracle", "dynarank-lora", task.true_ranks), ("ard", "ard", None)):
        torch.manual_seed(seed)
        result = train_planted(
            task,
            DynaRankConfig(method=method, **config, **(own if method == "ard" else {})),
            steps=steps,
            lr=lr,
            seed=seed,
            fixed_ranks=fixed,
        )
        model = result["controller"].model
        out[name] = {
            "mse": result["mse"],
            "ranks": result["ranks"],
            "params": result["params"],
            "learned_share": learned_share(model, task),
        }
    ard, oracle = out["ard"], out["oracle"]
    return {
        **pattern,
        "seed": seed,
        "ard_ranks": ard["ranks"],
        "within_one": within_one(ard["ranks"], task.true_ranks),
        "exact": ard["ranks"] == list(task.true_ranks),
        "loss_over_oracle": ard["mse"] / oracle["mse"],
        "params_over_oracle": ard["params"] / max(1, oracle["params"]),
        "learned_share": ard["learned_share"],
        "oracle_learned_share": oracle["learned_share"],
    }


def markdown(runs: list[dict], command: str) -> str:
    lines = [
        "# ARD-LoRA on planted patterns it was not tuned on",
        "",
        f"Command: `{command}`",
        "",
        "| pattern | heads x size, d_in | true ranks | spread | within 1 (mean over seeds) | exact | loss / oracle "
        "| params / oracle | change learned (ARD / oracle) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_pattern: dict[int, list[dict]] = {}
    for r in runs:
        by_pattern.setdefault(r["pattern"], []).append(r)
    for index, group in sorted(by_pattern.items()):
        p = group[0]

        def mean(key: str, group: list[dict] = group) -> float:
            return statistics.mean(g[key] for g in group)

        lines.append(
            f"| {index} | {len(p['true_ranks'])} x {p['head_size']}, {p['d_in']} | {p['true_ranks']} | {p['spread']:g} "
            f"| {100 * mean('within_one'):.0f}% | {sum(g['exact'] for g in group)} of {len(group)} "
            f"| {mean('loss_over_oracle'):.3f} | {mean('params_over_oracle'):.2f} "
            f"| {mean('learned_share'):.3f} / {mean('oracle_learned_share'):.3f} |"
        )
    within = statistics.mean(r["within_one"] for r in runs)
    lines += ["", f"Over every pattern and seed: {100 * within:.0f}% of heads within 1 of their true rank."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for index in range(args.patterns):
        pattern = draw_pattern(index)
        for seed in range(args.seeds):
            run = {"pattern": index, **run_pattern(pattern, seed, args.steps, args.lr)}
            runs.append(run)
            print(f"pattern {index} seed {seed}: true {run['true_ranks']} ard {run['ard_ranks']}", flush=True)
    command = (
        f"python benchmarks/planted_patterns.py --patterns {args.patterns} --seeds {args.seeds} --steps {args.steps} "
        f"--lr {args.lr}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "planted_patterns.json").write_text(json.dumps({"command": command, "runs": runs}, indent=1))
    text = markdown(runs, command)
    (args.out / "planted_patterns.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
