"""One training loop for every method: dynarank's, and the stock PEFT / full baselines (:mod:`.methods`).

Used by the CLI and the benchmarks, so every method gets the same data order, schedule and
evaluation. Dynarank methods are driven through the optimizer's step hooks (no per-method code
in the loop); a baseline's documented per-step call (stock AdaLoRA's ``update_and_allocate``) comes from
:func:`.methods.stock_step`.
"""

from __future__ import annotations

import logging
import math
import re
import resource
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import clip_grad_norm_

from .. import checkpoint
from ..attach import adapter_parameter_count, attach, count_trainable, linear_module_names, start_rank
from ..config import DEFAULT_START_RANK, ConfigError, DynaRankConfig
from ..controllers import RankController, build_controller
from ..defaults import RANK_BUDGET_METHODS, TASKS, budget_of, default_lr, source, task_of
from ..distributed import ResizedGradientSync, check_same_ranks, default_device, world, wrap
from ..fsdp import shard_base
from ..guards import first_nonfinite_module, nonfinite_gradients
from ..optim_state import state_bytes
from ..rank_init import init_ranks, needs_rank_init
from .data import Examples
from .estimate import linear_targets
from .lr_search import AUTO, RateSearch, search_rate
from .methods import (
    ALL_METHODS,
    DATA_INIT_BASELINES,
    DYNARANK_METHODS,
    build_baseline,
    check_knobs,
    data_init_baseline,
    stock_allocator_bytes,
    stock_step,
)
from .tasks import (
    IGNORE_INDEX,
    CausalExamples,
    NonFiniteError,
    batches,
    encode_causal,
    encode_classification,
    evaluate_causal_lm,
    evaluate_classifier,
)

logger = logging.getLogger(__name__)

# Every attention and MLP Linear of a BERT-style encoder (not the pooler, not the classifier).
BERT_ENCODER_LINEAR = r".*layer\.\d+\..*(query|key|value|dense)"


def default_target_modules(model: nn.Module) -> str:
    """The modules to adapt when none are named: every attention and MLP Linear of a BERT-style encoder, else
    'all-linear' (every Linear but the task head)."""
    names = linear_module_names(model)
    return BERT_ENCODER_LINEAR if any(re.fullmatch(BERT_ENCODER_LINEAR, n) for n in names) else "all-linear"


