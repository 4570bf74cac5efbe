"""Memory and time of FSDP2 over the frozen base (``--fsdp``) against one process and against DDP.

For each model, the same ARD-LoRA run (all-linear targets, r=8, the same global batch, seed 0, no dropout) is
trained three ways with ``dynarank.training.loop.train_causal_lm``:

  single   one process, one thread
  fsdp     two processes (torchrun, gloo), one thread each, the frozen base sharded by ``shard_base``
  ddp      two processes, one thread each, the whole base on each (the existing DDP path), for reference

Every process reports (from itself): the bytes of the frozen base it holds (a sharded weight counts its local
shard), its RSS after the model is loaded and at the end, the RSS at the end once glibc has returned the free
memory it keeps (``malloc_trim(0)``: what the process still uses), its peak RSS (``ru_maxrss``), and the median
time of its optimizer steps (the first step, FSDP's lazy initialisation, left out). Worker 0 saves the trained tensors;
the final ranks, the rank history and the largest tensor difference are compared with the one-process run.

Models: ``tiny-llama`` (a Llama built from a config: 4 layers, hidden 64, grouped-query attention, the packaged
MiniLM tokenizer's 30,522-token vocabulary, untied head) and ``smollm2`` (the packaged SmolLM2-135M-Instruct).
Data: the packaged English dialog pairs. Run under the timing lock:

  flock /tmp/dynarank-timing.lock python benchmarks/fsdp_memory.py
  flock /tmp/dynarank-timing.lock python benchmarks/fsdp_memory.py --models tiny-llama --steps 20   # quick
  flock /tmp/dynarank-timing.lock python benchmarks/fsdp_memory.py --malloc-threshold 1048576

``--malloc-threshold N`` sets glibc's MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ to N bytes in every
process: buffers above N are mapped and unmapped one by one instead of being kept for reuse. FSDP gathers and frees
each block's weights twice per step, and by default glibc keeps those freed buffers (RSS then overstates what the
process uses).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("single", "fsdp", "ddp")
SETTINGS = {  # per model: optimizer steps, global batch, tokens per example
    "tiny-llama": {"steps": 60, "batch": 8, "max_length": 64},
    "smollm2": {"steps": 40, "batch": 8, "max_length": 64},
}


def trimmed_rss_mb() -> float:
    """RSS once the garbage is collected and glibc has returned the free memory it keeps (what is in use)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to return
        pass
    return rss_mb()


def rss_mb() -> float:
    """This process's resident set now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(model_name: str):
    """(model, tokenizer) of ``model_name``, dropout off (each worker would draw its own masks)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dynarank.training.models import load_causal_lm, packaged_minilm_path, packaged_smollm2_path

    torch.manual_seed(0)
    if model_name == "smollm2":
        model, tokenizer = load_causal_lm(packaged_smollm2_path())
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model, tokenizer


