"""Defaults on a data set the defaults study never saw, trained as a new user would: `dynarank train`, no tuning flag.

The data: which packaged chatterbot-corpus category an utterance comes from, over five categories that the Italian and
Spanish files share (emotion, psychology, ai, conversations, greetings: `emotion` + `emociones`, ...), every distinct
utterance once (one found in two categories is left out); 60% / 20% / 20% train / validation / test, shuffled with
seed 0 (853 / 284 / 284 of 1,421). MiniLM
reads Italian and Spanish poorly: a hard, small classification task, unlike the study's (English tweets and topics).

Runs, all through the CLI on the packaged MiniLM (its default targets), batch 16, 2 epochs (108 steps), length 32:

* dynarank's rank methods with their defaults only, held to plain LoRA r=2's adapter parameters (`--target-params`,
  no `--r`, no `--lr`): `ard`, `elalora`, `adalora-physical`;
* ARD also with `--lr auto` (the range test around its default rate on the training data, before training);
* stock PEFT LoRA r=2 and stock AdaLoRA (target r=2), each TUNED: its rate chosen on the validation split over
  1e-3 / 3e-3 / 1e-2 / 3e-2 (seed 0), then trained at that rate;
* every run of the comparison trained on the training split and scored on the test split, seeds 0-2, paired by seed.

    python benchmarks/fresh_data.py                    # 3 seeds (about 25 minutes on 2 cores)
    python benchmarks/fresh_data.py --seeds 0 --quick  # a look: one seed, no tuning (each baseline at its default)

Writes results/fresh_data.json and .md (runs are kept under results/fresh_data_runs/ while the script runs and
resumed from there; delete it to run again).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

from records import machine_info

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CATEGORIES = {  # label: the (language, file) pairs that hold it
    "emotion": [("italian", "emotion"), ("spanish", "emociones")],
    "psychology": [("italian", "psychology"), ("spanish", "psicologia")],
    "ai": [("italian", "ai"), ("spanish", "IA")],
    "conversations": [("italian", "conversations"), ("spanish", "conversations")],
    "greetings": [("italian", "greetings"), ("spanish", "greetings")],
}
RATES = [1e-3, 3e-3, 1e-2, 3e-2]
OURS = ["ard", "elalora", "adalora-physical"]
SEARCHED = {"ard+auto": "ard"}  # also with --lr auto (its range test around the default, on the training data)
BASELINES = ["lora", "adalora"]
BUDGET_RANK = 2
COMMON = ["--batch-size", "16", "--epochs", "2", "--max-length", "32"]


def build_data(folder: Path) -> dict[str, int]:
    """train.csv, val.csv, test.csv in ``folder``; returns the sizes."""
    import importlib.util

    import yaml

    corpus = Path(list(importlib.util.find_spec("chatterbot_corpus").submodule_search_locations)[0]) / "data"
    labels_of: dict[str, set[str]] = {}  # every distinct utterance, and the categories it appears in
    for label, files in CATEGORIES.items():
        for language, name in files:
            data = yaml.safe_load((corpus / language / f"{name}.yml").read_text(encoding="utf-8")) or {}
            for turns in data.get("conversations") or []:
                for turn in turns:
                    text = str(turn).strip() if turn is not None else ""
                    if text:
                        labels_of.setdefault(text, set()).add(label)
    # an utterance found in two categories has no one label: left out
    rows = [(text, labels.pop()) for text, labels in labels_of.items() if len(labels) == 1]
    random.Random(0).shuffle(rows)
    n_val = n_test = round(0.2 * len(rows))
    parts = {"train": rows[: -n_val - n_test], "val": rows[-n_val - n_test : -n_test], "test": rows[-n_test:]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        with (folder / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(part)
    return {name: len(part) for name, part in parts.items()}


def budget() -> int:
    """Plain LoRA r=2's adapter parameters on MiniLM's default targets (what `--target-params` holds the methods to)."""
    from dynarank.training.estimate import lora_parameters
    from dynarank.training.loop import default_target_modules
    from dynarank.training.models import load_classifier, packaged_minilm_path

    model, _ = load_classifier(packaged_minilm_path(), ["0", "1"])
    return lora_parameters(model, default_target_modules(model), BUDGET_RANK)


def train(runs: Path, data: Path, name: str, args: list[str]) -> dict:
    """One `dynarank train` run (resumed from its summary when it exists); returns its summary."""
    out = runs / name
    if not (out / "summary.json").exists():
        if out.exists():
            import shutil

            shutil.rmtree(out)  # a run stopped before its summary: trained again from the start
        command = [sys.executable, "-m", "dynarank.cli", "train", "--data", str(data / "train.csv"), *COMMON, *args]
        subprocess.run([*command, "--out", str(out)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads((out / "summary.json").read_text())


def tuned_rate(runs: Path, data: Path, method: str, quick: bool) -> tuple[float | None, dict]:
    """The baseline's rate with the best validation accuracy over RATES (seed 0); None in --quick (its default)."""
    if quick:
        return None, {}
    scores = {}
    for lr in RATES:
        summary = train(
            runs, data, f"{method}-val-{lr:g}", _rank(method) + ["--eval-data", str(data / "val.csv"), "--lr", str(lr)]
        )
        scores[lr] = summary["eval"]["accuracy"]
    return max(scores, key=lambda lr: (scores[lr], -lr)), scores