@dataclass
class TrainSpec:
    """What to train and how; the same fields for every method."""

    method: str = "ard"
    # None: 8, or for a dynarank method given a budget (target_params) the start the defaults study gave it at that
    # budget, resolved by for_model against the model's targets (dynarank.attach.start_rank); r_source says which
    r: int | None = None
    target_modules: list[str] | str = BERT_ENCODER_LINEAR
    # None: the method's default for `task` (dynarank.defaults); 'auto': a range test around it on the training data
    # before the run (lr_search.py); lr_source says which
    lr: float | str | None = None
    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    # Clip the total gradient norm of the trainable parameters to this before each update (None: no clipping). It
    # clips the loss's gradients only: a controller's own terms (ARD's priors, the SVD methods' orthogonality) join
    # in the optimizer's pre-step hook, after the clip, as in transformers' Trainer with DynaRankTrainer.
    max_grad_norm: float | None = None
    # Further config fields: a dynarank method's (DynaRankConfig fields), or those a baseline takes (ortho_weight for
    # stock AdaLoRA); full fine-tuning ignores r and target_modules.
    dynarank: dict[str, Any] = field(default_factory=dict)
    # What kind of model trains: it picks the table of default rates. train() follows the model it is given
    # (for_model), so only a spec whose rate is read before training (the CLI's record) needs to set it.
    task: str = "classify"
    lr_source: str | None = None  # set here: 'given', or which table of defaults the rate came from
    # The adapter budget as plain LoRA's rank on the targets (budget_on), which a default rate follows
    # (dynarank.defaults.BUDGET_LR); None: no budget. Set by for_model from the model's targets.
    budget_r: float | None = None
    r_source: str | None = None  # set here: 'given', 'default', or the budget the start was chosen at

    def __post_init__(self) -> None:
        if self.method not in ALL_METHODS:
            raise ConfigError("method", f"{self.method!r} is not known; choose one of {', '.join(ALL_METHODS)}.")
        if self.task not in TASKS:
            raise ConfigError("task", f"{self.task!r} is not known; choose one of {', '.join(TASKS)}.")
        if self.lr is None:
            self.lr = default_lr(self.method, self.task, self.budget_r)
            self.lr_source = source(self.task, self.budget_r, self.method)
        elif self.lr == AUTO:
            default_lr(self.method, self.task)  # a method without a default has nothing to search around
            self.lr_source = AUTO
        elif isinstance(self.lr, (str, bool)):
            raise ValueError(f"lr must be a positive number, 'auto' or None, not {self.lr!r}.")
        elif self.lr_source is None:
            self.lr_source = "given"
        if self.r is None and not self.starts_from_budget:
            self.r, self.r_source = DEFAULT_START_RANK, "default"
        elif self.r_source is None and self.r is not None:
            self.r_source = "given"
        bad_r = self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1)
        if self.batch_size < 1 or (self.lr != AUTO and self.lr <= 0) or bad_r:
            raise ValueError("batch_size and r must be positive integers and lr a positive number.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be a positive number or None, not {self.max_grad_norm!r}.")
        check_knobs(self.method, self.config_fields())

    @property
    def starts_from_budget(self) -> bool:
        """Whether r, unset, is the start the defaults study gave the method at its budget (a dynarank method with
        ``target_params``), to be resolved against the model (:meth:`for_model`)."""
        return self.method in DYNARANK_METHODS and self.dynarank.get("target_params") is not None

    def for_model(self, model: nn.Module) -> TrainSpec:
        """This spec for ``model``: its kind of task (:func:`dynarank.defaults.task_of`), the budget as plain LoRA's
        rank on its targets, and an unset start rank resolved there. A given rate stays; a default one becomes the
        default of that kind and budget."""
        spec, budget = self, self.budget_on(model)
        if spec.r is None:
            r = start_rank(model, DynaRankConfig(method=spec.method, **spec.config_fields()))
            where = f"the defaults study's start at this budget ({budget:.3g} plain LoRA ranks; docs/defaults.md)"
            spec = replace(spec, r=r, r_source=where)
        return spec.for_task(task_of(model), budget)

    def budget_on(self, model: nn.Module) -> float | None:
        """The adapter budget as plain LoRA's rank on the Linear modules the spec targets in ``model``
        (dynarank.defaults.budget_of: r for a fixed rank, a rank controller's target; None without one)."""
        if self.method not in RANK_BUDGET_METHODS + DYNARANK_METHODS:
            return None  # full fine-tuning
        knobs = self.config_fields() if self.method in DYNARANK_METHODS else {}
        shapes = [(m.in_features, m.out_features) for m in linear_targets(model, self.target_modules).values()]
        return budget_of(self.method, knobs.get("r", self.r), knobs, shapes)

    def for_task(self, task: str, budget_r: float | None = None) -> TrainSpec:
        """This spec for a model of ``task`` and an adapter budget of ``budget_r`` plain LoRA ranks: a given rate
        stays, a default one becomes that task's default at that budget."""
        if (task, budget_r) == (self.task, self.budget_r):
            return self
        if self.lr_source == "given" or self.lr == AUTO:
            return replace(self, task=task, budget_r=budget_r)
        return replace(self, task=task, budget_r=budget_r, lr=None, lr_source=None)

    def config_fields(self) -> dict[str, Any]:
        """The config fields of the run: for a dynarank method, what its DynaRankConfig is built from."""
        if self.method not in DYNARANK_METHODS:
            return dict(self.dynarank)
        return {"r": self.r, "seed": self.seed, "target_modules": self.target_modules, **self.dynarank}

    def total_steps(self, n_examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * math.ceil(n_examples / self.batch_size)))


SHARE = "dynarank_share"  # key of an init batch: the worker's shard's share of the global batch (not a model input)


