"""Memory where it matters: SmolLM2-135M on a float32 and on a 4-bit (NF4) base, stock LoRA vs dynarank's ARD and
ElaLoRA, at the same parameter budget.

The task is quality.py's ``smollm2`` (the packaged English dialog pairs, response-only loss; 480 train / 100
validation / 200 test pairs, adapters on q/k/v/o of every layer, 60 steps of batch 8, length 64), the budget plain
LoRA's size at rank 4 (460,800 parameters), each method at the learning rate quality.py chose for it on the float
base (results/quality_smollm2.json; the defaults below when that study is absent):

    fp32-lora      float32 base, stock PEFT LoRA r=4
    nf4-lora       4-bit NF4 base (double quantization, float32 compute), stock PEFT LoRA r=4: QLoRA
    nf4-ard        4-bit base, ARD-LoRA per head held to the budget (r0 = 8, shared A)
    nf4-elalora    4-bit base, ElaLoRA at r=4 with the budget as its ceiling
    (also: fp32-ard, fp32-elalora, int8-lora, int8-ard, by --configs)

Every run is a fresh process (peak memory is the run's own). Per run: the base's weight bytes (quantized bytes and
their scales), the resident memory after loading, the largest resident memory sampled after every optimizer step
(training), the process's peak (ru_maxrss: loading included), the bytes of trainable parameters + AdamW state +
the controller's score EMAs (training.loop.training_state_bytes) at start / peak / end, the test loss, and the time
per step. Step times are compared as ratios to fp32-lora of the same seed, runs one at a time: run the command under
the timing lock.

    flock /tmp/dynarank-timing.lock python benchmarks/quantized_memory.py            # 4 configs x 3 seeds: ~1.5 h
    flock /tmp/dynarank-timing.lock python benchmarks/quantized_memory.py --quick    # 1 seed, 20 steps: ~10 min
    python benchmarks/quantized_memory.py --table-only
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import SMOLLM2_TARGETS, TASKS, chosen_lr, record_key, train_spec  # noqa: E402

import study_data  # noqa: E402
from records import RecordStore, run_pool  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TASK = TASKS["smollm2"]
BUDGET_R = 4
CONFIGS = {  # name: (quantization of the base, method)
    "fp32-lora": (None, "lora"),
    "nf4-lora": ("nf4", "lora"),
    "nf4-ard": ("nf4", "ard"),
    "nf4-elalora": ("nf4", "elalora"),
    "fp32-ard": (None, "ard"),
    "fp32-elalora": (None, "elalora"),
    "int8-lora": ("int8", "lora"),
    "int8-ard": ("int8", "ard"),
}
DEFAULT_CONFIGS = ["fp32-lora", "nf4-lora", "nf4-ard", "nf4-elalora"]
FALLBACK_LRS = {"lora": 1e-2, "ard": 1e-2, "elalora": 3e-2}  # quality_smollm2.md's choices
MB = 1024 * 1024


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def weight_bytes(model) -> int:
    """Bytes of the model's weights as held: parameters and buffers, and the scales bitsandbytes keeps beside its
    4-bit bytes (quant_state: absmax, the nested absmax and its code)."""
    import torch

    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        for holder in (state, getattr(state, "state2", None)):
            for name in ("absmax", "code"):
                value = getattr(holder, name, None)
                if isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
    return total


def learning_rate(method: str) -> float:
    store = RecordStore(RESULTS / "quality_smollm2.json", record_key)
    return chosen_lr(store, "smollm2", method, TASK["steps"]) or FALLBACK_LRS[method]


def run_one(config: str, seed: int, steps: int, threads: int, command: str) -> dict:
    """Train and evaluate one (config, seed) in this (fresh) process; returns the record."""
    import torch

    from dynarank.training.estimate import lora_parameters
    from dynarank.training.loop import train_causal_lm
    from dynarank.training.models import load_causal_lm, packaged_smollm2_path
    from dynarank.training.tasks import evaluate_causal_lm

    torch.set_num_threads(threads)
    quantize, method = CONFIGS[config]
    train, val, test = study_data.dialogs()
    torch.manual_seed(seed)
    model, tokenizer = load_causal_lm(packaged_smollm2_path(), quantize=quantize)
    base_bytes, rss_loaded = weight_bytes(model), resident_bytes()
    budget = lora_parameters(model, SMOLLM2_TARGETS, BUDGET_R)
    lr = learning_rate(method)
    spec = train_spec(method, BUDGET_R, budget, lr, seed, steps, TASK, SMOLLM2_TARGETS)
    rss_training: list[int] = []
    t0 = time.perf_counter()
    done = train_causal_lm(model, tokenizer, train, spec, on_step=lambda info: rss_training.append(resident_bytes()))
    result, controller = done.metrics, done.controller
    adapter = controller.adapter_parameters() if controller is not None else result["trainable_parameters"]
    start = controller.history[0]["adapter_parameters"] if controller is not None else adapter
    return {
        "config": config,
        "quantize": quantize,
        "method": method,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "budget_parameters": budget,
        "base_weight_bytes": base_bytes,
        "rss_after_load_mb": rss_loaded / MB,
        "rss_training_peak_mb": max(rss_training) / MB,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "state_bytes_start": result["state_bytes_start"],
        "state_bytes_peak": result["state_bytes_peak"],
        "state_bytes_end": result["state_bytes_end"],
        "adapter_parameters_start": start,
        "adapter_parameters": adapter,
        "test": evaluate_causal_lm(done.model, tokenizer, test, spec.max_length),
        "val": evaluate_causal_lm(done.model, tokenizer, val, spec.max_length),
        "seconds_per_step": result["seconds_per_step"],
        "seconds": time.perf_counter() - t0,
        "threads": threads,
        "command": command,
    }


def key(record: dict) -> tuple:
    return (record["config"], record["seed"], record["steps"])


# ---------------------------------------------------------------------------------------------- tables
def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan"))


def time_ratios(runs: list[dict], config: str) -> list[float]:
    """s/step of ``config`` over fp32-lora's, per seed (runs of one seed follow each other)."""
    reference = {r["seed"]: r["seconds_per_step"] for r in runs if r["config"] == "fp32-lora"}
    return [
        r["seconds_per_step"] / reference[r["seed"]] for r in runs if r["config"] == config and r["seed"] in reference
    ]


