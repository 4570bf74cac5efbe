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
import logging
import math
import re
import shutil
import time
from pathlib import Path

import yaml

from ..attach import linear_module_names
from ..distributed import world
from ..export import export_peft
from ..files import RunFileError, naming, read_json, replace_file, sha256_of
from ..storage import save_adapter
from ..training.data import Examples, causal_sets, classification_sets
from ..training.estimate import check_adapter_fits
from ..training.loop import (
    ALL_METHODS,
    BERT_ENCODER_LINEAR,
    DYNARANK_METHODS,
    TrainSpec,
    train_causal_lm,
    train_classifier,
)
from ..training.metrics_log import MetricsLog
from ..training.models import (
    check_max_length,
    infer_task,
    load_causal_lm,
    load_classifier,
    model_record,
    resolve_model_dir,
)
from . import report
from .train_options import DYNARANK_KNOBS, check_method_options, parse_target_modules, read_run_config

logger = logging.getLogger(__name__)


def resolve_target_modules(spec: str | list[str] | None, model) -> list[str] | str:
    """--target-modules parsed (:func:`parse_target_modules`), or the default for ``model``: every attention and
    MLP Linear of a BERT-style encoder, else all-linear."""
    parsed = parse_target_modules(spec)
    if parsed is not None:
        return parsed
    names = linear_module_names(model)
    return BERT_ENCODER_LINEAR if any(re.fullmatch(BERT_ENCODER_LINEAR, n) for n in names) else "all-linear"


def new_run_dir(out: str | None, method: str) -> Path:
    """The directory to create: it must not exist (an existing directory is refused even when empty, so that
    nothing of the user's is ever written into or removed), and no file may stand in its way."""
    path = Path(out) if out else Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() or path.is_symlink():
        hint = ""
        if (path / "config.yaml").is_file() and not (path / "summary.json").is_file():
            hint = (
                f" It holds a run that stopped before it finished: `dynarank train --resume {path}` continues it "
                "(from its last checkpoint, or from the start if it has none), or delete it."
            )
        raise FileExistsError(f"{path} already exists; choose another --out (nothing is written into it).{hint}")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise NotADirectoryError(f"{path} cannot be created: {blocker} is a file, not a directory.")
    return path


def _first_missing(path: Path) -> Path:
    """The outermost directory that creating ``path`` creates (what a failed run removes)."""
    missing = path
    for parent in path.parents:
        if parent.exists():
            break
        missing = parent
    return missing


def absolute(path: str | None) -> str | None:
    """``path`` resolved against the working directory (a run is used again from elsewhere)."""
    return None if path is None else str(Path(path).resolve())


# ---------------------------------------------------------------------------- train
def _resumed_options(opts: argparse.Namespace) -> argparse.Namespace:
    """The options a run was started with (its config.yaml), to continue it (the CLI has refused options given
    with --resume that differ from them: run_options.check_resumed_options)."""
    run = Path(opts.resume)
    saved = read_run_config(run)
    merged = {**vars(opts), **{k: v for k, v in saved.items() if k in vars(opts)}}
    merged.update(resume=str(run), out=str(run))
    if merged.get("method") not in ALL_METHODS or not isinstance(merged.get("r"), int):
        raise RunFileError(f"{run / 'config.yaml'} does not describe a run (method {merged.get('method')!r}).")
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
    resume = bool(getattr(opts, "resume", None))
    if resume:
        opts = _resumed_options(opts)
    check_method_options(opts)
    parse_target_modules(opts.target_modules)
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
    check_max_length(model, tokenizer, opts.max_length, model_dir)
    spec = _train_spec(opts, model)
    check_adapter_fits(model, spec)
    created = _first_missing(out)
    if rank == 0 and not resume:
        out.mkdir(parents=True)
    try:
        return _train_into(opts, out, model_dir, task, train, held, model, tokenizer, spec, quiet, rank)
    except BaseException:
        # A new run that failed (or was stopped) before its first checkpoint leaves nothing behind: the same
        # command can be run again. With a checkpoint, the directory stays for --resume.
        from ..checkpoint import list_checkpoints

        if rank == 0 and not resume and not list_checkpoints(out):
            shutil.rmtree(created, ignore_errors=True)
        raise


def _train_spec(opts: argparse.Namespace, model) -> TrainSpec:
    knobs = {k: getattr(opts, k) for k in DYNARANK_KNOBS if getattr(opts, k, None) is not None}
    return TrainSpec(
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


def _train_into(opts, out: Path, model_dir, task, train, held, model, tokenizer, spec, quiet, rank) -> dict:
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
        replace_file(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=True).encode())
    result = _train_with_progress(model, tokenizer, train, held, spec, out, quiet, opts, rank)
    if rank != 0:
        return {k: v for k, v in result.items() if k not in ("model", "controller")}
    summary = _write_outputs(result, tokenizer, spec, out, resolved)
    if not quiet:
        print_summary(summary, out)
    return summary


def _checkpoint_step(out: Path) -> int | None:
    """The step of the checkpoint a resumed run continues from; None when the run wrote none (it was stopped
    before its first save, or saves nothing): it then starts again from step 0, which gives the same run."""
    from ..checkpoint import latest, list_checkpoints

    if not list_checkpoints(out):
        logger.warning("dynarank: %s has no checkpoint (stopped before its first save): training it from step 0.", out)
        return None
    return latest(out)[1]["step"]