def _weighted_loss(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """A shard's loss scaled as training scales it (DDP's mean of shard means is the batch mean)."""
    return model(**{k: v for k, v in batch.items() if k != SHARE}).loss * batch.get(SHARE, 1.0)


def prepare_model(
    model: nn.Module,
    spec: TrainSpec,
    total_steps: int,
    *,
    init_batches: Callable[[], Iterable[Mapping]] | None = None,
    restoring: bool = False,
    on_init_batch: Callable[[int, int], None] | None = None,
) -> tuple[nn.Module, RankController | None]:
    """Adapt ``model`` for ``spec.method``; returns (model to train, dynarank controller or None).

    ``init_batches()`` gives the training batches (dicts, key SHARE optional) of a method that starts from data:
    ARD with ``rank_init='data'`` (measured once: ``restoring`` a checkpoint takes its layout instead) or stock EVA
    (run again on a resume: deterministic, and it sets the adapter's shapes)."""
    if spec.method in DYNARANK_METHODS:
        attach(model, DynaRankConfig(method=spec.method, **spec.config_fields()))
        if needs_rank_init(model) and not restoring:
            if init_batches is None:
                raise ConfigError("rank_init", "'data' needs the training batches to measure the starting ranks on.")
            init_ranks(model, init_batches(), loss_fn=_weighted_loss, on_batch=on_init_batch, total_steps=total_steps)
        return model, build_controller(model, total_steps, restoring=restoring)
    model = build_baseline(model, spec.method, spec.r, spec.target_modules, total_steps, spec.dynarank)
    if spec.method in DATA_INIT_BASELINES:
        if init_batches is None:
            raise ConfigError("method", f"{spec.method!r} initialises from the training batches: give them.")
        data_init_baseline(model, spec.method, init_batches())
    return model, None


@dataclass
class TrainResult:
    """What :func:`train` returns: the run's numbers (JSON-ready), and the trained model and its controller."""

    metrics: dict[str, Any]
    model: nn.Module
    controller: RankController | None = None


MAX_SKIPPED_IN_A_ROW = 10


def _kept_checkpoint(run_dir: str | Path | None) -> str:
    """What a stopped run leaves, for the stop message. No advice to resume: with the same settings a resumed run
    meets the same values again (the CLI says how to train again with others)."""
    saved = checkpoint.list_checkpoints(run_dir) if run_dir is not None else []
    if saved:
        return f"The last checkpoint, {saved[-1]}, is kept."
    return "No checkpoint was written."


def training_state_bytes(
    model: nn.Module, optimizer: torch.optim.Optimizer, controller: RankController | None = None
) -> int:
    """Bytes of the trainable parameters, their optimizer state and the rank controller's own tensors
    (importance scores and their gathers: dynarank's SVD methods, or stock PEFT AdaLoRA's allocator): what training
    holds beyond the frozen model and the activations, and what a resize can shrink."""
    params = [p for p in model.parameters() if p.requires_grad]
    held = controller.held_bytes() if controller is not None else stock_allocator_bytes(model)
    return sum(p.numel() * p.element_size() for p in params) + state_bytes(optimizer, params) + held


class TrainingFootprint:
    """Trainable parameters and training-state bytes after every optimizer step: their peak and mean over the run.

    Running totals (steps counted, sums, peaks), which a checkpoint stores (:meth:`to_dict`) so that a resumed run's
    figures cover every step of the run, as an uninterrupted run's do (the sums are of integers: exact)."""

    def __init__(self, state: dict | None = None) -> None:
        state = state or {}
        self.steps = int(state.get("steps", 0))
        self.params_sum, self.params_peak = int(state.get("params_sum", 0)), int(state.get("params_peak", 0))
        self.bytes_sum, self.bytes_peak = int(state.get("bytes_sum", 0)), int(state.get("bytes_peak", 0))
        self.last_bytes: int | None = None

    def add(self, params: int, state: int) -> None:
        self.steps += 1
        self.params_sum, self.params_peak = self.params_sum + params, max(self.params_peak, params)
        self.bytes_sum, self.bytes_peak = self.bytes_sum + state, max(self.bytes_peak, state)
        self.last_bytes = state

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "params_sum": self.params_sum,
            "params_peak": self.params_peak,
            "bytes_sum": self.bytes_sum,
            "bytes_peak": self.bytes_peak,
        }

    def summary(self) -> dict:
        if not self.steps:
            return {}
        return {
            "state_bytes_peak": self.bytes_peak,
            "state_bytes_mean": self.bytes_sum / self.steps,
            "trainable_parameters_peak": self.params_peak,
            "trainable_parameters_mean": self.params_sum / self.steps,
        }