def table_row(config: str, group: list[dict], ratios: list[float]) -> str:
    """One config's line: means over its seeds (the test loss with its standard error)."""

    def avg(field: str) -> float:
        return statistics.mean(r[field] for r in group)

    loss, se = _mean_se([r["test"]["loss"] for r in group])
    ratio = f"{statistics.mean(ratios):.2f}x" if ratios else "-"
    return (
        f"| {config} | {len(group)} | {group[0]['lr']:g} | {avg('base_weight_bytes') / MB:.0f} MB "
        f"| {avg('rss_after_load_mb'):,.0f} MB | {avg('rss_training_peak_mb'):,.0f} MB | {avg('peak_rss_mb'):,.0f} MB "
        f"| {avg('adapter_parameters_start'):,.0f} -> {avg('adapter_parameters'):,.0f} "
        f"| {avg('state_bytes_start') / MB:.2f} -> {avg('state_bytes_peak') / MB:.2f} -> "
        f"{avg('state_bytes_end') / MB:.2f} MB | {loss:.4f} ± {se:.4f} | {avg('seconds_per_step'):.2f} | {ratio} |"
    )


def markdown(runs: list[dict], commands: list[str], quick: bool) -> str:
    order = list(CONFIGS)
    configs = sorted({r["config"] for r in runs}, key=order.index)
    lines = [
        f"# Quantized base memory: SmolLM2-135M, dialog pairs, LoRA r={BUDGET_R} budget"
        + (" (QUICK)" if quick else ""),
        "",
        "Commands that produced these records (results/"
        + ("quantized_memory_quick" if quick else "quantized_memory")
        + ".json):",
        "",
        *[f"    {c}" for c in commands],
        "",
        "Peak RSS: after loading / the largest sampled after an optimizer step / the process's peak (ru_maxrss, "
        "loading included). State: trainable parameters + AdamW moments + score EMAs, start -> peak -> end. Test "
        "loss: mean ± standard error over seeds. Step time: ratio to fp32-lora of the same seed (runs one at a "
        "time under the timing lock).",
        "",
        "| config | seeds | lr | base weights | RSS after load | RSS training peak | process peak RSS | adapter params "
        "start -> end | state start -> peak -> end | test loss | s/step | vs fp32-lora |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in configs:
        group = sorted((r for r in runs if r["config"] == config), key=lambda r: r["seed"])
        lines.append(table_row(config, group, time_ratios(runs, config)))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default: {TASK['steps']}; --quick: 20)")
    parser.add_argument("--quick", action="store_true", help="seed 0, 20 steps, into quantized_memory_quick.*")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run (runs go one at a time)")
    parser.add_argument("--table-only", action="store_true", help="redraw the table from the records")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    steps = args.steps or (20 if args.quick else TASK["steps"])
    seeds = [0] if args.quick else args.seeds
    stem = "quantized_memory" + ("_quick" if args.quick else "")
    store = RecordStore(args.out / f"{stem}.json", key)
    command = "flock /tmp/dynarank-timing.lock python benchmarks/quantized_memory.py " + shlex.join(sys.argv[1:])
    if not args.table_only:
        store.note_command(command.strip())
        jobs = [(c, s, steps) for s in seeds for c in args.configs if not store.has((c, s, steps))]
        print(f"{len(jobs)} runs to do, one at a time", flush=True)

        def done(job: tuple, record: dict) -> None:
            store.add(record)
            print(
                f"{record['config']:13s} seed={record['seed']} test loss {record['test']['loss']:.4f} "
                f"state {record['state_bytes_start'] / MB:.2f} -> {record['state_bytes_end'] / MB:.2f} MB "
                f"RSS {record['rss_training_peak_mb']:.0f} MB {record['seconds_per_step']:.2f} s/step",
                flush=True,
            )

        run_pool(run_one, [(*job, args.threads, command) for job in jobs], 1, done)
    runs = [r for r in store.runs if r["steps"] == steps]
    text = markdown(runs, store.data["commands"], args.quick)
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
