"""Which statistic should set ARD's starting ranks (rank_init='data')? Measured on the planted task, where the right
per-head ranks are known, and on the real models of the quality study.

* ``--part planted`` (minutes): the planted-rank task (planted_task.py, label noise 0.1, 3 seeds). (a) The init alone,
  at a start budget equal to the oracle's size: how many heads get their planted rank (exact, within 1), per
  statistic and number of batches of 64. (b) Training, 2,000 steps, lr 3e-3, budget = the oracle's 1,920 parameters:
  ARD from the uniform start (r0 = 8) against ARD from each statistic's start (init_rho 1.5): loss over the oracle's,
  final / mean / peak adapter size over the oracle's, heads within 1.
* ``--part real`` (hours): ARD with ``rank_init='data'`` (each statistic) and ARD's uniform start on MiniLM / SmolLM2,
  through benchmarks/quality.py's run (same data, schedule, evaluation), at the learning rate the quality study chose
  for ARD; records in results/rank_init_<task>.json, compared by seed with the quality study's LoRA runs.

    python benchmarks/rank_init.py --part planted --seeds 3
    python benchmarks/rank_init.py --part real --task minilm --budgets 1 2 --seeds 0 1 2 --lr 3e-3
    python benchmarks/rank_init.py --part stability --task smollm2 --budgets 1 4 12

* ``--part timing``: one ARD-data run at the task's full length; the data pass's share of its wall time (run it
  under ``flock /tmp/dynarank-timing.lock``).
* ``--part starts`` (a minute): where each statistic puts the starting ranks (by projection type, by sixth of the
  layers) in the quality study's init, no training:
  ``python benchmarks/rank_init.py --part starts --task smollm2 --budgets 1``.
* ``--part scale`` (a minute): why the data start rescales its A rows: on SmolLM2 and MiniLM, how concentrated the
  measured top directions are and what rows along them at the default draw's norm read from the inputs against a
  default-drawn row: ``python benchmarks/rank_init.py --part scale --budgets 1``.
* ``--part stability`` (minutes): how many batches the init needs: the allocation from the first K batches against
  the one from 16 (the quality study's ARD setup), and the seconds one batch of the pass costs.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
from collections import defaultdict
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dynarank import DynaRankConfig, attach, build_controller, elastic_layers, init_ranks  # noqa: E402
from planted_task import make_planted_task, within_one  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ORACLE_PARAMS = 1920  # per-head own-A LoRA at the planted ranks [0,1,2,4,8,0,3,6]: 24 ranks x (64 + 16)
NOISE, STEPS, BATCH, LR = 0.1, 2000, 64, 3e-3


def mse(model, task, x, generator):
    return ((model(x) - task.targets(x, generator)) ** 2).mean()


def planted_model(task, rank_init: str, statistic: str = "gradient", rho: float = 1.5, n_batches: int = 4):
    model = task.student()
    knobs = {"rank_init": "data", "init_statistic": statistic, "init_rho": rho, "init_batches": n_batches}
    knobs = knobs if rank_init == "data" else {"rank_init": "uniform"}
    config = DynaRankConfig(
        method="ard", r=8, target_modules=["query"], head_layout="own", target_params=ORACLE_PARAMS, **knobs
    )  # own A rows: the planted heads read independent input directions
    attach(model, config)
    return model


def init_planted(model, task, seed: int) -> dict:
    """The data init on ``init_batches`` fresh batches of 64 (not the ones training sees)."""
    g = torch.Generator().manual_seed(seed + 500)
    xs = [torch.randn(BATCH, task.base_weight.shape[1], generator=g) for _ in range(model.dynarank_config.init_batches)]
    batches = [{"x": x, "y": task.targets(x, g)} for x in xs]
    return init_ranks(model, batches, loss_fn=lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean()).to_dict()


def allocation_runs(seeds: int) -> list[dict]:
    """(a): the init alone, start budget = the oracle's size (rho just above 1)."""
    runs = []
    for seed in range(seeds):
        task = make_planted_task(seed=seed, noise=NOISE)
        for statistic in ("gradient", "activation"):
            for n_batches in (1, 4, 16):
                model = planted_model(task, "data", statistic, rho=1.0001, n_batches=n_batches)
                record = init_planted(model, task, seed)
                ranks = record["ranks"]["query"]
                runs.append(
                    {
                        "part": "allocation",
                        "seed": seed,
                        "statistic": statistic,
                        "batches": n_batches,
                        "ranks": ranks,
                        "exact": ranks == list(task.true_ranks),
                        "within_one": within_one(ranks, task.true_ranks),
                    }
                )
    return runs


