"""What the CLI commands do: a run directory that tells the whole story of one training run.

RUN_DIR/
  config.yaml          resolved options
  metrics.jsonl        per step: loss, lr, trainable parameters, total rank; last line: eval metrics
  ranks.jsonl          rank of every group, at the start, at every resize and at the end
  summary.json         method, parameters, metrics, final rank of every module, wall time, peak memory
  adapter/             plain PEFT adapter (stock PeftModel.from_pretrained loads it)
  dynarank_adapter/    native adapter with its rank layout (dynarank methods)
  model/               the full model (method 'full')
  ranks_heatmap.png, ranks_over_time.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import yaml

from . import report
from .attach import linear_module_names
from .data import Examples, causal_sets, classification_sets
from .distributed import world
from .export import export_peft
from .io import save_adapter
from .loop import BERT_ENCODER_LINEAR, DYNARANK_METHODS, TrainSpec, train_causal_lm, train_classifier
from .models import infer_task, load_causal_lm, load_classifier, model_record, resolve_model_dir
from .run_options import DYNARANK_KNOBS, check_method_options


def resolve_target_modules(spec: str | list[str] | None, model) -> list[str] | str:
    if isinstance(spec, (list, tuple)):  # a YAML list, or the resolved list a run directory records
        return list(spec)
    if spec:
        if spec == "all-linear" or re.search(r"[\\.*()\[\]|^$+?]", spec):
            return spec
        return [s.strip() for s in spec.split(",") if s.strip()]
    names = linear_module_names(model)
    return BERT_ENCODER_LINEAR if any(re.fullmatch(BERT_ENCODER_LINEAR, n) for n in names) else "all-linear"


def new_run_dir(out: str | None, method: str) -> Path:
    """The directory to create: it must not exist (or be empty), and no file may stand in its way."""
    path = Path(out) if out else Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not empty; choose another --out.")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise NotADirectoryError(f"{path} cannot be created: {blocker} is a file, not a directory.")
    return path


def absolute(path: str | None) -> str | None:
    """``path`` resolved against the working directory (a run is used again from elsewhere)."""
    return None if path is None else str(Path(path).resolve())


# ---------------------------------------------------------------------------- train
def _resumed_options(opts: argparse.Namespace) -> argparse.Namespace:
    """The options a run was started with (its config.yaml), to continue it."""
    run = Path(opts.resume)
    config = run / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{run} is not a dynarank run directory (no config.yaml); nothing to resume.")
    saved = yaml.safe_load(config.read_text(encoding="utf-8"))
    merged = {**vars(opts), **{k: v for k, v in saved.items() if k in vars(opts)}}
    merged.update(resume=str(run), out=str(run))
    return argparse.Namespace(**merged)


def seed_everything(seed: int) -> None:
    """Seed every random stream a run draws from before training starts (Python's, torch's, every GPU's)."""
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def init_distributed() -> tuple[int, int]:
    """Join the process group that torchrun / accelerate launch describe in the environment."""
    import os

    import torch
    import torch.distributed as dist

    if (
        os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    ):
        raise ValueError(
            "FSDP and DeepSpeed ZeRO shard parameters into flat buffers, which dynarank cannot resize; "
            "launch with plain data parallelism (torchrun, or accelerate launch without FSDP/DeepSpeed)."
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return world()


def _shared_run_dir(opts: argparse.Namespace, rank: int, n_workers: int) -> Path:
    """Rank 0 chooses (and checks) the run directory; every worker gets the same path."""
    if getattr(opts, "resume", None):
        return Path(opts.resume)
    chosen = [str(new_run_dir(opts.out, opts.method)) if rank == 0 else None]
    if n_workers > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def train_command(opts: argparse.Namespace, quiet: bool = False) -> dict:
    rank, n_workers = init_distributed()
    quiet = quiet or rank != 0
    if getattr(opts, "resume", None):
        opts = _resumed_options(opts)
    check_method_options(opts)
    model_dir = resolve_model_dir(opts.model)
    task = opts.task or infer_task(model_dir)
    out = _shared_run_dir(opts, rank, n_workers)
    # What loading creates at random (a new task head for these labels) follows --seed too, so that two runs with
    # the same options are the same run, and a resumed run can be checked against an uninterrupted one.
    seed_everything(opts.seed)
    if task == "classify":
        train, held = classification_sets(
            opts.data, opts.eval_data, opts.eval_split, opts.text_column, opts.label_column, opts.n_train, opts.seed
        )
        model, tokenizer = load_classifier(model_dir, train.label_names)
    else:
        prompt_col, response_col = getattr(opts, "prompt_column", None), getattr(opts, "response_column", None)
        train, held = causal_sets(opts.data, opts.eval_data, opts.eval_split, prompt_col, response_col, opts.seed)
        model, tokenizer = load_causal_lm(model_dir)
    knobs = {k: getattr(opts, k) for k in DYNARANK_KNOBS if getattr(opts, k, None) is not None}
    existed = out.exists()  # new_run_dir allows only an empty one
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    try:
        return _train_into(opts, out, model_dir, task, train, held, model, tokenizer, knobs, quiet, rank)
    except BaseException:
        # A run that failed (or was stopped) before its first checkpoint leaves nothing behind: the same
        # command can be run again. With a checkpoint, the directory stays for --resume.
        from .checkpoint import list_checkpoints

        if rank == 0 and not getattr(opts, "resume", None) and not list_checkpoints(out):
            shutil.rmtree(out, ignore_errors=True)
            if existed:
                out.mkdir()
        raise


def _train_into(opts, out: Path, model_dir, task, train, held, model, tokenizer, knobs, quiet, rank) -> dict:
    spec = TrainSpec(
        method=opts.method,
        r=opts.r,
        target_modules=resolve_target_modules(opts.target_modules, model),
        lr=opts.lr,
        epochs=opts.epochs,
        max_steps=opts.max_steps,
        batch_size=opts.batch_size,
        max_length=opts.max_length,
        seed=opts.seed,
        dynarank=knobs if opts.method in DYNARANK_METHODS else {},
    )
    resolved = {k: v for k, v in vars(opts).items() if k not in ("command", "verbose", "resume")}
    resolved.update(
        model=model_record(opts.model),  # a GGUF folder or 'smollm2', not its cached copy: resolved again on use
        data=absolute(opts.data),
        eval_data=absolute(opts.eval_data),
        config=absolute(opts.config),
        task=task,
        label_names=getattr(train, "label_names", None),
        target_modules=spec.target_modules,
    )
    if not getattr(opts, "resume", None) and rank == 0:
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=True))
    result = _train_with_progress(model, tokenizer, train, held, spec, out, quiet, opts, rank)
    if rank != 0:
        return {k: v for k, v in result.items() if k not in ("model", "controller")}
    summary = _write_outputs(result, tokenizer, spec, out, resolved)
    if not quiet:
        print_summary(summary, out)
    return summary


