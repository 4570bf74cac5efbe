"""Planted-rank oracle: does a method find the per-head ranks that are known to be right?

Task (planted_task.py): frozen random base (d_in 64, 8 heads of 16), teacher = base + planted
per-head changes of ranks [0,1,2,4,8,0,3,6], label noise 0.1, MSE, 2,000 steps, batch 64.
Every method is compared with the oracle (per-head LoRA cut to the true ranks) and with plain
LoRA at the same trainable parameters as the oracle (per head: rank 3 = 1,920 params; per matrix:
rank 10 = 1,920 params).

    python benchmarks/planted_rank.py            # 3 seeds, about 2 minutes on 2 cores
    python benchmarks/planted_rank.py --seeds 1  # quick
"""

from __future__ import annotations

import statistics
import time

from dynarank import DynaRankConfig
from planted_task import make_planted_task, study_main, train_planted, within_one

TARGET = ["query"]


def methods() -> dict[str, dict]:
    """name -> keyword arguments of DynaRankConfig (plus 'lr' / 'fixed' for the run)."""
    # The planted heads read independent input directions, which shared A rows cannot span: ARD with each head's
    # own A rows (head_layout='own'; the library's default, 'shared', is the row "ARD shared A").
    ard = {"method": "ard", "r": 8, "target_modules": TARGET, "head_layout": "own"}
    return {
        "oracle (true ranks)": {"method": "dynarank-lora", "r": 8, "target_modules": TARGET, "fixed": "truth"},
        "LoRA per head r=3": {"method": "dynarank-lora", "r": 3, "target_modules": TARGET},
        "LoRA per matrix r=10": {"method": "dynarank-lora", "r": 10, "target_modules": TARGET, "granularity": "matrix"},
        "ARD own A": dict(ard),
        "ARD floor 1": dict(ard, rank_floor=1),
        "ARD shared A (default layout)": dict(ard, head_layout="shared"),
        "ARD paper preset (lr 1e-4)": dict(ard, preset="paper", lr=None),
        "ARD paper preset, lr 3e-3": dict(ard, preset="paper"),
        "ARD lambda_mode=gradient": dict(ard, lambda_mode="gradient"),
        # Ablations the paper proposes (l1 / TV) and the two TV forms.
        "ablation: l1 only (beta=0)": dict(ard, ard_beta=0.0),
        "ablation: TV only (lambda=0)": dict(ard, ard_lambda=0.0),
        "ablation: tv_form=step, beta=0.1": dict(ard, tv_form="step"),
        "ablation: tv_form=step, beta=10": dict(ard, tv_form="step", ard_beta=10.0),
        "ablation: tv_form=anchor, beta=10": dict(ard, tv_form="anchor", ard_beta=10.0),
    }


def run(seeds: int, steps: int, lr: float) -> dict:
    rows: dict[str, list[dict]] = {}
    for seed in range(seeds):
        task = make_planted_task(seed=seed, noise=0.1)
        for name, spec in methods().items():
            spec = dict(spec)
            fixed = task.true_ranks if spec.pop("fixed", None) == "truth" else None
            run_lr = spec.pop("lr", lr)
            t0 = time.perf_counter()
            out = train_planted(task, DynaRankConfig(**spec), steps=steps, lr=run_lr, seed=seed, fixed_ranks=fixed)
            controller = out.pop("controller")
            rows.setdefault(name, []).append(
                {
                    "seed": seed,
                    "mse": out["mse"],
                    "ranks": out["ranks"],
                    "params": out["params"],
                    "within_one": within_one(out["ranks"], task.true_ranks),
                    "exact": out["ranks"] == list(task.true_ranks),
                    "rank_changes": getattr(controller, "rank_changes", 0),
                    "warnings": out["warnings"],
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(f"seed {seed} {name:38s} mse {out['mse']:.4g} ranks {out['ranks']} params {out['params']}")
    return rows


def summarise(rows: dict[str, list[dict]]) -> list[dict]:
    oracle = rows["oracle (true ranks)"]
    table = []
    for name, runs in rows.items():
        rel_loss = [r["mse"] / o["mse"] for r, o in zip(runs, oracle)]
        rel_params = [r["params"] / o["params"] for r, o in zip(runs, oracle)]
        table.append(
            {
                "method": name,
                "loss / oracle": statistics.mean(rel_loss),
                "loss / oracle (max)": max(rel_loss),
                "params / oracle": statistics.mean(rel_params),
                "within 1 (min over seeds)": min(r["within_one"] for r in runs),
                "exact seeds": sum(r["exact"] for r in runs),
                "rank changes": statistics.mean(r["rank_changes"] for r in runs),
                "final ranks (seed 0)": runs[0]["ranks"],
            }
        )
    return table


def markdown(table: list[dict], seeds: int, command: str) -> str:
    head = (
        "| method | loss / oracle (mean, max) | params / oracle | groups within 1 (worst seed) | "
        f"exact in seeds (of {seeds}) | read-out rank changes | final ranks, seed 0 |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for row in table:
        lines.append(
            f"| {row['method']} | {row['loss / oracle']:.3f}, {row['loss / oracle (max)']:.3f} | "
            f"{row['params / oracle']:.2f} | {row['within 1 (min over seeds)']:.0%} | {row['exact seeds']} | "
            f"{row['rank changes']:.0f} | {row['final ranks (seed 0)']} |"
        )
    return f"Command: `{command}`\n\nTrue ranks: [0, 1, 2, 4, 8, 0, 3, 6]\n\n" + "\n".join(lines) + "\n"


if __name__ == "__main__":
    study_main("planted_rank", __doc__, run, summarise, markdown)
