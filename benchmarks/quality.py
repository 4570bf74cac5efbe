"""Quality vs trainable parameters: every method on the same data, schedule and evaluation.

all-MiniLM-L6-v2 on the packaged tweets (balanced binary sentiment, 2,000 train / 500 eval),
adapters on all six Linear types of every layer, AdamW, linear schedule with 6% warm-up, the
same learning rate for every method (`--lr`; 1e-3 for adapters, 5e-5 for full fine-tuning).

Budgets are plain LoRA ranks r on those modules (r=1: 41.5k adapter parameters, 0.18% of the
model; r=2: 0.37%; r=6: 1.1%). Methods matched to a budget: stock PEFT LoRA, DoRA and AdaLoRA
(init 1.5r, target r), dynarank ElaLoRA (total rank conserved at r per matrix) and AdaLoRA-style
(physical pruning from 1.5r to r). ARD-LoRA has no budget knob (its l1 strength sets the size),
so it runs at r0 = 2r and the default strength, and the table reports the parameters it chose.

    python benchmarks/quality.py --quick    # one budget (r=2), one seed, 60 steps: about 8 minutes
    python benchmarks/quality.py            # r = 1, 2, 6; 3 seeds; 2 epochs (126 steps): hours on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from dynarank.data import packaged_sentiment  # noqa: E402
from dynarank.loop import ALL_METHODS, TrainSpec, train_classifier  # noqa: E402
from dynarank.models import load_classifier, packaged_minilm_path  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODEL_PARAMS = 22_713_216  # all-MiniLM-L6-v2 encoder (its sentence-embedding parameters)
METHODS = ["full", "lora", "dora", "adalora", "elalora", "adalora-physical", "ard"]


def run_one(method: str, r: int, seed: int, steps: int | None, lr: float, train, held) -> dict:
    model, tokenizer = load_classifier(packaged_minilm_path(), train.label_names)
    spec = TrainSpec(
        method=method,
        r=2 * r if method == "ard" else r,
        lr=5e-5 if method == "full" else lr,
        max_steps=steps,
        seed=seed,
    )
    t0 = time.perf_counter()
    result = train_classifier(model, tokenizer, train, spec, eval_set=held)
    result.pop("controller")
    trained = result.pop("model")
    head = sum(p.numel() for n, p in trained.named_parameters() if p.requires_grad and "classifier" in n)
    row = {k: v for k, v in result.items() if k not in ("ranks", "warnings")}
    row.update(
        budget_r=r,
        wall=time.perf_counter() - t0,
        head_parameters=head,
        adapter_parameters=result.get("adapter_parameters", result["trainable_parameters"] - head),
    )
    return row


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    keys = sorted({(r["budget_r"], r["method"]) for r in rows}, key=lambda k: (k[0], METHODS.index(k[1])))
    for budget, method in keys:
        runs = [r for r in rows if r["budget_r"] == budget and r["method"] == method]
        acc = [r["eval"]["accuracy"] for r in runs]
        f1 = [r["eval"]["macro_f1"] for r in runs]
        table.append(
            {
                "budget (LoRA r)": budget,
                "method": method,
                "seeds": len(runs),
                "accuracy": statistics.mean(acc),
                "accuracy std": statistics.pstdev(acc),
                "macro_f1": statistics.mean(f1),
                "adapter params": statistics.mean(r["adapter_parameters"] for r in runs),
                "params % of model": 100 * statistics.mean(r["adapter_parameters"] for r in runs) / MODEL_PARAMS,
                "state bytes start": statistics.mean(r["state_bytes_start"] for r in runs),
                "state bytes end": statistics.mean(r["state_bytes_end"] for r in runs),
                "s/step": statistics.mean(r["seconds_per_step"] for r in runs),
            }
        )
    return table


def markdown(table: list[dict], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| budget (LoRA r) | method | seeds | accuracy (mean ± std) | macro-F1 | adapter params (% of model) | "
        "params + optimizer state, start -> end | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['budget (LoRA r)']} | {row['method']} | {row['seeds']} | {row['accuracy']:.4f} ± "
            f"{row['accuracy std']:.4f} | {row['macro_f1']:.4f} | {row['adapter params']:,.0f} "
            f"({row['params % of model']:.2f}%) | {row['state bytes start'] / 1e6:.2f} MB -> "
            f"{row['state bytes end'] / 1e6:.2f} MB | {row['s/step']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def pareto_plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        pts = sorted((r["adapter params"], r["accuracy"]) for r in table if r["method"] == method)
        if pts:
            ax.plot([p for p, _ in pts], [a for _, a in pts], marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (log)")
    ax.set_ylabel("accuracy (eval)")
    ax.set_title("all-MiniLM-L6-v2, tweets: quality vs parameters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one budget (r=2), one seed, 60 steps")
    parser.add_argument("--budgets", type=int, nargs="+", help="LoRA ranks that define the budgets")
    parser.add_argument("--seeds", type=int, help="seeds per (method, budget)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: 2 epochs = 126)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=[m for m in ALL_METHODS if m in METHODS])
    parser.add_argument("--lr", type=float, default=1e-3, help="adapter learning rate (the same for every method)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args()
    budgets = args.budgets or ([2] if args.quick else [1, 2, 6])
    seeds = args.seeds or (1 if args.quick else 3)
    steps = args.steps or (60 if args.quick else None)
    torch.set_num_threads(2)
    train, held = packaged_sentiment(2000, 500, seed=0)
    rows = []
    for seed in range(seeds):
        for r in budgets:
            for method in args.methods:
                if method == "full" and r != budgets[0]:
                    continue  # full fine-tuning has no budget: run it once per seed
                row = run_one(method, r, seed, steps, args.lr, train, held)
                rows.append(row)
                print(
                    f"r={r} seed={seed} {method:17s} acc {row['eval']['accuracy']:.4f} "
                    f"params {row['adapter_parameters']:,} {row['seconds_per_step']:.2f} s/step",
                    flush=True,
                )
    table = summarise(rows)
    command = "python benchmarks/quality.py " + ("--quick" if args.quick else f"--seeds {seeds}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quality_quick" if args.quick else "quality"
    (args.out / f"{stem}.json").write_text(json.dumps({"command": command, "runs": rows, "table": table}, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(table, command))
    pareto_plot(table, args.out / f"{stem}.png")
    print(markdown(table, command))
    print(f"results: {args.out / (stem + '.md')}")


if __name__ == "__main__":
    main()