def _train_with_progress(model, tokenizer, train, held, spec, out: Path, quiet: bool, opts, rank: int = 0) -> dict:
    from tqdm.auto import tqdm

    from .checkpoint import latest

    resume = bool(getattr(opts, "resume", None))
    done = latest(out)[1]["step"] if resume else 0
    total = spec.total_steps(len(train.texts) if isinstance(train, Examples) else len(train.prompts))
    bars: list = []  # created at the first step, so that an early error prints one line only

    def bar():
        if not bars:
            bars.append(tqdm(total=total, initial=done, desc=f"train {spec.method}", disable=quiet, unit="step"))
        return bars[0]

    metrics_file = out / "metrics.jsonl"
    kept = []
    if resume and metrics_file.is_file():  # drop what was logged after the checkpoint: it is redone
        kept = [
            line
            for line in metrics_file.read_text().splitlines()
            if json.loads(line).get("step", 0) <= done and "loss" in json.loads(line)  # not the final eval line
        ]
    metrics = metrics_file.open("w") if rank == 0 else open(os.devnull, "w")
    metrics.writelines(line + "\n" for line in kept)

    def on_step(record: dict) -> None:
        finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        metrics.write(json.dumps(finite) + "\n")  # strict JSON: a skipped step's NaN loss is written as null
        bar().update(1)
        bar().set_postfix(loss=f"{record['loss']:.3f}", rank=record["total_rank"])

    t0 = time.perf_counter()
    try:
        fit = train_classifier if isinstance(train, Examples) else train_causal_lm
        result = fit(
            model,
            tokenizer,
            train,
            spec,
            eval_set=held,
            on_step=on_step,
            run_dir=out,
            save_every=getattr(opts, "save_every", None),
            resume=resume,
            on_nonfinite=getattr(opts, "on_nonfinite", "skip"),
            eval_every=getattr(opts, "eval_every", None),
        )
        metrics.write(json.dumps({"step": result["steps"], "eval": result["eval"]}) + "\n")
    finally:
        metrics.close()
        if bars:
            bars[0].close()
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def _write_outputs(result: dict, tokenizer, spec: TrainSpec, out: Path, resolved: dict) -> dict:
    model, controller = result.pop("model"), result.pop("controller")
    if controller is not None:
        with (out / "ranks.jsonl").open("w") as f:
            for snapshot in controller.history:
                f.write(json.dumps(snapshot) + "\n")
        save_adapter(model, out / "dynarank_adapter")
        export_peft(model, out / "adapter")
        write_adapter_info(out / "adapter", {**resolved, "method": spec.method})
    elif spec.method == "full":
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    else:
        model.save_pretrained(out / "adapter")
        write_adapter_info(out / "adapter", {**resolved, "method": spec.method})
    summary = {k: v for k, v in result.items() if k != "ranks"}
    summary.update({k: resolved[k] for k in ("model", "label_names", "task", "max_length")})
    summary["final_ranks"] = result.get("ranks")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    report.draw(out)
    return summary


def print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dynarank run: {out}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("method", summary["method"])
    table.add_row(
        "trainable parameters (start -> end)",
        f"{summary['trainable_parameters_start']:,} -> {summary['trainable_parameters']:,}",
    )
    if summary.get("adapter_parameters") is not None:
        table.add_row("adapter parameters", f"{summary['adapter_parameters']:,}")
    for key, value in summary.get("eval", {}).items():
        table.add_row(key, f"{value:.4f}")
    table.add_row("steps / wall time", f"{summary['steps']} / {summary['wall_seconds']:.0f} s")
    table.add_row("peak memory", f"{summary['peak_rss_mb']:.0f} MB")
    for warning in summary.get("warnings") or []:
        table.add_row("warning", warning)
    Console().print(table)


# ---------------------------------------------------------------------------- other commands
def read_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a dynarank run directory (no summary.json).")
    return json.loads(path.read_text())


ADAPTER_INFO = "dynarank_run.json"  # base model, task and labels, written beside every PEFT adapter we write


def write_adapter_info(adapter_dir: Path, summary: dict) -> None:
    info = {k: summary.get(k) for k in ("model", "task", "label_names", "method", "max_length")}
    (Path(adapter_dir) / ADAPTER_INFO).write_text(json.dumps(info, indent=1))