def shard_share(labels: torch.Tensor, rank: int, n: int) -> float:
    """Worker ``rank``'s weight for its shard's mean loss, so that the mean over the ``n`` workers of the weighted
    losses is the global batch's mean loss: n x (its part of what the loss averages over). A classifier's loss
    averages over examples (labels (B,)); a causal LM's over the label tokens it predicts (labels (B, T): positions
    1.. that are not -100), whose number differs between shards of the same number of examples."""
    if labels.dim() == 1:
        return len(labels[rank::n]) * n / len(labels)
    counted = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): the tokens a shifted causal-LM loss averages over
    return float(counted[rank::n].sum()) * n / max(1, float(counted.sum()))


def smallest_global_batch(n_examples: int, batch_size: int, total_steps: int) -> int:
    """The fewest examples any of the run's ``total_steps`` global batches holds: an epoch's last batch holds what is
    left of it (n_examples % batch_size), and the run reaches it only if it lasts a whole epoch."""
    per_epoch = math.ceil(n_examples / batch_size)
    left = n_examples % batch_size
    return left if left and total_steps >= per_epoch else min(batch_size, n_examples)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    # Each epoch's order follows from (seed, epoch) alone, so a resumed run finds its place by step.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def build_optimizer(model: nn.Module, controller: RankController | None, spec: TrainSpec) -> torch.optim.Optimizer:
    """AdamW over what trains: the controller's parameter groups (ARD's alphas in their own), or every trainable
    parameter of a baseline."""
    if controller is not None:
        return controller.build_optimizer(lr=spec.lr, weight_decay=spec.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


LR_SCHEDULE = "linear"  # linear_schedule's name in a run's records (transformers' name for the same schedule)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """W, the steps of :func:`linear_schedule`'s warm-up: ``warmup_ratio`` of the run, at least one."""
    return max(1, round(warmup_ratio * total_steps))


def linear_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """The loop's learning-rate schedule: linear warm-up over ``warmup_ratio`` of the steps (at least one), then
    linear decay to 0 at ``total_steps``: factor(t) = min((t + 1) / W, (T - t) / (T - W))."""
    warm = warmup_steps(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: min((t + 1) / warm, max(0.0, (total_steps - t) / max(1, total_steps - warm)))
    )


def optimizer_record(spec: TrainSpec, total_steps: int) -> dict[str, Any]:
    """What a run's records say of its optimizer beyond the rate: the learning-rate schedule the loop drives it with
    (:func:`linear_schedule`, its warm-up in steps of this run of ``total_steps``) and AdamW's weight decay."""
    warm = warmup_steps(total_steps, spec.warmup_ratio)
    schedule = {"name": LR_SCHEDULE, "warmup_ratio": spec.warmup_ratio, "warmup_steps": warm}
    return {"lr_schedule": schedule, "weight_decay": spec.weight_decay}


@dataclass
class RunControl:
    """How :func:`train` checkpoints, evaluates and reacts to non-finite steps (all optional)."""

    run_dir: str | Path | None = None  # where checkpoints go (``run_dir/checkpoints``)
    save_every: int | None = None  # checkpoint the whole training state every that many optimizer steps
    resume: bool = False  # continue from the newest complete checkpoint in run_dir
    on_nonfinite: str = "skip"  # 'skip' a NaN/inf step, or 'stop' (NonFiniteError)
    eval_every: int | None = None  # also evaluate every that many steps (the step record carries ``eval``)
    on_step: Callable[[dict], None] | None = None  # called with every step's record
    on_init_batch: Callable[[int, int], None] | None = None  # (done, total) per batch of a rank init's data pass
    before_checkpoint: Callable[[], None] | None = None  # called before each checkpoint is written
    fsdp: bool = False  # shard the frozen base over the workers (FSDP2, dynarank.fsdp); one worker: nothing to shard

    def __post_init__(self) -> None:
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or self.eval_every < 1):
            raise ValueError(f"eval_every must be a positive number of steps, got {self.eval_every!r}.")
        if self.on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {self.on_nonfinite!r}.")
        if (self.save_every or self.resume) and self.run_dir is None:
            raise ValueError("checkpointing needs a run directory.")


