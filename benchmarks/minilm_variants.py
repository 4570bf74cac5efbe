"""ARD-LoRA variants against plain LoRA at equal parameters on a real model (MiniLM, packaged tweets).

Balanced binary sentiment (2,000 train / 500 eval), 2 epochs (126 steps) of batch 32, lr 1e-3,
adapters on all six Linear types of every layer. Plain LoRA is stock PEFT; the ARD variants differ
in head layout (own / shared A), granularity, r0 and l1 strength. Every run appends one JSON line
to results/minilm_variants.jsonl; the table and plot are redrawn from it (`--table-only`).

    python benchmarks/minilm_variants.py --configs lora-r4 ard-matrix-r4 --seeds 0 1 2 --threads 1
    python benchmarks/minilm_variants.py --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from dynarank.training.data import packaged_sentiment  # noqa: E402
from dynarank.training.loop import TrainSpec, train_classifier  # noqa: E402
from dynarank.training.models import load_classifier, packaged_minilm_path  # noqa: E402
from records import PROJECTIONS, projection  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STEM = "minilm_variants"
CONFIGS: dict[str, dict] = {
    "lora-r1": {"method": "lora", "r": 1},
    "lora-r2": {"method": "lora", "r": 2},
    "lora-r4": {"method": "lora", "r": 4},
    "lora-r8": {"method": "lora", "r": 8},
    "ard-own-r2": {"method": "ard", "r": 2, "dynarank": {"head_layout": "own"}},
    "ard-shared-r4": {"method": "ard", "r": 4, "dynarank": {"head_layout": "shared"}},
    "ard-shared-r4-s3": {"method": "ard", "r": 4, "dynarank": {"head_layout": "shared", "ard_lambda": 3.0}},
    "ard-shared-r4-s10": {"method": "ard", "r": 4, "dynarank": {"head_layout": "shared", "ard_lambda": 10.0}},
    "ard-shared-r8-s3": {"method": "ard", "r": 8, "dynarank": {"head_layout": "shared", "ard_lambda": 3.0}},
    "ard-matrix-r4": {"method": "ard", "r": 4, "dynarank": {"granularity": "matrix"}},
    "ard-matrix-r4-s3": {"method": "ard", "r": 4, "dynarank": {"granularity": "matrix", "ard_lambda": 3.0}},
}
KINDS = PROJECTIONS


def run(name: str, seed: int, out: Path) -> dict:
    train, held = packaged_sentiment(2000, 500, seed=0)
    model, tokenizer = load_classifier(packaged_minilm_path(), train.label_names)
    cfg = CONFIGS[name]
    spec = TrainSpec(method=cfg["method"], r=cfg["r"], seed=seed, dynarank=dict(cfg.get("dynarank", {})))
    done = train_classifier(model, tokenizer, train, spec, eval_set=held)
    trained, result = done.model, done.metrics
    head = sum(p.numel() for n, p in trained.named_parameters() if p.requires_grad and "classifier" in n)
    by_kind: dict[str, list[int]] = {}
    for module, groups in (result.pop("ranks", None) or {}).items():
        by_kind.setdefault(projection(module), []).extend(groups)
    row = {
        "config": name,
        "seed": seed,
        "accuracy": result["eval"]["accuracy"],
        "macro_f1": result["eval"]["macro_f1"],
        "adapter_parameters": result.get("adapter_parameters", result["trainable_parameters"] - head),
        "mean_rank": {k: statistics.mean(v) for k, v in by_kind.items()},
        "state_bytes_start": result["state_bytes_start"],
        "state_bytes_end": result["state_bytes_end"],
        "seconds_per_step": result["seconds_per_step"],
        "warnings": result.get("warnings", []),
    }
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def table(rows: list[dict]) -> str:
    lines = [
        "| config | settings | seeds | accuracy (mean ± std) | macro-F1 | adapter params | "
        "mean final rank q / k / v / attn-out / ffn-in / ffn-out | params+state start -> end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in (n for n in CONFIGS if any(r["config"] == n for r in rows)):
        runs = [r for r in rows if r["config"] == name]
        acc = [r["accuracy"] for r in runs]
        with_ranks = [r for r in runs if r["mean_rank"]]
        ranks = (
            " / ".join(f"{statistics.mean(r['mean_rank'][k] for r in with_ranks):.1f}" for k in KINDS)
            if with_ranks
            else "-"
        )
        f1, start, end = _mean(runs, "macro_f1"), _mean(runs, "state_bytes_start"), _mean(runs, "state_bytes_end")
        settings = json.dumps({k: v for k, v in CONFIGS[name].items() if k != "method"})
        lines.append(
            f"| {name} | {settings} | {len(runs)} | {statistics.mean(acc):.4f} ± {statistics.pstdev(acc):.4f} | "
            f"{f'{f1:.4f}' if f1 is not None else '-'} | {statistics.mean(r['adapter_parameters'] for r in runs):,.0f}"
            f" | {ranks} | {f'{start / 1e6:.2f} -> {end / 1e6:.2f} MB' if start else '-'} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lora = sorted(
        (
            statistics.mean(r["adapter_parameters"] for r in rows if r["config"] == n),
            statistics.mean(r["accuracy"] for r in rows if r["config"] == n),
        )
        for n in CONFIGS
        if n.startswith("lora") and any(r["config"] == n for r in rows)
    )
    ax.plot([p for p, _ in lora], [a for _, a in lora], "k--", lw=1, label="stock PEFT LoRA r=1,2,4,8")
    for name in CONFIGS:
        runs = [r for r in rows if r["config"] == name]
        if runs:
            ax.errorbar(
                statistics.mean(r["adapter_parameters"] for r in runs),
                statistics.mean(r["accuracy"] for r in runs),
                yerr=statistics.pstdev(r["accuracy"] for r in runs) or None,
                marker="s" if name.startswith("lora") else "o",
                ls="none",
                capsize=3,
                label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})",
            )
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters at the end of training (log)")
    ax.set_ylabel("accuracy")
    ax.set_title("MiniLM / tweets: ARD-LoRA variants vs plain LoRA")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["lora-r2", "lora-r4", "ard-matrix-r4"], choices=list(CONFIGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table-only", action="store_true", help="redraw the table from the results file")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs_file = args.out / f"{STEM}.jsonl"
    if not args.table_only:
        torch.set_num_threads(args.threads)
        for seed in args.seeds:
            for name in args.configs:
                row = run(name, seed, runs_file)
                print(
                    f"{name:20s} seed {seed} acc {row['accuracy']:.4f} params {row['adapter_parameters']:,}", flush=True
                )
    rows = [json.loads(line) for line in runs_file.read_text().splitlines() if line.strip()]
    text = (
        f"Runs: `python benchmarks/{STEM}.py --configs ... --seeds ... --threads 1` (one JSON line per run in "
        f"{STEM}.jsonl; seed-0 rows marked 'source' were restored from the run logs, without macro-F1); "
        f"table: `python benchmarks/{STEM}.py --table-only`\n\n" + table(rows)
    )
    (args.out / f"{STEM}.md").write_text(text)
    plot(rows, args.out / f"{STEM}.png")
    print(text)


if __name__ == "__main__":
    main()