def train(task, model, seed: int) -> dict:
    """2,000 steps of ARD (after the data init, when the model asks for one); sizes after every step."""
    torch.manual_seed(seed)
    if model.dynarank_config.rank_init == "data":
        init_planted(model, task, seed)
    controller = build_controller(model, total_steps=STEPS)
    optimizer = controller.build_optimizer(lr=LR)
    g = torch.Generator().manual_seed(seed + 1000)
    sizes = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, task.base_weight.shape[1], generator=g)
        loss = mse(model, task, x, g)
        controller.observe_loss(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sizes.append(controller.adapter_parameters())
    layer = elastic_layers(model)["query"]
    return {
        "mse": task.eval_loss(model),
        "ranks": layer.ranks,
        "params": layer.num_adapter_parameters(),
        "mean_params": statistics.mean(sizes),
        "peak_params": max([controller.history[0]["adapter_parameters"], *sizes]),
        "within_one": within_one(layer.ranks, task.true_ranks),
    }


def oracle_loss(task, seed: int) -> float:
    """Per-head LoRA cut to the planted ranks before training (fixed ranks, 2,000 steps)."""
    torch.manual_seed(seed)
    model = task.student()
    attach(model, DynaRankConfig(method="dynarank-lora", r=8, target_modules=["query"]))
    layer = elastic_layers(model)["query"]
    layer.remove_slots({h: list(range(k, 8)) for h, k in enumerate(task.true_ranks) if k < 8})
    optimizer = build_controller(model, total_steps=STEPS).build_optimizer(lr=LR)
    g = torch.Generator().manual_seed(seed + 1000)
    for _ in range(STEPS):
        mse(model, task, torch.randn(BATCH, task.base_weight.shape[1], generator=g), g).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return task.eval_loss(model)


def training_runs(seeds: int) -> list[dict]:
    runs = []
    for seed in range(seeds):
        task = make_planted_task(seed=seed, noise=NOISE)
        oracle = oracle_loss(task, seed)
        for name, rank_init, statistic in (
            ("uniform start (r0 = 8)", "uniform", None),
            ("data start, gradient", "data", "gradient"),
            ("data start, activation", "data", "activation"),
        ):
            model = planted_model(task, rank_init, statistic or "gradient")
            result = train(task, model, seed)
            runs.append({"part": "training", "seed": seed, "start": name, "oracle_mse": oracle, **result})
    return runs


def planted_markdown(runs: list[dict], command: str) -> str:
    lines = [
        "# Which statistic sets the starting ranks: the planted task\n",
        f"    {command}\n",
        "Frozen random base, 8 heads of 16, planted per-head ranks [0, 1, 2, 4, 8, 0, 3, 6], label noise 0.1.\n",
        "## The init alone (start budget = the oracle's 1,920 parameters)\n",
        "| statistic | batches of 64 | seeds with the exact planted ranks | heads within 1 (mean) | ranks, seed 0 |",
        "|---|---|---|---|---|",
    ]
    alloc = [r for r in runs if r["part"] == "allocation"]
    for key in dict.fromkeys((r["statistic"], r["batches"]) for r in alloc):
        group = [r for r in alloc if (r["statistic"], r["batches"]) == key]
        lines.append(
            f"| {key[0]} | {key[1]} | {sum(r['exact'] for r in group)} of {len(group)} | "
            f"{100 * statistics.mean(r['within_one'] for r in group):.0f}% | {group[0]['ranks']} |"
        )
    lines += [
        "\n## Training from each start (2,000 steps, budget = the oracle's size, start 1.5x it for the data starts)\n",
        "| start | loss / oracle | params end / oracle | mean over the run / oracle | peak / oracle | heads within 1 |",
        "|---|---|---|---|---|---|",
    ]
    trained = [r for r in runs if r["part"] == "training"]
    for start in dict.fromkeys(r["start"] for r in trained):
        group = [r for r in trained if r["start"] == start]
        loss = statistics.mean(r["mse"] / r["oracle_mse"] for r in group)
        sizes = [statistics.mean(r[k] for r in group) / ORACLE_PARAMS for k in ("params", "mean_params", "peak_params")]
        within = 100 * statistics.mean(r["within_one"] for r in group)
        lines.append(f"| {start} | {loss:.3f} | {sizes[0]:.2f} | {sizes[1]:.2f} | {sizes[2]:.2f} | {within:.0f}% |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- real models
REAL_METHODS = ("ard", "ard-data", "ard-data-activation")


def real_runs(task_name, methods, budgets, seeds, lr: float, jobs: int, out: Path, command: str):
    """ARD from the uniform start and from each statistic, through quality.py's run (records in ``out``)."""
    import quality

    from records import RecordStore, run_pool

    steps = quality.TASKS[task_name]["steps"]
    store = RecordStore(out / f"rank_init_{task_name}.json", quality.record_key)
    store.note_command(command)
    todo = [
        (task_name, m, r, lr, s, steps, max(1, 2 // jobs), command)
        for s in seeds
        for r in budgets
        for m in methods
        if not store.has((task_name, m, r, lr, s, steps))
    ]
    print(f"{len(todo)} runs to do", flush=True)
    run_pool(quality.run_one, todo, jobs, lambda job, rec: store.add(rec))
    lora_path = out / f"quality_{task_name}.json"
    lora = json.loads(lora_path.read_text())["runs"] if lora_path.is_file() else []
    return store, lora


def real_markdown(task_name: str, store, lora_runs: list[dict], out: Path) -> str:
    import quality

    task = quality.TASKS[task_name]
    metric, sign = task["metric"], 1 if task["higher_is_better"] else -1
    lrs = json.loads((out / f"quality_{task_name}.json").read_text()).get("chosen_lr", {})
    base = {(r["budget_r"], r["seed"]): r for r in lora_runs if r["method"] == "lora" and r["lr"] == lrs.get("lora")}
    lines = [
        f"# Which statistic sets the starting ranks: {task_name}\n",
        "Commands:\n",
        *[f"    {c}" for c in store.data["commands"]],
        "",
        f"Test {metric}; differences to the quality study's stock LoRA (lr {lrs.get('lora')}) at the same budget and "
        "seed, positive = better. Sizes in multiples of the budget.\n",
        "| budget (LoRA r) | method | seeds | test (mean ± std) | vs LoRA (mean ± s.e., won/lost) | end | mean | "
        "peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted({g["budget_r"] for g in store.runs}):
        for method in dict.fromkeys(g["method"] for g in store.runs):
            group = sorted(
                (g for g in store.runs if g["method"] == method and g["budget_r"] == r), key=lambda g: g["seed"]
            )
            if not group:
                continue
            values = [g["test"][metric] for g in group]
            diffs = [
                sign * (g["test"][metric] - base[(r, g["seed"])]["test"][metric])
                for g in group
                if (r, g["seed"]) in base
            ]
            vs = "-"
            if len(diffs) >= 2:
                se = statistics.stdev(diffs) / len(diffs) ** 0.5
                won, lost = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
                vs = f"{statistics.mean(diffs):+.4f} ± {se:.4f} ({won}/{lost})"
            budget = group[0]["budget_parameters"]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            lines.append(
                f"| {r} | {method} | {len(group)} | {statistics.mean(values):.4f} ± {std:.4f} | {vs} | "
                f"{statistics.mean(g['adapter_parameters'] for g in group) / budget:.2f} | "
                f"{statistics.mean(g['adapter_parameters_mean_over_training'] for g in group) / budget:.2f} | "
                f"{statistics.mean(g['adapter_parameters_peak'] for g in group) / budget:.2f} |"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- how many batches
CHECKPOINTS = (1, 2, 4, 8, 16)


def study_start(task_name: str, method: str, r: int, seed: int = 0):
    """The quality study's ARD data-start run up to its init: (model attached with ``method``'s settings at budget r,
    the run's training batches in order as (ids, mask, labels, idx)). Seeds torch as the study's run does."""
    import quality

    import study_data
    from dynarank.training.estimate import lora_parameters
    from dynarank.training.loop import BERT_ENCODER_LINEAR, _epoch_order
    from dynarank.training.models import load_causal_lm, load_classifier, packaged_minilm_path, packaged_smollm2_path
    from dynarank.training.tasks import batches, encode_causal, encode_classification

    task = quality.TASKS[task_name]
    train_set, _, _ = getattr(study_data, task["data"])()
    torch.manual_seed(seed)
    if task["model"] == "minilm":
        model, tokenizer = load_classifier(packaged_minilm_path(), train_set.label_names)
        target, encoded = BERT_ENCODER_LINEAR, encode_classification(tokenizer, train_set, task["max_length"])
    else:
        model, tokenizer = load_causal_lm(packaged_smollm2_path())
        target, encoded = quality.SMOLLM2_TARGETS, encode_causal(tokenizer, train_set, task["max_length"])
    budget = lora_parameters(model, target, r)
    spec = quality.train_spec(method, r, budget, 1e-3, seed, task["steps"], task, target)
    attach(model, DynaRankConfig(method="ard", **spec.config_fields()))
    order = _epoch_order(len(encoded["input_ids"]), seed, 0)
    return model, batches(encoded, order, task["batch_size"], tokenizer.pad_token_id or 0)


def stability(task_name: str, budgets: list[int], seed: int = 0) -> list[dict]:
    """The allocation from the first K batches against the one from 16, for K in CHECKPOINTS: the share of the
    16-batch start's ranks (summed over groups, min of the two per group) that K batches reproduce. One pass of 16
    batches: the statistic is a sum over batches, so K batches' statistic is a prefix sum."""
    import time

    from dynarank.rank_init import collect_statistics
    from dynarank.rank_spectra import allocate, layer_spectrum

    out = []
    for r in budgets:
        model, stream = study_start(task_name, "ard-data", r, seed)
        layers, sums, seconds, found = elastic_layers(model), None, 0.0, {}
        for k in range(1, max(CHECKPOINTS) + 1):
            ids, mask, labels, _ = next(stream)
            t0 = time.perf_counter()
            stats, _, _ = collect_statistics(
                model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}], 1, "gradient"
            )
            seconds += time.perf_counter() - t0
            sums = stats if sums is None else {n: sums[n] + stats[n] for n in sums}
            if k in CHECKPOINTS:
                spectra = {n: layer_spectrum(layer, sums[n], False) for n, layer in layers.items()}
                config = model.dynarank_config  # the study's: start at init_rho (1.5) x the budget
                keep, size = allocate(layers, spectra, int(config.init_rho * config.target_params), 0)
                found[k] = {n: [len(g) for g in groups] for n, groups in keep.items()}
        reference = found[max(CHECKPOINTS)]
        total = sum(sum(v) for v in reference.values())
        for k, ranks in found.items():
            kept = sum(min(a, b) for n in ranks for a, b in zip(ranks[n], reference[n]))
            out.append({"task": task_name, "budget_r": r, "batches": k, "reproduced": kept / total, "ranks": ranks})
        out.append({"task": task_name, "budget_r": r, "seconds_per_batch": seconds / max(CHECKPOINTS)})
    return out


def stability_markdown(runs: list[dict], command: str) -> str:
    lines = [
        "# How many batches the data init needs\n",
        f"    {command}\n",
        "Share of the 16-batch start's ranks (per group, the smaller of the two ranks, summed) that the first K "
        "batches reproduce; gradient statistic, the quality study's ARD setup (shared A, start 1.5x the budget), "
        "seed 0.\n",
        "| task | budget (LoRA r) | " + " | ".join(f"K={k}" for k in CHECKPOINTS) + " | seconds per batch |",
        "|---|---|" + "---|" * (len(CHECKPOINTS) + 1),
    ]
    for key in dict.fromkeys((r["task"], r["budget_r"]) for r in runs):
        group = [r for r in runs if (r["task"], r["budget_r"]) == key]
        cells = [f"{100 * r['reproduced']:.0f}%" for r in group if "reproduced" in r]
        per_batch = next(r["seconds_per_batch"] for r in group if "seconds_per_batch" in r)
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {per_batch:.1f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- what the pass costs
def timing(task_name: str, budget: int, lr: float, command: str, method: str = "ard-data-scaled") -> dict:
    """One ARD data-start run in this process (2 threads; ``method`` a quality.py variant, by default the shipped
    defaults'; until 5 Dec 'ard-data-relative', whose rows were not rescaled): the data pass's seconds against the
    run's. Run it under ``flock /tmp/dynarank-timing.lock`` so that no other timing run shares the machine."""
    import quality

    steps = quality.TASKS[task_name]["steps"]
    record = quality.run_one(task_name, method, budget, lr, 0, steps, 2, command)
    init = record["rank_init"]
    return {
        "task": task_name,
        "method": method,
        "statistic": record["rank_init"]["statistic"],
        "budget_r": budget,
        "steps": steps,
        "init_batches": init["batches"],
        "init_seconds": init["seconds"],
        "setup_seconds": record["init_seconds"],
        "run_seconds": record["seconds"],
        "seconds_per_step": record["seconds_per_step"],
        "share": init["seconds"] / record["seconds"],
        "command": command,
    }


STARTS = ("ard-data", "ard-data-relative", "ard-data-activation")  # each statistic, as the quality study runs it


def starts(task_name: str, budgets: list[int], seed: int = 0) -> list[dict]:
    """Where each statistic puts the starting ranks: the init of the quality study's run (same model, batches, K and
    start size), summed by projection type and by a sixth of the layers. No training."""
    import quality

    from dynarank.rank_init import init_batch_count

    k = init_batch_count(None, quality.TASKS[task_name]["steps"])
    out = []
    for r in budgets:
        for method in STARTS:
            model, stream = study_start(task_name, method, r, seed)
            feed = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y, _ in islice(stream, k)]
            record = init_ranks(model, feed).to_dict()
            layer_of = {n: int(re.search(r"layers?\.(\d+)\.", n).group(1)) for n in record["ranks"]}
            n_layers = 1 + max(layer_of.values())
            by_kind, by_layers = defaultdict(int), [0] * 6
            for name, ranks in record["ranks"].items():
                by_kind[name.rsplit(".", 1)[-1]] += sum(ranks)
                by_layers[6 * layer_of[name] // n_layers] += sum(ranks)
            out.append(
                {
                    "task": task_name,
                    "budget_r": r,
                    "method": method,
                    "statistic": record["statistic"],
                    "start_params": record["start_params"],
                    "head_ranks": sum(sum(v) for v in record["ranks"].values()),
                    "by_kind": dict(by_kind),
                    "by_sixth_of_layers": by_layers,
                    "ranks": record["ranks"],
                }
            )
    return out


def row_scale(task_name: str, r: int, seed: int = 0) -> dict:
    """Why the data start rescales its A rows: the quality study's init pass (same model, batches and K), and per
    module the top right singular vector v of the statistic M (its participation ratio 1 / sum v_i^4 and its largest
    channel), and what the written rows at the default draw's norm read from the sampled inputs over what a
    default-drawn row reads (1 / init_scale='input''s factor): the top slot's, and every slot's median."""
    import quality

    from dynarank.rank_init import RELATIVE_STATISTICS, collect_statistics, init_batch_count
    from dynarank.rank_spectra import input_energy, layer_spectrum, write_directions

    model, stream = study_start(task_name, "ard-data-scaled", r, seed)
    k = init_batch_count(None, quality.TASKS[task_name]["steps"])
    feed = [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y, _ in islice(stream, k)]
    inputs: dict = {}
    stats, _, _ = collect_statistics(model, feed, k, "gradient-relative", inputs=inputs)
    ratios, top_reads, all_reads, channels = [], [], [], defaultdict(int)
    for name, layer in elastic_layers(model).items():
        v = torch.linalg.svd(stats[name].double(), full_matrices=False).Vh[0]
        ratios.append(float(1 / v.pow(4).sum()))
        channels[int(v.abs().argmax())] += 1
        write_directions(layer, layer_spectrum(layer, stats[name], "gradient-relative" in RELATIVE_STATISTICS))
        proj, norm = input_energy(layer, inputs[name])
        reads = (proj / (norm / (3 * layer.in_features))).sqrt()  # rms(w . x) over a default row's
        top_reads.append(float(reads[0]))
        all_reads += reads.tolist()
    return {
        "task": task_name,
        "budget_r": r,
        "modules": len(ratios),
        "d_in": sorted({layer.in_features for layer in elastic_layers(model).values()}),
        "participation_ratio_median": statistics.median(ratios),
        "top_channel_most_common": max(channels.items(), key=lambda kv: kv[1]),
        "top_row_reads": [min(top_reads), statistics.median(top_reads), max(top_reads)],
        "every_row_reads_median": statistics.median(all_reads),
    }


def starts_markdown(runs: list[dict], command: str) -> str:
    lines = [
        "# Where each statistic starts the ranks\n",
        f"    {command}\n",
        "Starting head-ranks (a rank of one group; shared A slots counted once per group using them) of the quality "
        "study's ARD data start, seed 0, by projection type and by sixth of the layers (first to last).\n",
        "| task | budget (LoRA r) | statistic | start params | head-ranks | by type | by sixth of the layers |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        kinds = ", ".join(f"{k} {v}" for k, v in r["by_kind"].items())
        sixths = " / ".join(str(v) for v in r["by_sixth_of_layers"])
        lines.append(
            f"| {r['task']} | {r['budget_r']} | {r['statistic']} | {r['start_params']:,} | {r['head_ranks']} | "
            f"{kinds} | {sixths} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--part", choices=("planted", "real", "stability", "timing", "starts", "scale"), default="planted"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[3], help="planted: the number; real: the seeds")
    parser.add_argument("--task", default="minilm", help="real: the quality study's task")
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", choices=REAL_METHODS, help="real: default all")
    parser.add_argument("--lr", type=float, default=3e-3, help="real: ARD's learning rate (the quality study's)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    command = "python benchmarks/rank_init.py " + shlex.join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "planted":
        torch.set_num_threads(1)
        runs = allocation_runs(args.seeds[0]) + training_runs(args.seeds[0])
        (args.out / "rank_init_planted.json").write_text(json.dumps({"command": command, "runs": runs}, indent=1))
        text = planted_markdown(runs, command)
        (args.out / "rank_init_planted.md").write_text(text)
    elif args.part == "stability":
        torch.set_num_threads(2)
        runs = stability(args.task, args.budgets)
        path = args.out / "rank_init_stability.json"
        previous = json.loads(path.read_text())["runs"] if path.is_file() else []
        runs = [r for r in previous if r["task"] != args.task] + runs
        path.write_text(json.dumps({"command": command, "runs": runs}, indent=1))
        text = stability_markdown(runs, command)
        (args.out / "rank_init_stability.md").write_text(text)
    elif args.part == "scale":
        torch.set_num_threads(2)
        runs = [row_scale(task, args.budgets[0]) for task in ("smollm2", "minilm")]
        (args.out / "rank_init_scale.json").write_text(json.dumps({"command": command, "runs": runs}, indent=1))
        lines = [
            "# What a measured A row reads at the default draw's norm (the data start's pass, seed 0)\n",
            f"    {command}\n",
            "| task | modules (d_in) | top direction's participation ratio, median | most common top channel "
            "(modules) | top row reads / a default row's: min, median, max | every row's, median |",
            "|---|---|---|---|---|---|",
        ]
        for run in runs:
            lo, mid, hi = run["top_row_reads"]
            channel, count = run["top_channel_most_common"]
            lines.append(
                f"| {run['task']} | {run['modules']} ({', '.join(map(str, run['d_in']))}) | "
                f"{run['participation_ratio_median']:.1f} | {channel} ({count}) | {lo:.1f}x, {mid:.1f}x, {hi:.1f}x | "
                f"{run['every_row_reads_median']:.2f}x |"
            )
        text = "\n".join(lines) + "\n"
        (args.out / "rank_init_scale.md").write_text(text)
    elif args.part == "starts":
        torch.set_num_threads(2)
        runs = starts(args.task, args.budgets)
        path = args.out / "rank_init_starts.json"
        previous = json.loads(path.read_text())["runs"] if path.is_file() else []
        keep = [r for r in previous if (r["task"], r["budget_r"]) not in {(n["task"], n["budget_r"]) for n in runs}]
        path.write_text(json.dumps({"command": command, "runs": keep + runs}, indent=1))
        text = starts_markdown(keep + runs, command)
        (args.out / "rank_init_starts.md").write_text(text)
    elif args.part == "timing":
        path = args.out / "rank_init_timing.json"
        runs = json.loads(path.read_text())["runs"] if path.is_file() else []
        runs.append(timing(args.task, args.budgets[0], args.lr, command))
        path.write_text(json.dumps({"runs": runs}, indent=1))
        lines = ["# What the data pass costs (one run alone on the machine, 2 threads)", ""]
        lines += [
            f"- {r['task']} r={r['budget_r']} ({r.get('statistic', 'gradient')} statistic, "
            f"{r.get('method', 'ard-data-relative')}): data pass "
            f"{r['init_seconds']:.1f} s of a {r['run_seconds']:.0f} s run ({100 * r['share']:.1f}%, "
            f"{r['init_batches']} batches; {r['steps']} steps, {r['seconds_per_step']:.2f} s each); `{r['command']}`"
            for r in runs
        ]
        text = "\n".join(lines) + "\n"
        (args.out / "rank_init_timing.md").write_text(text)
    else:
        methods = args.methods or list(REAL_METHODS)
        store, lora = real_runs(args.task, methods, args.budgets, args.seeds, args.lr, args.jobs, args.out, command)
        text = real_markdown(args.task, store, lora, args.out)
        (args.out / f"rank_init_{args.task}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
