"""ARD-LoRA against plain LoRA at equal adapter parameters on a real model.

all-MiniLM-L6-v2 (packaged) + a 2-way classification head on the packaged tweets
(``packaged_sentiment(2000, 500)``: balanced negative/positive), 2 epochs of batch 32 (126 optimizer
steps), lr 1e-3 (linear schedule, 6% warm-up), max_length 64, adapters on all six Linear types of
every layer (``loop.BERT_ENCODER_LINEAR``). Plain LoRA is stock PEFT (``method='lora'`` in the
loop, lora_alpha = r). Every method runs through the same ``loop.train_classifier``.

The target of the study: a point of ARD-LoRA whose mean accuracy is at or above plain LoRA's mean
accuracy at a rank that costs MORE adapter parameters than the ARD point ends with (adapter
parameters = the A/B factors left at the end of training, what an export costs; the task head is
trained by every method and not counted).

Configurations are named, and the name is the whole specification (parsed by ``parse_config``):

    lora-r4                        stock PEFT LoRA, r = 4
    ard-own-r2-s3                  ARD, per-head groups, own A per head, r0 = 2, ard_lambda 3 (relative)
    ard-own-r2-f1-s3               ... rank_floor 1 (default floor is 0)
    ard-shared-r8-s10              ARD, per-head groups sharing A's rows (head_layout='shared')
    ard-matrix-r8-s10              ARD, one group per matrix (granularity='matrix')
    optional suffixes: -wu0.3 (warmup_frac) -fin0.3 (final_frac) -tr4 (alpha_travel) -re2 (resize_every)
                       -b0 (ard_beta) -lmgradient (lambda_mode)

Runs are appended to ``results/minilm_ard.json`` (one record per (config, seed), with the command
that produced it); a (config, seed) already there is not run again unless ``--force``. The table
(``.md``) and the Pareto plot (``.png``) are redrawn from every record after each run.

    python benchmarks/minilm_ard.py --quick                 # the 1-seed scan (seed 0)
    python benchmarks/minilm_ard.py                         # the final set, seeds 0 1 2
    python benchmarks/minilm_ard.py --configs lora-r8 ard-matrix-r8-s10 --seeds 0 1 2 --jobs 2
    python benchmarks/minilm_ard.py --table-only

``--jobs 2`` runs two processes at once with one thread each (the machine has 2 cores).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import PROJECTIONS, RecordStore, projection, run_pool  # noqa: E402

RESULTS = Path(__file__).parent / "results"
KINDS = PROJECTIONS
LORA = ["lora-r1", "lora-r2", "lora-r4"]
# The 1-seed scan (--quick) and the final 3-seed set (default); see results/minilm_ard.md for why.
SCAN = LORA + [
    "lora-r8",
    "ard-own-r1-s1",
    "ard-own-r2-s10",
    "ard-own-r2-f1-s10",
    "ard-shared-r8-s10",
    "ard-shared-r8-s30",
    "ard-matrix-r8-s3",
    "ard-matrix-r8-s10",
]
FINAL = LORA + [
    "lora-r8",
    "ard-own-r2-s10",
    "ard-own-r2-f1-s10",
    "ard-shared-r8-s10",
    "ard-shared-r8-s30",
    "ard-matrix-r8-s10",
]
SUFFIXES = {
    "wu": ("warmup_frac", float),
    "fin": ("final_frac", float),
    "tr": ("alpha_travel", float),
    "re": ("resize_every", int),
    "b": ("ard_beta", float),
    "lm": ("lambda_mode", str),
}


def parse_config(name: str) -> dict:
    """'lora-r4' / 'ard-<own|shared|matrix>-r<r0>[-f<floor>]-s<lambda>[-<suffix><value>...]' -> run spec."""
    match = re.fullmatch(r"(lora|dora)-r(\d+)", name)
    if match:
        return {"method": match[1], "r": int(match[2]), "dynarank": {}, "family": f"{match[1]} (stock PEFT)"}
    match = re.fullmatch(r"ard-(own|shared|matrix)-r(\d+)((?:-[a-z]+[0-9.a-z]+)*)", name)
    if not match:
        raise ValueError(f"cannot parse config name {name!r}; see the module docstring.")
    layout, r0, rest = match[1], int(match[2]), match[3]
    dyn: dict = {"granularity": "matrix"} if layout == "matrix" else {"head_layout": layout}
    for part in filter(None, rest.split("-")):
        key, value = (
            re.fullmatch(r"([a-z]+?)([0-9.]+|[a-z]+)", part).groups()
            if part[:2] != "lm"
            else (
                "lm",
                part[2:],
            )
        )
        if key == "f":
            dyn["rank_floor"] = int(value)
        elif key == "s":
            dyn["ard_lambda"] = float(value)
        elif key in SUFFIXES:
            field, cast = SUFFIXES[key]
            dyn[field] = cast(value)
        else:
            raise ValueError(f"unknown part {part!r} in {name!r}")
    floor = dyn.get("rank_floor", 0)
    family = f"ARD {layout}" + (f", floor {floor}" if layout != "matrix" else "")
    return {"method": "ard", "r": r0, "dynarank": dyn, "family": family}


def run_one(name: str, seed: int, threads: int, command: str) -> dict:
    """Train and evaluate one (config, seed) in this process; returns the record."""
    import torch

    from dynarank.naming import ARD_ATTR
    from dynarank.training.data import packaged_sentiment
    from dynarank.training.loop import TrainSpec, train_classifier
    from dynarank.training.models import load_classifier, packaged_minilm_path

    torch.set_num_threads(threads)
    cfg = parse_config(name)
    train, held = packaged_sentiment(2000, 500, seed=0)
    torch.manual_seed(seed)  # the classification head is initialised at load time: make it follow the seed
    model, tokenizer = load_classifier(packaged_minilm_path(), train.label_names)
    spec = TrainSpec(method=cfg["method"], r=cfg["r"], seed=seed, dynarank=dict(cfg["dynarank"]))
    trajectory: list[tuple[int, int]] = []
    losses: list[float] = []

    def on_step(info: dict) -> None:
        losses.append(round(info["loss"], 5))
        if info["step"] % 5 == 0 or info["step"] == 1:
            trajectory.append((info["step"], info["trainable_parameters"]))

    t0 = time.perf_counter()
    done = train_classifier(model, tokenizer, train, spec, eval_set=held, on_step=on_step)
    trained, controller, result = done.model, done.controller, done.metrics
    head = sum(p.numel() for n, p in trained.named_parameters() if p.requires_grad and "classifier" in n)
    gates = sum(p.numel() for n, p in trained.named_parameters() if p.requires_grad and ARD_ATTR in n)
    if controller is not None:
        ranks = result["ranks"]
        adapter = result["adapter_parameters"]
        # Adapter parameters over time (trainable minus head and alphas): what training actually carried.
        trajectory = [(t, p - head - gates) for t, p in trajectory]
    else:
        ranks = {}
        for module_name, _ in trained.named_modules():
            if module_name.endswith("lora_A"):
                ranks[module_name.removeprefix("base_model.model.").removesuffix(".lora_A")] = [cfg["r"]]
        adapter = result["trainable_parameters"] - head
        trajectory = [(t, p - head) for t, p in trajectory]
    by_kind: dict[str, list[int]] = {}
    for module, groups in ranks.items():
        by_kind.setdefault(projection(module), []).extend(groups)
    record = {
        "config": name,
        "family": cfg["family"],
        "method": cfg["method"],
        "r": cfg["r"],
        "dynarank": cfg["dynarank"],
        "seed": seed,
        "accuracy": result["eval"]["accuracy"],
        "macro_f1": result["eval"]["macro_f1"],
        "adapter_parameters": adapter,
        "adapter_parameters_start": trajectory[0][1] if trajectory else adapter,
        "adapter_parameters_mean_over_training": statistics.mean(p for _, p in trajectory) if trajectory else adapter,
        "mean_rank": {k: statistics.mean(v) for k, v in by_kind.items()},
        "heads_off": {k: sum(1 for x in v if x == 0) / len(v) for k, v in by_kind.items()},
        "ranks": ranks,
        "state_bytes_start": result["state_bytes_start"],
        "state_bytes_end": result["state_bytes_end"],
        "seconds": time.perf_counter() - t0,
        "seconds_per_step": result["seconds_per_step"],
        "threads": threads,
        "warnings": result.get("warnings", []),
        "train_loss": losses,
        "command": command,
    }
    if controller is not None and cfg["method"] == "ard":
        gained = controller._loss_improvement()
        record["ard"] = {
            "settings": {k: v for k, v in vars(controller.settings).items()},
            "warmup_loss_gain": gained,
            "lambda_unit": controller.unit,
            "lambda_by_kind": {
                projection(n): float(v[0])
                for n, v in controller.lambdas.items()
                if n.startswith("bert.encoder.layer.0.")
            },
            "rank_changes": controller.rank_changes,
            "alpha_final": {
                n: [round(float(a), 4) for a in controller.gates.of(n).detach()] for n in controller.layers
            },
        }
    return record


# ---------------------------------------------------------------------------------------------- summary
def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["config"] for r in runs):
        group = sorted((r for r in runs if r["config"] == name), key=lambda r: r["seed"])
        acc = [r["accuracy"] for r in group]
        rows.append(
            {
                "config": name,
                "family": group[0]["family"],
                "method": group[0]["method"],
                "r": group[0]["r"],
                "dynarank": group[0]["dynarank"],
                "seeds": [r["seed"] for r in group],
                "accuracy_by_seed": acc,
                "accuracy_mean": statistics.mean(acc),
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "macro_f1_mean": statistics.mean(r["macro_f1"] for r in group),
                "macro_f1_std": statistics.stdev([r["macro_f1"] for r in group]) if len(group) > 1 else 0.0,
                "adapter_parameters_mean": statistics.mean(r["adapter_parameters"] for r in group),
                "adapter_parameters_start": statistics.mean(r["adapter_parameters_start"] for r in group),
                "adapter_parameters_mean_over_training": statistics.mean(
                    r["adapter_parameters_mean_over_training"] for r in group
                ),
                "mean_rank": {k: statistics.mean(r["mean_rank"].get(k, 0) for r in group) for k in KINDS},
                "heads_off": {k: statistics.mean(r.get("heads_off", {}).get(k, 0) for r in group) for k in KINDS},
                "lambda_unit": [r.get("ard", {}).get("lambda_unit") for r in group],
                "warnings": sorted({w[:60] for r in group for w in r["warnings"]}),
            }
        )
    judge(rows)
    return rows


def lora_curve(rows: list[dict], seeds: list[int]) -> list[tuple[float, float, str]]:
    """(params, mean accuracy, name) of plain LoRA, on the same seeds, sorted by params."""
    points = [
        (r["adapter_parameters_mean"], r["accuracy_mean"], r["config"])
        for r in rows
        if r["method"] == "lora" and r["seeds"] == seeds
    ]
    return sorted(points)


def judge(rows: list[dict]) -> None:
    """Per ARD row: which plain-LoRA points it beats (>= mean accuracy with fewer parameters), and its
    accuracy minus the LoRA curve interpolated (linear in log parameters) at its own parameter count."""
    for row in rows:
        if row["method"] == "lora":
            continue
        curve = lora_curve(rows, row["seeds"])
        beaten = [name for p, a, name in curve if p > row["adapter_parameters_mean"] and a <= row["accuracy_mean"]]
        row["beats"] = beaten
        row["target_met"] = bool(beaten)
        row["delta_vs_lora_curve"] = None
        x = math.log(row["adapter_parameters_mean"])
        for (p0, a0, _), (p1, a1, _) in zip(curve, curve[1:]):
            if math.log(p0) <= x <= math.log(p1):
                at = a0 + (a1 - a0) * (x - math.log(p0)) / (math.log(p1) - math.log(p0))
                row["delta_vs_lora_curve"] = row["accuracy_mean"] - at


def settings_text(row: dict) -> str:
    if row["method"] != "ard":
        return f"r={row['r']}"
    parts = [f"r0={row['r']}"] + [f"{k}={v}" for k, v in row["dynarank"].items() if k not in ("granularity",)]
    return ", ".join(parts)


def markdown(rows: list[dict], commands: list[str]) -> str:
    head = (
        "| method / variant | config | settings | seeds | accuracy (mean ± std) | macro-F1 (mean ± std) | "
        "adapter params: end (start) | mean final rank q / k / v / attn-out / ffn-in / ffn-out | "
        "target met (beats LoRA ...) | Δacc vs LoRA curve |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["method"] != "lora", r["family"], r["adapter_parameters_mean"])):
        ranks = " / ".join(f"{row['mean_rank'][k]:.2f}" for k in KINDS)
        target = (
            "-" if row["method"] == "lora" else (("yes: " + ", ".join(row["beats"])) if row["target_met"] else "no")
        )
        delta = row.get("delta_vs_lora_curve")
        lines.append(
            f"| {row['family']} | {row['config']} | {settings_text(row)} | {len(row['seeds'])} | "
            f"{row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} | "
            f"{row['macro_f1_mean']:.4f} ± {row['macro_f1_std']:.4f} | "
            f"{row['adapter_parameters_mean']:,.0f} ({row['adapter_parameters_start']:,.0f}) | {ranks} | {target} | "
            f"{'' if delta is None else f'{delta:+.4f}'} |"
        )
    cmd = "\n".join(f"    {c}" for c in commands)
    return (
        "# ARD-LoRA vs plain LoRA on all-MiniLM-L6-v2 (packaged tweets, 2,000 / 500, 126 steps)\n\n"
        f"Commands that produced these records (results/minilm_ard.json):\n\n{cmd}\n\n"
        "Accuracy std is the sample std over seeds. Adapter params = A/B factors at the end of training "
        "(start in brackets; the task head is not counted). Target: mean accuracy at or above a plain LoRA "
        "point (same seeds) that costs more parameters. Δacc vs LoRA curve: accuracy minus plain LoRA's "
        "interpolated (linear in log params) at the same params, when inside the LoRA range.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def plot(rows: list[dict], path: Path, seeds: list[int] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    families = dict.fromkeys(r["family"] for r in rows)
    markers = iter("soD^v<>ph*")
    for family in families:
        pts = sorted(
            (r for r in rows if r["family"] == family and (seeds is None or r["seeds"] == seeds)),
            key=lambda r: r["adapter_parameters_mean"],
        )
        if not pts:
            continue
        ax.errorbar(
            [r["adapter_parameters_mean"] for r in pts],
            [r["accuracy_mean"] for r in pts],
            yerr=[r["accuracy_std"] for r in pts],
            marker=next(markers),
            capsize=3,
            label=family,
            linestyle="-" if family.startswith("lora") else "--",
            linewidth=2 if family.startswith("lora") else 1,
        )
        for r in pts:
            label = r["config"].replace("ard-", "").replace("lora-", "")
            ax.annotate(
                label,
                (r["adapter_parameters_mean"], r["accuracy_mean"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters at the end of training (log scale)")
    ax.set_ylabel("accuracy (mean over seeds, ± std)")
    n = f"{len(seeds)} seeds" if seeds else "all records"
    ax.set_title(f"all-MiniLM-L6-v2 / tweets, 126 steps: ARD-LoRA vs plain LoRA ({n})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def write(store: RecordStore, out: Path, final_seeds: list[int]) -> str:
    data = store.data
    data["summary"] = summarise(data["runs"])
    final = [r for r in data["summary"] if r["seeds"] == final_seeds]
    data["target_met_by"] = [r["config"] for r in final if r.get("target_met")]
    store.save()
    text = markdown(final or data["summary"], data["commands"])
    scan = [r for r in data["summary"] if r["seeds"] != final_seeds]
    if final and scan:
        text += "\n## Scan records (other seed sets)\n\n" + markdown(scan, []).split("\n\n", 3)[-1]
    (out / "minilm_ard.md").write_text(text)
    plot(data["summary"], out / "minilm_ard.png", final_seeds if final else None)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the 1-seed scan: SCAN configs, seed 0")
    parser.add_argument("--configs", nargs="+", help="config names (default: FINAL, or SCAN with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1 2, or 0 with --quick)")
    parser.add_argument("--jobs", type=int, default=2, help="processes at once")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: 2 // jobs)")
    parser.add_argument("--force", action="store_true", help="rerun (config, seed) pairs already recorded")
    parser.add_argument("--table-only", action="store_true", help="redraw table and plot from the records")
    parser.add_argument(
        "--final-seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="seed set of the main table (other seed sets are listed as scan records)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    configs = args.configs or (SCAN if args.quick else FINAL)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    for name in configs:
        parse_config(name)
    threads = args.threads or max(1, 2 // args.jobs)
    command = "python benchmarks/minilm_ard.py " + shlex.join(sys.argv[1:])
    store = RecordStore(args.out / "minilm_ard.json", key=lambda r: (r["config"], r["seed"]))
    if not args.table_only:
        store.note_command(command)
        todo = [(c, s) for s in seeds for c in configs if args.force or not store.has((c, s))]
        print(f"{len(todo)} runs to do ({args.jobs} at a time, {threads} thread(s) each)", flush=True)

        def done(job: tuple, record: dict) -> None:
            store.add(record)
            write(store, args.out, args.final_seeds)
            ard = record.get("ard", {})
            print(
                f"{record['config']:28s} seed {record['seed']} acc {record['accuracy']:.4f} "
                f"f1 {record['macro_f1']:.4f} params {record['adapter_parameters']:>8,} ranks "
                + " ".join(f"{k}={record['mean_rank'].get(k, 0):.2f}" for k in KINDS)
                + (f" unit {ard.get('lambda_unit')} gain {ard.get('warmup_loss_gain')}" if ard else "")
                + f" {record['seconds']:.0f}s",
                flush=True,
            )

        run_pool(run_one, [(c, s, threads, command) for c, s in todo], args.jobs, done)
    print(write(store, args.out, args.final_seeds))


if __name__ == "__main__":
    main()
