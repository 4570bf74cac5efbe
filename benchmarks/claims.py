"""The figures the README quotes, recomputed from the committed records (benchmarks/results/*.json).

Each figure is a string exactly as the README prints it; tests/test_readme.py checks that every one appears there,
so the prose cannot drift from the records. Paired differences are by seed, each method at the learning rate it
ran most seeds with at that budget (the rate its study chose), positive when the first method is better (higher
accuracy, lower loss); "± x" is one standard error of the mean difference.

    python benchmarks/claims.py        # every figure, with where it comes from
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from functools import cache
from pathlib import Path

import fresh_data

RESULTS = Path(__file__).resolve().parent / "results"
METRIC = {
    "minilm": ("accuracy", 1),
    "minilm-tweets3": ("accuracy", 1),
    "smollm2": ("loss", -1),
    "smollm2-sentiment": ("loss", -1),
    "smollm2-italian": ("loss", -1),
}  # the test metric, and its sign (+1: higher better)


@cache
def _record(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


@cache
def _runs(task: str) -> dict:
    """(method, budget) -> {seed: record} at the rate the study chose for the method, else (a rate run only as a
    check) at the rate with the most seeds (ties: the lower rate)."""
    record = _record(f"quality_{task}.json")
    study_rate = record.get("chosen_lr", {})
    by_rate: dict = defaultdict(dict)
    for run in record["runs"]:
        by_rate[run["method"], run["budget_r"], run["lr"]][run["seed"]] = run
    chosen: dict = {}
    for (method, budget, lr), seeds in sorted(by_rate.items()):
        if (method, budget, study_rate.get(method)) in by_rate:
            if lr == study_rate[method]:
                chosen[method, budget] = seeds
        elif len(seeds) > len(chosen.get((method, budget), {})):
            chosen[method, budget] = seeds
    return chosen


def paired(task: str, method: str, baseline: str, budget: int) -> tuple[float, float, int]:
    """Mean and standard error of (method - baseline) on the test metric, paired by seed; positive = better."""
    metric, sign = METRIC[task]
    ours, theirs = _runs(task)[method, budget], _runs(task)[baseline, budget]
    diffs = [sign * (ours[s]["test"][metric] - theirs[s]["test"][metric]) for s in sorted(ours) if s in theirs]
    return statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5, len(diffs)


def _diff(task: str, method: str, baseline: str, budget: int) -> str:
    mean, se, n = paired(task, method, baseline, budget)
    return f"{mean:+.3f} ± {se:.3f}"


def _planted(method: str) -> float:
    return next(row for row in _record("elalora.json")["table"] if row["method"] == method)["loss / oracle"]


def figures() -> dict[str, str]:
    """Every figure the README quotes, by name, formatted as printed there."""
    out: dict[str, str] = {}
    planted = next(r for r in _record("planted_rank.json")["table"] if r["method"] == "ARD own A")
    out["planted ARD exact seeds"] = f"{planted['exact seeds']} of 3 seeds"
    out["planted ARD loss"] = f"{planted['loss / oracle']:.3f}x"
    for name, row in [
        ("LoRA", "LoRA per matrix r=10"),
        ("DoRA", "stock PEFT DoRA per matrix r=10"),
        ("stock AdaLoRA", "stock PEFT AdaLoRA per matrix 15->10"),
        ("ElaLoRA", "ElaLoRA per head r=3"),
    ]:
        out[f"planted {name} loss"] = f"{_planted(row):.1f}x"

    for budget in (1, 2, 6):
        out[f"minilm elalora - adalora r={budget}"] = _diff("minilm", "elalora", "adalora", budget)
        out[f"minilm adalora-physical - adalora r={budget}"] = _diff("minilm", "adalora-physical", "adalora", budget)
        out[f"minilm elalora - lora r={budget}"] = _diff("minilm", "elalora", "lora", budget)
    out["minilm ard - lora r=2"] = _diff("minilm", "ard", "lora", 2)
    out["minilm ard - adalora r=2"] = _diff("minilm", "ard", "adalora", 2)
    for budget in (1, 2):
        out[f"minilm elalora-ortho0 - elalora r={budget}"] = _diff("minilm", "elalora-ortho0", "elalora", budget)
    ard = list(_runs("minilm")["ard", 2].values())
    final = statistics.mean(r["adapter_parameters"] for r in ard)
    out["minilm ard peak / final"] = f"{statistics.mean(r['adapter_parameters_peak'] for r in ard) / final:.1f}x"
    out["minilm ard mean / final"] = (
        f"{statistics.mean(r['adapter_parameters_mean_over_training'] for r in ard) / final:.1f}x"
    )
    out["minilm ard state fall"] = (
        f"{1 - statistics.mean(r['state_bytes_end'] / r['state_bytes_peak'] for r in ard):.0%}"
    )

    for budget in (1, 4, 12):
        out[f"smollm2 elalora - lora r={budget}"] = _diff("smollm2", "elalora", "lora", budget)
        out[f"smollm2 elalora-from-above - adalora r={budget}"] = _diff(
            "smollm2", "elalora-from-above", "adalora", budget
        )
    out["smollm2 adalora-physical - lora r=12"] = _diff("smollm2", "adalora-physical", "lora", 12)
    # ARD's data-driven start as shipped (ard-data-scaled: A rows at a default row's read scale), and before the
    # scale (ard-data-relative: A rows at the default draw's norm)
    for method in ("ard-data-scaled", "ard-data-relative"):
        for budget in (1, 2, 4, 6):
            out[f"minilm {method} - lora r={budget}"] = _diff("minilm", method, "lora", budget)
        for budget in (1, 4):
            out[f"smollm2 {method} - lora r={budget}"] = _diff("smollm2", method, "lora", budget)
    out["smollm2 ard-data-scaled - lora r=12"] = _diff("smollm2", "ard-data-scaled", "lora", 12)
    for budget in (1, 4, 12):
        out[f"smollm2 ard-data-scaled - eva r={budget}"] = _diff("smollm2", "ard-data-scaled", "eva", budget)
        out[f"smollm2 eva - lora r={budget}"] = _diff("smollm2", "eva", "lora", budget)
    out["smollm2 ard - lora r=4"] = _diff("smollm2", "ard", "lora", 4)
    # ARD's default with a budget (the data start) against its uniform start and LoRA, at each study task's middle
    # budget (the defaults study's tasks: benchmarks/defaults.py)
    for task, budget in (("minilm", 2), ("minilm-tweets3", 2), ("smollm2", 4), ("smollm2-sentiment", 4)):
        for baseline in ("ard", "lora"):
            out[f"{task} ard-data-scaled - {baseline} r={budget}"] = _diff(task, "ard-data-scaled", baseline, budget)
    out["smollm2-italian ard-data-scaled - lora r=4"] = _diff("smollm2-italian", "ard-data-scaled", "lora", 4)
    data_start = [r for budget in (1, 2, 4, 6) for r in _runs("minilm")["ard-data-scaled", budget].values()]
    out["minilm ard-data-scaled peak / budget"] = (
        f"{max(r['adapter_parameters_peak'] / r['budget_parameters'] for r in data_start):.1f}x"
    )
    out["minilm ard-data-scaled mean / budget"] = (
        f"{max(r['adapter_parameters_mean_over_training'] / r['budget_parameters'] for r in data_start):.1f}x"
    )

    # lr='auto' against the shipped default and the tuned stock baselines (benchmarks/defaults.py's auto table)
    for row in _record("defaults.json").get("auto", []):
        against = "default" if row["vs"].endswith("(the default)") else row["vs"].split()[0]
        if row["method"] == "ard" and against in ("default", "lora"):  # what the README quotes
            at = "" if row.get("middle_budget", True) else f" r={row['budget']}"
            out[f"auto {row['task']}{at} ard - {against}"] = f"{row['mean']:+.3f} ± {row['stderr']:.3f}"
    # the SVD methods' left-out checks on the causal LMs (defaults.py: each set checked with the configuration and
    # rate chosen on the other two), against a tuned LoRA
    for row in _record("defaults.json")["comparisons"]:
        if (
            row["method"] in ("elalora", "adalora-physical")
            and row["task"].startswith("smollm2")
            and row["baseline"] == "lora"
        ):
            out[f"left-out {row['task']} {row['method']} - lora"] = f"{row['mean']:+.3f} ± {row['stderr']:.3f}"
    # the shipped default at r=1, where it follows the budget (the defaults study's table away from the middle budget)
    for row in _record("defaults.json").get("default_away_from_the_middle", []):
        if row["method"] == "ard" and row["budget"] == 1 and row["vs"].startswith("lora"):
            out[f"default {row['task']} r=1 ard - lora"] = f"{row['mean']:+.3f} ± {row['stderr']:.3f}"
    # the defaults on a data set no choice saw (fresh_data.py), paired by seed against the tuned baselines
    fresh = {m: [r["accuracy"] for r in v["runs"]] for m, v in _record("fresh_data.json")["methods"].items()}
    for method in ("elalora", "adalora-physical", "ard", "ard+auto"):
        for baseline in ("lora", "adalora"):
            mean, stderr = fresh_data.paired(fresh[method], fresh[baseline])
            out[f"fresh data {method} - {baseline}"] = f"{mean:+.3f} ± {stderr:.3f}"
    for setting in ("minilm-16x16", "decoder-224", "decoder-224_240steps"):
        methods = _record(f"method_overhead_{setting}.json")["methods"]
        for method in ("ard", "elalora", "adalora-physical"):
            out[f"{setting} {method} step / lora"] = f"{methods[method]['ratio_to_lora']:.2f}"
        if "ard-data" in methods:  # ARD with the data-driven start (recorded in the decoder setting)
            out[f"{setting} ard-data step / lora"] = f"{methods['ard-data']['ratio_to_lora']:.2f}"
        out[f"{setting} hooks adalora"] = f"{methods['adalora']['hooks_per_step_ms']:.1f} ms"
        worst = max(methods[m]["hooks_per_step_ms"] for m in ("ard", "elalora", "adalora-physical"))
        out[f"{setting} hooks ours at most"] = f"{worst:.1f} ms"
    return out


def main() -> None:
    for name, value in figures().items():
        print(f"{name:45s} {value}")


if __name__ == "__main__":
    main()