def train(
    model: nn.Module,
    encoded: dict,
    pad_id: int,
    spec: TrainSpec,
    evaluate: Callable[[nn.Module], dict] | None = None,
    **control: Any,
) -> TrainResult:
    """Train ``model`` on an encoded data set (see :mod:`dynarank.training.tasks`) with ``spec``.

    ``control``: the fields of :class:`RunControl`. With ``run_dir`` and ``save_every``, the whole training state is
    checkpointed every ``save_every`` optimizer steps; ``resume=True`` continues from the newest complete checkpoint
    and ends bitwise equal (CPU) to an uninterrupted run. ``on_nonfinite``: 'skip' drops a step whose loss or
    gradient is NaN/inf (naming the modules), 'stop' raises :class:`NonFiniteError` (naming the last checkpoint, if
    any, which is kept); under 'skip', MAX_SKIPPED_IN_A_ROW skipped steps in a row stop training too. ``eval_every``:
    also evaluate every that many steps (the record passed to ``on_step`` then carries ``eval``).
    ``before_checkpoint`` is called before each checkpoint is written (the CLI syncs its log to disk, so that the log
    always reaches the newest checkpoint). ``fsdp``: with several workers, shard the frozen base over them
    (:func:`dynarank.fsdp.shard_base`) instead of wrapping the model in DDP; what trains stays replicated, and its
    gradients are averaged once per step, before anything reads them.
    """
    run_control = RunControl(**control)
    restored = checkpoint.latest(run_control.run_dir) if run_control.resume else None  # read once, used twice
    spec, search = _resolve_rate(model, encoded, pad_id, spec.for_model(model), run_control, restored)
    loop = _Loop(model, encoded, pad_id, spec, run_control, search, restored)
    t0 = time.perf_counter()
    loop.run(evaluate)
    return loop.result(time.perf_counter() - t0, evaluate)


def _resolve_rate(
    model: nn.Module, encoded: dict, pad_id: int, spec: TrainSpec, control: RunControl, restored: tuple | None
) -> tuple[TrainSpec, RateSearch | None]:
    """``spec`` with a number for its rate: lr='auto' runs the range test (lr_search.py) on copies of ``model``, or,
    resuming, reads the choice from the checkpoint the run continues from (``restored``: checkpoint.latest's)."""
    if spec.lr != AUTO:
        return spec, None
    if restored is not None:
        found = restored[1].get("extra", {}).get("lr_search")
        if found is None:
            raise ConfigError("lr", "'auto': the checkpoint holds no rate search to continue with; give the rate.")
        search = RateSearch(**found)
    else:

        def train_probe(probe: nn.Module, probe_set: dict, probe_spec: TrainSpec, stop_after: int) -> nn.Module:
            probe_control = RunControl(on_nonfinite=control.on_nonfinite, fsdp=control.fsdp)  # sharded as the run is
            loop = _Loop(probe, probe_set, pad_id, probe_spec, probe_control)
            loop.run(None, stop_after=stop_after)
            return loop.model

        total = spec.total_steps(len(encoded["input_ids"]))
        search = search_rate(model, encoded, pad_id, spec, train_probe, total)
    return replace(spec, lr=search.chosen, lr_source=search.lr_source), search