def _rank(method: str) -> list[str]:
    return ["--method", method, "--r", str(BUDGET_RANK)]


def paired(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """Mean of the per-seed differences a - b and its standard error (None with one seed)."""
    diffs = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return statistics.fmean(diffs), se


def _pm(mean: float, se: float | None) -> str:
    return f"{mean:+.3f}" + (f" ± {se:.3f}" if se is not None else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="no rate tuning: each baseline at its default rate")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    stem = "fresh_data_quick" if args.quick else "fresh_data"
    runs, data = args.out / f"{stem}_runs", args.out / f"{stem}_runs" / "data"
    sizes = build_data(data)
    target = budget()
    results: dict = {"sizes": sizes, "budget_parameters": target, "seeds": args.seeds, "methods": {}}
    rates = {m: tuned_rate(runs, data, m, args.quick) for m in BASELINES}
    for method in OURS + list(SEARCHED) + BASELINES:
        rows = []
        for seed in args.seeds:
            if method in OURS:
                extra = ["--method", method, "--target-params", str(target)]
            elif method in SEARCHED:
                extra = ["--method", SEARCHED[method], "--target-params", str(target), "--lr", "auto"]
            else:
                lr = rates[method][0]
                extra = _rank(method) + (["--lr", str(lr)] if lr is not None else [])
            s = train(
                runs, data, f"{method}-s{seed}", [*extra, "--eval-data", str(data / "test.csv"), "--seed", str(seed)]
            )
            rows.append(
                {
                    "seed": seed,
                    "accuracy": s["eval"]["accuracy"],
                    "macro_f1": s["eval"]["macro_f1"],
                    "lr": s["lr"],
                    "lr_source": s["lr_source"],
                    "r": s.get("r"),
                    "r_source": s.get("r_source"),
                    "adapter_parameters": s.get("adapter_parameters"),
                    "trainable_parameters_start": s["trainable_parameters_start"],
                    "trainable_parameters_mean": s.get("trainable_parameters_mean"),
                    "trainable_parameters_peak": s.get("trainable_parameters_peak"),
                    "trainable_parameters": s["trainable_parameters"],
                    "steps": s["steps"],
                    "seconds": s["seconds"],
                }
            )
        results["methods"][method] = {"runs": rows}
        if method in BASELINES:
            results["methods"][method]["tuning"] = {"chosen": rates[method][0], "validation": rates[method][1]}
    results["machine"] = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(report(results, args.quick))
    print(report(results, args.quick))


def report(results: dict, quick: bool) -> str:
    acc = {m: [r["accuracy"] for r in v["runs"]] for m, v in results["methods"].items()}
    lines = [
        "# Defaults on a data set the study never saw (Italian + Spanish chatterbot categories, 5 classes)",
        "",
        f"Command: `python benchmarks/fresh_data.py{' --quick' if quick else ''} --seeds "
        f"{' '.join(map(str, results['seeds']))}` (every run through `dynarank train`; data {results['sizes']}; budget "
        f"{results['budget_parameters']:,} adapter parameters, plain LoRA r={BUDGET_RANK}'s).",
        "",
        "| method | how it was set | test accuracy (mean ± std) | vs LoRA (paired) | vs stock AdaLoRA (paired) "
        "| rate | start r | adapter params at end | trainable params: start / mean / peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, entry in results["methods"].items():
        rows, a = entry["runs"], acc[method]
        std = statistics.stdev(a) if len(a) > 1 else 0.0
        how = (
            "defaults only (budget given)"
            if method in OURS
            else "defaults, --lr auto"
            if method in SEARCHED
            else "tuned on validation"
            if not quick
            else "default"
        )
        vs = [_pm(*paired(a, acc[b])) if b != method else "-" for b in BASELINES]
        mean_size = statistics.fmean(r["trainable_parameters_mean"] or 0 for r in rows)
        peak = max(r["trainable_parameters_peak"] or 0 for r in rows)
        sizes = ", ".join(f"{r['adapter_parameters']:,}" for r in rows if r["adapter_parameters"] is not None)
        rates = ", ".join(f"{lr:g}" for lr in sorted({r["lr"] for r in rows}))  # --lr auto: per seed
        lines.append(
            f"| {method} | {how} | {statistics.fmean(a):.3f} ± {std:.3f} | {vs[0]} | {vs[1]} | "
            f"{rates} | {rows[0]['r']} | {sizes or '-'} | "
            f"{rows[0]['trainable_parameters_start']:,} / {mean_size:,.0f} / {peak:,} |"
        )
    for method in BASELINES:
        tuning = results["methods"][method].get("tuning", {})
        if tuning.get("validation"):
            scores = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in tuning["validation"].items())
            lines.append(f"\n{method}: validation accuracy per rate (seed 0) {scores}; chosen {tuning['chosen']:g}.")
    lines.append(
        "\nTrainable parameters include the task head (every method trains it); the rank methods' mean and peak are "
        "over the run (ARD and AdaLoRA-style start above the budget and prune into it)."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