def held_base_bytes(model) -> int:
    """Bytes of the frozen base this process holds: a weight FSDP sharded counts its local shard."""
    from torch.distributed.tensor import DTensor

    from dynarank.fsdp import replicated_parameters

    replicated = {id(p) for p in replicated_parameters(model)}
    held = 0
    for p in model.parameters():
        if id(p) not in replicated:
            held += (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
    return held


def worker(model_name: str, mode: str, out_dir: Path, steps: int) -> None:
    """One process of one run: train, then write what it measured (and, worker 0, the trained tensors)."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    from dynarank.training.data import packaged_dialogs
    from dynarank.training.loop import TrainSpec, train_causal_lm

    torch.set_num_threads(1)
    if mode != "single":
        dist.init_process_group("gloo")
    rank = dist.get_rank() if mode != "single" else 0
    setting = SETTINGS[model_name]
    model, tokenizer = load(model_name)
    loaded_rss = rss_mb()
    train_set, _ = packaged_dialogs(seed=0)
    spec = TrainSpec(
        method="ard",
        r=8,
        dynarank={"head_layout": "own"},  # as recorded (ARD's default layout then)
        target_modules="all-linear",
        lr=2e-3,
        batch_size=setting["batch"],
        max_steps=steps,
        max_length=setting["max_length"],
        seed=0,
    )
    stamps: list[float] = []
    base: list[int] = []

    def on_step(record: dict) -> None:
        stamps.append(time.perf_counter())
        if record["step"] == 1:
            base.append(held_base_bytes(result_model[0]))

    result_model: list = [model]
    t0 = time.perf_counter()
    result = train_causal_lm(model, tokenizer, train_set, spec, fsdp=mode == "fsdp", on_step=on_step)
    steps = [b - a for a, b in zip([t0, *stamps], stamps)][1:]  # the first step (lazy set-up) left out
    report = {
        "model": model_name,
        "mode": mode,
        "rank": rank,
        "base_bytes": base[0],
        "rss_loaded_mb": loaded_rss,
        "rss_end_mb": rss_mb(),
        "rss_end_trimmed_mb": trimmed_rss_mb(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "median_step_s": statistics.median(steps),
        "ranks": result.metrics["ranks"],
        "history": [[h["step"], h["ranks"]] for h in result.controller.history],
        "resizes": sum(r.resized for r in result.controller.records),
        "adapter_parameters": result.metrics["adapter_parameters"],
    }
    (out_dir / f"{model_name}-{mode}-{rank}.json").write_text(json.dumps(report))
    if rank == 0:
        tensors = {n: p.detach().contiguous() for n, p in result.model.named_parameters() if p.requires_grad}
        save_file(tensors, str(out_dir / f"{model_name}-{mode}.safetensors"))
    if mode != "single":
        dist.barrier()
        dist.destroy_process_group()


def launch(model_name: str, mode: str, out_dir: Path, malloc_threshold: int | None) -> None:
    """Run ``mode`` of ``model_name`` in fresh processes (one, or two under torchrun)."""
    here = str(Path(__file__).resolve())
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if malloc_threshold is not None:
        env.update(MALLOC_MMAP_THRESHOLD_=str(malloc_threshold), MALLOC_TRIM_THRESHOLD_=str(malloc_threshold))
    args = ["--worker", model_name, mode, str(out_dir), str(SETTINGS[model_name]["steps"])]
    if mode == "single":
        cmd = [sys.executable, here, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", here, *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{model_name} {mode} failed:\n{done.stderr[-3000:]}")


def compare(out_dir: Path, model_name: str) -> dict:
    """Every mode's per-process numbers, and its ranks and tensors against the one-process run."""
    from safetensors.torch import load_file

    from dynarank.naming import ARD_ATTR

    reports = {
        m: sorted(
            (json.loads(p.read_text()) for p in out_dir.glob(f"{model_name}-{m}-*.json")), key=lambda r: r["rank"]
        )
        for m in MODES
    }
    single = reports["single"][0]
    tensors = {m: load_file(str(out_dir / f"{model_name}-{m}.safetensors")) for m in MODES}
    rows = {}
    for mode, procs in reports.items():
        diff = {
            k: float((tensors[mode][k] - tensors["single"][k]).abs().max()) if tensors[mode][k].numel() else 0.0
            for k in tensors["single"]
        }
        rows[mode] = {
            "processes": procs,
            "same_ranks_as_single": procs[0]["ranks"] == single["ranks"],
            "same_history_as_single": procs[0]["history"] == single["history"],
            "workers_agree": all(p["history"] == procs[0]["history"] for p in procs),
            "max_adapter_diff": max((v for k, v in diff.items() if ARD_ATTR not in k), default=0.0),
            "max_alpha_diff": max((v for k, v in diff.items() if ARD_ATTR in k), default=0.0),
            "largest_diffs": dict(sorted(diff.items(), key=lambda kv: -kv[1])[:3]),
            "step_time_vs_single": statistics.median(p["median_step_s"] for p in procs) / single["median_step_s"],
        }
    final_ranks = single["ranks"]
    for row in rows.values():  # histories were compared above; the record keeps the final ranks once (MBs otherwise)
        row["processes"] = [{k: v for k, v in p.items() if k not in ("history", "ranks")} for p in row["processes"]]
    return {"settings": SETTINGS[model_name], "final_ranks_single": final_ranks, "modes": rows}


def markdown(results: dict, command: str, context: dict) -> str:
    import torch
    import transformers

    lines = [
        "# FSDP2 over the frozen base: memory and time per process",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores, torch {torch.__version__} (1 thread per process), transformers "
        f"{transformers.__version__}, Python {platform.python_version()}; gloo. ARD-LoRA (r=8, all-linear), seed 0, "
        "the packaged dialog pairs; every mode the same global batch (two workers: half each). glibc thresholds: "
        f"{context['malloc_threshold'] or 'default'}. 1-minute load average on the 2 cores, at the start and after "
        f"each run: {', '.join(f'{v:.1f}' for v in context['load_average_1min'])} (other jobs shared the machine).",
        "",
        "| model | mode | processes | base MiB held / process | RSS loaded MiB | RSS end MiB | RSS end in use MiB "
        "| peak RSS MiB | median step s | step time / single | ranks = single | max adapter diff | max alpha diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for model_name, result in results.items():
        for mode, row in result["modes"].items():
            procs = row["processes"]

            def each(key: str, fmt: str = "{:.0f}", procs: list = procs) -> str:
                return " / ".join(fmt.format(p[key]) for p in procs)

            held = " / ".join(f"{p['base_bytes'] / 2**20:.2f}" for p in procs)
            rss = " | ".join(each(k) for k in ("rss_loaded_mb", "rss_end_mb", "rss_end_trimmed_mb", "peak_rss_mb"))
            lines.append(
                f"| {model_name} | {mode} | {len(procs)} | {held} | {rss} | "
                f"{each('median_step_s', '{:.3f}')} | {row['step_time_vs_single']:.2f} | "
                f"{'yes' if row['same_history_as_single'] else 'no'} (every resize) | "
                f"{row['max_adapter_diff']:.1e} | {row['max_alpha_diff']:.1e} |"
            )
    lines += [
        "",
        "Per-process values are listed worker 0 / worker 1. `base MiB held`: the frozen weights in the process "
        "(a sharded weight counts its local shard). `RSS end in use`: the RSS at the end once glibc has returned "
        "the free memory it keeps (`malloc_trim(0)`); `RSS end` and `peak RSS` include what glibc keeps for reuse, "
        "which under FSDP holds the buffers of the weights it gathers and frees for every block, twice per step.",
    ]
    for model_name, result in results.items():
        single = result["modes"]["single"]["processes"][0]
        lines.append(
            f"\n{model_name}: {result['settings']['steps']} steps, global batch {result['settings']['batch']} x "
            f"{result['settings']['max_length']} tokens; {single['resizes']} resizes; adapter parameters at the end "
            f"{single['adapter_parameters']:,}."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-llama,smollm2")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: per model)")
    parser.add_argument("--out", default=None, help="results path without suffix (default: results/fsdp_memory...)")
    parser.add_argument("--malloc-threshold", type=int, default=None, help="glibc mmap / trim threshold, bytes")
    args = parser.parse_args()
    suffix = "" if args.malloc_threshold is None else f"_malloc{args.malloc_threshold}"
    args.out = args.out or str(RESULTS / f"fsdp_memory{suffix}")
    models = args.models.split(",")
    if args.steps is not None:
        for name in models:
            SETTINGS[name]["steps"] = args.steps
    command = "flock /tmp/dynarank-timing.lock python benchmarks/fsdp_memory.py" + "".join(
        f" {a}" for a in sys.argv[1:]
    )
    results: dict = {}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for mode in MODES:
                print(f"{name} {mode} ...", flush=True)
                launch(name, mode, Path(tmp), args.malloc_threshold)
                load.append(os.getloadavg()[0])
            results[name] = compare(Path(tmp), name)
    out = Path(args.out)
    context = {"malloc_threshold": args.malloc_threshold, "load_average_1min": load}
    out.with_suffix(".json").write_text(json.dumps({"command": command, **context, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown(results, command, context))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], Path(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