class _Loop:
    """One run of :func:`train`: the model, its optimizer, schedule and controller, and where the run stands."""

    def __init__(
        self,
        model: nn.Module,
        encoded: dict,
        pad_id: int,
        spec: TrainSpec,
        control: RunControl,
        lr_search: RateSearch | None = None,
        restored: tuple | None = None,
    ) -> None:
        self.encoded, self.pad_id, self.spec, self.control = encoded, pad_id, spec, control
        self.lr_search = lr_search
        torch.manual_seed(spec.seed)
        self.n_examples = len(encoded["input_ids"])
        self.total = spec.total_steps(self.n_examples)
        self.rank, self.n_workers = world()
        smallest = smallest_global_batch(self.n_examples, spec.batch_size, self.total)
        if smallest < self.n_workers:  # a worker would get an empty shard (every worker refuses it alike)
            raise ConfigError(
                "batch_size",
                f"a global batch of this run holds {smallest} example(s) ({self.n_examples} examples in batches of "
                f"{spec.batch_size}), fewer than its {self.n_workers} workers, each of which needs one: choose a batch "
                "size whose last batch of an epoch holds at least that many, or train on fewer workers.",
            )
        model.to(default_device())
        t0 = time.perf_counter()
        self.model, self.controller = prepare_model(
            model,
            spec,
            self.total,
            init_batches=self.init_batches,
            restoring=control.resume,
            on_init_batch=control.on_init_batch,
        )
        self.init_seconds = time.perf_counter() - t0  # attaching, and the data pass of a method that starts from data
        if self.controller is not None:  # the last step is checkpointed before finish() folds E (run())
            self.controller.fold_after_last_step = False
        if self.n_workers > 1 and getattr(self.controller, "rank_init", None) is not None and not control.resume:
            check_same_ranks(self.controller)  # the statistics were reduced: every worker must have set the same ranks
        state = tensors = None
        if control.resume:
            _, state, tensors = restored or checkpoint.latest(control.run_dir)
            checkpoint.restore_model(self.model, state, tensors)
        self.model.train()
        self.device = next(self.model.parameters()).device
        self.optimizer = build_optimizer(self.model, self.controller, spec)
        self.scheduler = linear_schedule(self.optimizer, self.total, spec.warmup_ratio)
        self.step = self.resumed_at = 0
        extra = {}
        if control.resume:
            checkpoint.restore_training(self.optimizer, self.scheduler, self.controller, state, tensors)
            self.step = self.resumed_at = state["step"]
            extra = state["extra"]
        self.start_params = extra.get("start_params", 0) if control.resume else count_trainable(self.model)
        self.state_bytes_start = extra.get("state_bytes_start")
        # Every step of the run, and the skipped ones: a resumed run carries on the checkpoint's counts
        self.footprint = TrainingFootprint(extra.get("footprint"))
        self.skipped, self.in_a_row = int(extra.get("skipped_steps", 0)), int(extra.get("skipped_in_a_row", 0))
        self.sync = None  # under FSDP: averages the replicated (trainable) parameters' gradients, once per step
        if control.fsdp and self.n_workers == 1:
            logger.info("dynarank: fsdp in one process: nothing to shard, the model trains whole")
        elif control.fsdp:
            shard_base(self.model)
            self.sync = ResizedGradientSync(self.model, layout_version=self._layout_version, known=())
        self.train_model = self.model if self.sync is not None else wrap(self.model)
        self.stock_update = stock_step(self.model, spec.method)

    def _layout_version(self) -> int:
        """Changes whenever a resize replaced parameters (the controller records a snapshot at every resize)."""
        return len(self.controller.history) if self.controller is not None else 0

    def global_batches(self, start: int) -> Iterator[tuple]:
        """The run's global batches (ids, mask, labels, idx) from optimizer step ``start`` to its end, in order:
        each epoch's order follows from (seed, epoch), so any step finds its batch."""
        per_epoch = math.ceil(self.n_examples / self.spec.batch_size)
        step = start
        while step < self.total:
            epoch, offset = divmod(step, per_epoch)
            order = _epoch_order(self.n_examples, self.spec.seed, epoch)[offset * self.spec.batch_size :]
            for batch in batches(self.encoded, order, self.spec.batch_size, self.pad_id):
                yield batch
                step += 1
                if step >= self.total:
                    return

    def init_batches(self) -> Iterator[dict]:
        """This worker's shard of each global batch the run trains on, in its order, as model inputs (+ SHARE)."""
        rank, n = self.rank, self.n_workers
        for ids, mask, labels, _ in self.global_batches(0):
            share = shard_share(labels, rank, n)  # as training weighs this worker's loss
            yield {"input_ids": ids[rank::n], "attention_mask": mask[rank::n], "labels": labels[rank::n], SHARE: share}

    def run(self, evaluate: Callable[[nn.Module], dict] | None, stop_after: int | None = None) -> None:
        """Train to the end of the schedule, or stop after ``stop_after`` steps of it (lr='auto''s probes)."""
        for batch in self.global_batches(self.step):
            if stop_after is not None and self.step >= stop_after:
                break
            out = self._take_step(*batch)
            self.step += 1
            self._after_step(out, evaluate)
        if self.controller is not None:
            self.controller.finish()

    def _take_step(self, ids, mask, labels, idx):
        """Forward, backward and the optimizer step of one global batch (or its skip); returns the outputs."""
        # A distributed worker takes its shard of the global batch; DDP (or, under FSDP, the sync) averages gradients.
        rank, n = self.rank, self.n_workers
        share = shard_share(labels, rank, n)
        if self.controller is not None:
            self.controller.loss_weight = share  # ARD's calibration then averages the global batch's loss
        ids, mask, labels = ids[rank::n].to(self.device), mask[rank::n].to(self.device), labels[rank::n].to(self.device)
        out = self.train_model(input_ids=ids, attention_mask=mask, labels=labels)
        # The loss the step logs: the global batch's (the mean over the workers of each shard's loss weighted by its
        # share of what the loss averages over), not worker 0's shard alone. One reduction serves the finiteness
        # check too: the sum is non-finite exactly where some worker's loss is.
        self.step_loss = out.loss.detach()
        if n > 1:
            self.step_loss = self.step_loss * share
            dist.all_reduce(self.step_loss)
            self.step_loss /= n
        bad = ["loss"] if not torch.isfinite(self.step_loss) else []
        if bad:
            culprit = first_nonfinite_module(self.model, {"input_ids": ids, "attention_mask": mask})
            bad = [f"loss (first non-finite output: {culprit or 'none; the loss computation itself'})"]
        if not bad:
            (out.loss * share if n > 1 else out.loss).backward()
            if self.sync is not None:  # before anything reads a gradient: every worker then holds the same ones
                self.sync()
            bad = nonfinite_gradients(self.model)
        if bad:
            self._skip(f"non-finite values at step {self.step + 1} in: {', '.join(bad[:5])}")
        else:
            self._update()
        if n > 1 and self.controller is not None and self.controller.records[-1].resized:
            # A resize (after an update or a skipped step alike) handed the adapters new tensors.
            check_same_ranks(self.controller)
            if self.sync is None:  # FSDP never held the adapters: nothing to rebuild
                self.train_model = wrap(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def _skip(self, message: str) -> None:
        """A non-finite step: stop, or skip it with the schedules keeping time (MAX_SKIPPED_IN_A_ROW in a row stop)."""
        kept = _kept_checkpoint(self.control.run_dir)
        if self.control.on_nonfinite == "stop":
            raise NonFiniteError(f"{message}; training stopped. {kept}")
        logger.warning("dynarank: %s; step skipped", message)
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
        if self.in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteError(
                f"{message}: {self.in_a_row} steps in a row were non-finite and skipped, so training stopped; the "
                f"learning rate ({self.spec.lr:g}) is likely too high. {kept}"
            )
        if self.controller is not None:  # the rank schedule keeps time with the loop (and may resize)
            self.controller.skip_step(self.optimizer)
        with warnings.catch_warnings():  # the learning-rate schedule too, even before a first update
            warnings.filterwarnings("ignore", message="Detected call of")
            self.scheduler.step()

    def _update(self) -> None:
        self.in_a_row = 0
        if self.spec.max_grad_norm is not None:  # every worker holds the same (synced) gradients: the same clip
            clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], self.spec.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.stock_update is not None:
            self.stock_update(self.step)
        controller = self.controller
        trainable = controller.trainable_parameters() if controller is not None else count_trainable(self.model)
        self.footprint.add(trainable, training_state_bytes(self.model, self.optimizer, controller))
        if self.state_bytes_start is None:  # after the first step AdamW's moments exist
            self.state_bytes_start = self.footprint.last_bytes

    def _after_step(self, out, evaluate: Callable[[nn.Module], dict] | None) -> None:
        """The step's record for ``on_step`` (and an evaluation every ``eval_every`` steps), then a checkpoint."""
        control = self.control
        if control.on_step is not None:
            info = {
                "step": self.step,
                "loss": float(self.step_loss),
                "lr": self.scheduler.get_last_lr()[0],
                "trainable_parameters": count_trainable(self.model),
                "total_rank": self.controller.total_rank() if self.controller is not None else None,
            }
            every = control.eval_every
            if every and evaluate is not None and self.step % every == 0 and self.step < self.total:
                info["eval"] = evaluate(self.model)  # the last step's evaluation is the result's
            control.on_step(info)
        if control.save_every and self.step % control.save_every == 0 and self.rank == 0:
            if control.before_checkpoint is not None:
                control.before_checkpoint()
            extra = {
                "start_params": self.start_params,
                "state_bytes_start": self.state_bytes_start,
                "footprint": self.footprint.to_dict(),
                "skipped_steps": self.skipped,
                "skipped_in_a_row": self.in_a_row,
            }
            if self.lr_search is not None:  # a resume continues at the searched rate without searching again
                extra["lr_search"] = self.lr_search.to_dict()
            checkpoint.save(
                control.run_dir, self.model, self.optimizer, self.scheduler, self.controller, self.step, extra=extra
            )

    def result(self, seconds: float, evaluate: Callable[[nn.Module], dict] | None) -> TrainResult:
        model, controller = self.model, self.controller
        metrics = {
            "method": self.spec.method,
            "lr": self.spec.lr,
            "lr_source": self.spec.lr_source,
            "lr_search": self.lr_search.to_dict() if self.lr_search is not None else None,
            "r": self.spec.r,
            "r_source": self.spec.r_source,
            **optimizer_record(self.spec, self.total),
            "seed": self.spec.seed,
            "steps": self.total,
            "skipped_steps": self.skipped,
            "seconds": seconds,
            "seconds_per_step": seconds / max(1, self.total - self.resumed_at),
            "init_seconds": self.init_seconds,
            "trainable_parameters_start": self.start_params,
            "trainable_parameters": count_trainable(model),
            "state_bytes_start": self.state_bytes_start,
            "state_bytes_end": training_state_bytes(model, self.optimizer, controller),
            **self.footprint.summary(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if controller is not None:
            metrics["adapter_parameters"] = adapter_parameter_count(model)
            metrics["ranks"] = controller.ranks()
            metrics["warnings"] = controller.run_warnings()
            metrics["settings"] = controller.settings_used()
            if getattr(controller, "rank_init", None) is not None:
                metrics["rank_init"] = controller.rank_init
        if evaluate is not None:
            metrics["eval"] = evaluate(model)
        return TrainResult(metrics, model, controller)


def train_classifier(
    model: nn.Module, tokenizer, train_set: Examples, spec: TrainSpec, eval_set: Examples | None = None, **kwargs
) -> TrainResult:
    """Fine-tune a sequence classifier; ``eval`` holds accuracy and macro-F1 on ``eval_set``."""
    encoded = encode_classification(tokenizer, train_set, spec.max_length)
    evaluate = None
    if eval_set is not None:
        evaluate = lambda m: evaluate_classifier(m, tokenizer, eval_set, spec.max_length)  # noqa: E731
    return train(model, encoded, tokenizer.pad_token_id or 0, spec, evaluate, **kwargs)


def train_causal_lm(
    model: nn.Module,
    tokenizer,
    train_set: CausalExamples,
    spec: TrainSpec,
    eval_set: CausalExamples | None = None,
    **kwargs,
) -> TrainResult:
    """Instruction-tune a causal LM on prompt/response pairs, conversations or prompt/completion rows (tasks.py);
    ``eval`` holds the loss on the responses and its perplexity."""
    encoded = encode_causal(tokenizer, train_set, spec.max_length)
    evaluate = None
    if eval_set is not None:
        evaluate = lambda m: evaluate_causal_lm(m, tokenizer, eval_set, spec.max_length)  # noqa: E731
    return train(model, encoded, tokenizer.pad_token_id, spec, evaluate, **kwargs)