def _train_with_progress(model, tokenizer, train, held, spec, out: Path, quiet: bool, opts, rank: int = 0) -> dict:
    from tqdm.auto import tqdm

    done = _checkpoint_step(out) if getattr(opts, "resume", None) else None
    total = spec.total_steps(len(train.texts) if isinstance(train, Examples) else len(train.prompts))
    bars: list = []  # created at the first step, so that an early error prints one line only

    def bar():
        if not bars:  # on a terminal only (disable=None): a log file gets no progress lines
            bars.append(
                tqdm(total=total, initial=done or 0, desc=f"train {spec.method}", disable=quiet or None, unit="step")
            )
        return bars[0]

    metrics = MetricsLog(out / "metrics.jsonl", enabled=rank == 0)
    metrics.resume_at(done or 0)  # the log holds what the checkpoint holds: later lines are redone

    def on_step(record: dict) -> None:
        finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        metrics.write(finite)  # strict JSON: a skipped step's NaN loss is written as null
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
            resume=done is not None,
            on_nonfinite=getattr(opts, "on_nonfinite", "skip"),
            eval_every=getattr(opts, "eval_every", None),
            before_checkpoint=metrics.sync,  # the log on disk reaches every checkpoint's step
        )
        metrics.write({"step": result["steps"], "eval": result["eval"]})
    finally:
        metrics.close()
        if bars:
            bars[0].close()
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def _write_outputs(result: dict, tokenizer, spec: TrainSpec, out: Path, resolved: dict) -> dict:
    model, controller = result.pop("model"), result.pop("controller")
    if controller is not None:
        replace_file(out / "ranks.jsonl", "".join(json.dumps(s) + "\n" for s in controller.history).encode())
        save_adapter(model, out / "dynarank_adapter")
        export_peft(model, out / "adapter")
        write_adapter_info(out / "adapter", {**resolved, "method": spec.method})
    elif spec.method == "full":
        with naming(out / "model"):  # a full disk names the folder (safetensors' own error names no file)
            model.save_pretrained(out / "model")
            tokenizer.save_pretrained(out / "model")
    else:
        with naming(out / "adapter"):
            model.save_pretrained(out / "adapter")
        write_adapter_info(out / "adapter", {**resolved, "method": spec.method})
    summary = {k: v for k, v in result.items() if k != "ranks"}
    summary.update({k: resolved[k] for k in ("model", "label_names", "task", "max_length")})
    summary["final_ranks"] = result.get("ranks")
    replace_file(out / "summary.json", json.dumps(summary, indent=1).encode())
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
    """A run's summary.json, checked for what the commands read from it (errors name the file)."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a dynarank run directory (no summary.json).")
    summary = read_json(path)
    problem = None
    if summary.get("method") not in ALL_METHODS:
        problem = f"its method is {summary.get('method')!r}"
    elif summary.get("task", "classify") not in ("classify", "causal-lm"):
        problem = f"its task is {summary.get('task')!r}"
    elif summary.get("task") != "causal-lm" and not _names(summary.get("label_names")):
        problem = "it lists no label names"
    elif summary["method"] != "full" and not isinstance(summary.get("model"), str):
        problem = "it names no base model"
    elif summary.get("max_length") is not None and not _positive_int(summary["max_length"]):
        problem = f"its max_length is {summary['max_length']!r}"
    if problem:
        raise RunFileError(f"{path} is damaged: {problem}.")
    return summary


def _names(value) -> bool:
    return isinstance(value, list) and len(value) >= 2 and all(isinstance(v, str) for v in value)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


ADAPTER_INFO = "dynarank_run.json"  # base model, task and labels, written beside every PEFT adapter we write
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def write_adapter_info(adapter_dir: Path, summary: dict) -> None:
    """dynarank_run.json beside a PEFT adapter: what to load it with, and the sha256 of its weights file."""
    info = {k: summary.get(k) for k in ("model", "task", "label_names", "method", "max_length")}
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    info["adapter_sha256"] = sha256_of(weights) if weights.is_file() else None
    replace_file(Path(adapter_dir) / ADAPTER_INFO, json.dumps(info, indent=1).encode())


def read_adapter_info(adapter_dir: Path) -> dict:
    """dynarank_run.json of a PEFT adapter directory ({} when there is none), checked (errors name the file)."""
    path = Path(adapter_dir) / ADAPTER_INFO
    if not path.is_file():
        return {}
    info = read_json(path)
    kinds = {"model": str, "task": str, "method": str, "adapter_sha256": str, "max_length": int, "label_names": list}
    wrong = next((k for k, kind in kinds.items() if info.get(k) is not None and not isinstance(info[k], kind)), None)
    if wrong is None and info.get("task") not in (None, "classify", "causal-lm"):
        wrong = "task"
    if wrong is None and info.get("label_names") is not None and not _names(info["label_names"]):
        wrong = "label_names"
    if wrong is not None:
        raise RunFileError(f"{path} is damaged: its {wrong} is {info[wrong]!r}.")
    return info
