"""transformers Trainer integration: a callback for any Trainer, and a mixin for the few things a callback cannot do.

    model = dynarank.attach(model, DynaRankConfig(method="ard", ...))
    trainer = DynaRankTrainer(model=model, args=args, train_dataset=ds)          # the full path
    trainer = with_dynarank(SFTTrainer)(model=model, args=args, train_dataset=ds)  # any Trainer class
    trainer = Trainer(model=model, args=args, callbacks=[DynaRankCallback(model)])  # one line, any trainer

What the callback relies on (each is checked by a test against the installed transformers):

* ``on_train_begin`` receives the optimizer, after the Trainer built it and loaded a resumed run's state
  into it: the controller is built with the Trainer's step count (or restored from the checkpoint's
  ``dynarank/`` folder) and bound to the optimizer's step hooks, so it runs inside every optimizer step.
  ARD with ``rank_init='data'`` first measures its starting ranks on the first ``init_batches`` batches of the
  ``train_dataloader`` it receives (this worker's shards; the resized tensors replace the old ones in the
  optimizer); a resumed run takes them from the checkpoint instead.
  The alphas (ARD) are stepped by the controller's own optimizer, so the Trainer's optimizer needs no
  group of theirs, whatever it holds.
* ``on_pre_optimizer_step`` runs with the gradients, after clipping and before ``optimizer.step()``: the
  non-finite guard lives there (a bad step's gradients are dropped and the controller counts the step
  as skipped, so its schedule keeps time with the Trainer's).
* ``on_save`` runs after the Trainer wrote ``checkpoint-N``: the controller's state goes into
  ``checkpoint-N/dynarank/``.
* Loading weights into the model goes through ``load_state_dict``: the layers take the saved slot layout
  from the weights themselves, and a gate the run has dropped since is folded in (load_folding.py), so
  ``resume_from_checkpoint`` and ``load_best_model_at_end`` need no help from the Trainer.

A quantized base (bitsandbytes 4-bit / 8-bit) needs two things from a Trainer that a PEFT model gets by name:

* transformers' Trainer refuses a model with ``is_quantized`` set unless it is a PEFT model ("cannot perform
  fine-tuning on purely quantized models"); a model carrying dynarank adapters is not purely quantized, so the callback
  (built before the Trainer) and the mixin clear that flag on it (:func:`accept_quantized_base`).
* TRL's SFTTrainer casts every trainable parameter of a 4-bit / 8-bit model to bfloat16 (QLoRA's recipe), in its
  ``__init__``. ARD's alphas move by about their learning rate per step, far less than bfloat16 resolves near 1
  (2**-7): cast, they would never move. The callback's ``on_init_end`` (and the mixin, after its Trainer is built)
  puts dynarank's parameters back in the dtype ``attach`` gave them (:func:`undo_dtype_casts`), before any optimizer
  state exists.

What only the mixin does: it puts the callback ahead of the ``report_to`` integrations (so they log the
ranks); it gives ARD's calibration of lambda the loss the Trainer trains on, once per optimizer step, from
``training_step`` (a callback sees only the model's ``outputs.loss``, through ARD's forward hook: nothing of a
``compute_loss`` override, ``label_smoothing_factor`` or a TRL trainer's own loss); it tells the callback which
checkpoint a resume starts from (a callback only learns the step, and looks for ``output_dir/checkpoint-<step>``);
and under DDP it averages the gradients of tensors
created by resizes (which the Trainer's DDP wrapper, built once, does not know) right after the backward
pass, before the Trainer clips them. With the plain callback under DDP, that averaging happens in
``on_pre_optimizer_step``, after clipping: exact only without clipping, so the callback refuses
``max_grad_norm > 0`` there and names the mixin.

Refused before training: an optimizer whose state cannot follow a resize (Adafactor's factored moments,
bitsandbytes' 8-bit states, AdEMAMix: ``optim_state.unresizable_reason``), a ``peft_config`` given to the mixin's
Trainer (TRL would wrap the model in PEFT, freezing dynarank's adapters), a model whose adapters are all frozen.

A model whose frozen base :func:`dynarank.shard_base` sharded (FSDP2, adapters replicated) trains under either:
under a CPU launch accelerate wraps it in DDP, which leaves the shards alone; under accelerate's FSDP2 (GPUs) no
wrapper reduces the adapters and the callback averages every trainable gradient. Its Trainer checkpoints (the whole
model) are refused before training: docs/distributed.md.
"""

from __future__ import annotations

import inspect
import logging
import os
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from .. import checkpoint
from ..attach import elastic_layers
from ..checkpoint import CheckpointError
from ..controllers import RankController, build_controller, prepare_parameters
from ..controllers.ard_gates import ARD_ATTR
from ..controllers.svd import SVD_ATTR, separate_values, shared_values_group
from ..defaults import task_of
from ..distributed import ResizedGradientSync, any_worker, refuse_sharding, world
from ..export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft
from ..fsdp import is_sharded
from ..guards import nonfinite_gradients
from ..naming import split_name
from ..optim_state import unresizable_reason
from ..rank_init import default_loss, init_ranks, needs_rank_init

logger = logging.getLogger(__name__)


def accept_quantized_base(model: nn.Module) -> None:
    """Let transformers' Trainer take a quantized model that carries dynarank adapters (see the module docstring)."""
    if getattr(model, "is_quantized", False) and elastic_layers(model):
        model.is_quantized = False  # read by the Trainer's guard and by .half()/.float() only
        logger.info("dynarank: the quantized base carries trainable dynarank adapters; the Trainer may train it.")


def undo_dtype_casts(model: nn.Module) -> list[str]:
    """Put every dynarank parameter (adapters, ARD's alphas, the SVD methods' values) back in the dtype ``attach``
    gave it, where something cast it since (TRL's SFTTrainer on a quantized base); returns the names changed."""
    layers = elastic_layers(model)
    if not layers:
        return []
    owned = [
        (f"{name}.{pname}", p, layer.adapter_dtype)
        for name, layer in layers.items()
        for pname, p in layer.named_parameters(recurse=False)
    ]
    dtype = next(iter(layers.values())).adapter_dtype  # the controller's parameters were made like the adapters
    for attr in (ARD_ATTR, SVD_ATTR):
        holder = getattr(model, attr, None)
        if holder is not None:
            owned += [(f"{attr}.{pname}", p, dtype) for pname, p in holder.named_parameters()]
    changed = []
    for name, param, wanted in owned:
        if param.dtype != wanted:
            param.data = param.data.to(wanted)
            changed.append(name)
    if changed:
        logger.warning(
            "dynarank: the Trainer cast %d dynarank parameters (%s, ...) to another dtype; put back to %s (ARD's "
            "alphas would not move in bfloat16).",
            len(changed),
            changed[0],
            dtype,
        )
    return changed


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper (hooks must sit on the real one; the wrapper subclasses
    torch.optim.Optimizer without initialising it)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _no_wrapper_reduces(model: nn.Module) -> bool:
    """Whether nothing reduces the trainable gradients of ``model`` for the Trainer: a base sharded by shard_base
    under accelerate's FSDP2, which takes the model as it is (no DDP wrapper). On a CPU launch accelerate wraps the
    sharded model in DDP instead (shard_base told DDP to leave the shards alone), which reduces what it was built
    with, as for any model."""
    if not is_sharded(model):
        return False
    from accelerate.state import AcceleratorState, DistributedType

    return AcceleratorState().distributed_type == DistributedType.FSDP


def refuse_sharded_checkpoints(args, model: nn.Module) -> None:
    """ValueError if a Trainer would checkpoint a model whose base shard_base sharded: its checkpoints hold the whole
    model, and each process holds a shard of the base (the save fails mid-run: refused before training)."""
    strategy = getattr(args, "save_strategy", "no")
    if is_sharded(model) and str(getattr(strategy, "value", strategy)) != "no":
        raise ValueError(
            "a Trainer checkpoints the whole model, and this model's frozen base is sharded (dynarank.shard_base): "
            "set save_strategy='no' and save the adapter at the end (dynarank.save_adapter / export_peft on worker 0; "
            "every worker holds it whole), or train with `dynarank train --fsdp`, whose checkpoints hold the "
            "adapters and resume on any number of workers."
        )


def warn_of_transformers_default_lr(args, controller: RankController) -> str | None:
    """Warn (and return the warning) when the Trainer trains at transformers' default learning rate: almost always
    a rate nobody chose, and one or two decades below the rates dynarank's methods train well at
    (docs/defaults.md). A warning, not a change: the Trainer's arguments are the user's."""
    from transformers import TrainingArguments

    transformers_default = TrainingArguments.__dataclass_fields__["learning_rate"].default
    if args.learning_rate != transformers_default:
        return None
    method, task, budget = controller.config.method, task_of(controller.model), controller.budget_in_lora_ranks()
    rate = controller.default_lr()
    at = "" if budget is None else f", budget={budget:.3g}"  # the adapter's budget as plain LoRA's rank
    warning = (
        f"the Trainer's learning_rate is transformers' default ({transformers_default:g}); {method} on a {task} "
        f"model trains at {rate:g} by default (docs/defaults.md): set learning_rate={rate:g} "
        f"(dynarank.default_lr({method!r}, {task!r}{at})) unless {transformers_default:g} is your choice."
    )
    logger.warning(warning)
    return warning


def warn_of_shared_values_rate(optimizer: torch.optim.Optimizer, model: nn.Module) -> str | None:
    """Warn (and return the warning) when an SVD method's singular values E share a group with other parameters in
    the Trainer's optimizer while the method trains them at another rate (``values_lr_ratio`` != 1): a Trainer that
    is not DynaRankTrainer built that optimizer, and E trains at the adapters' rate."""
    found = shared_values_group(optimizer, model)
    if found is None:
        return None
    _, ratio, source = found
    warning = (
        f"the singular values E train at the adapters' learning rate in this Trainer's optimizer, where the method "
        f"trains them at {ratio:g} times it (values_lr_ratio, {source}): use dynarank.DynaRankTrainer or "
        "with_dynarank(YourTrainerClass), which give E its group, or set values_lr_ratio=1 to silence this."
    )
    logger.warning(warning)
    return warning


# What the refusal of an optimizer offers instead: Trainer optimizers whose state is one entry per parameter entry,
# each run through ARD's resizes (tests/test_trainer_guards.py runs some; bitsandbytes' 32-bit ones on CPU).
RESIZABLE_OPTIMS = (
    "'adamw_torch' (transformers' default), 'adamw_torch_fused', 'sgd', 'adagrad', 'rmsprop', or bitsandbytes' "
    "32-bit 'paged_adamw_32bit', 'lion_32bit', 'paged_lion_32bit', 'rmsprop_bnb_32bit'"
)


def refuse_unresizable_optimizer(args, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """ValueError, before training, if the Trainer's optimizer keeps state that cannot follow a resize (Adafactor's
    factored moments, bitsandbytes' 8-bit blocks, ...: optim_state.unresizable_reason), naming it and what works."""
    optimizer = _inner(optimizer)
    reason = unresizable_reason(optimizer)
    if reason is None:
        return
    cls = type(optimizer)
    name = f"{cls.__module__}.{cls.__qualname__}"
    optim = str(getattr(args.optim, "value", args.optim))
    try:  # name the Trainer's setting only if it is what built this optimizer (not one passed in `optimizers`)
        from transformers import Trainer

        built = Trainer.get_optimizer_cls_and_kwargs(args, model)[0] is cls
    except Exception:  # noqa: BLE001 - a setting that cannot be built here did not build this optimizer
        built = False
    which = f"optim='{optim}': {name}" if built else name
    raise ValueError(
        f"the Trainer's optimizer ({which}) {reason}, which cannot follow dynarank's resizes of the adapters "
        "(their optimizer state is carried across each resize entry by entry). Use an optimizer whose state is one "
        f"entry per parameter entry: optim={RESIZABLE_OPTIMS}."
    )


def refuse_frozen_adapters(model: nn.Module) -> None:
    """ValueError if every dynarank adapter of ``model`` is frozen: training would change nothing of dynarank's
    (a PEFT model wrapped over it, as a TRL trainer given a peft_config builds, freezes them)."""
    params = [p for layer in elastic_layers(model).values() for p in layer.adapter_parameters()]
    if params and not any(p.requires_grad for p in params):
        raise ValueError(
            "every dynarank adapter of the model is frozen (requires_grad=False), so training would change none of "
            "them: was the model wrapped in a PEFT model (a TRL trainer given a peft_config does it)? The adapters "
            "are dynarank's: pass peft_config=None and leave them trainable."
        )


def refuse_another_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """ValueError if ``optimizer`` holds none of ``model``'s trainable adapter tensors: the Trainer trains another
    model than the callback's (a ``model_init`` builds a new one at every ``train()``)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = [p for layer in elastic_layers(model).values() for p in layer.adapter_parameters() if p.requires_grad]
    if params and not any(id(p) in held for p in params):
        raise ValueError(
            "the Trainer's optimizer holds none of the adapters of the model this DynaRankCallback was built with: "
            "the Trainer trains another model (a model_init builds a new one at every train(), as "
            "hyperparameter_search does). Use dynarank.DynaRankTrainer or with_dynarank(YourTrainerClass), which "
            "follow model_init, or pass the model itself."
        )


def _argument(function, args: tuple, kwargs: dict, name: str):
    """The value the parameter ``name`` takes in the call ``function(*args, **kwargs)`` (None when not given)."""
    if name in kwargs:
        return kwargs[name]
    try:
        return inspect.signature(function).bind_partial(*args, **kwargs).arguments.get(name)
    except (TypeError, ValueError):  # a call the function would refuse itself
        return None


class DynaRankCallback(TrainerCallback):
    """Drive a dynarank controller from any ``transformers.Trainer`` (TRL's trainers included); no manual call."""

    def __init__(self, model: nn.Module, on_nonfinite: str = "skip", init_loss=None) -> None:
        """``on_nonfinite``: 'skip' drops an optimizer step whose gradients hold NaN/inf (naming the modules; nothing
        is updated, the rank schedule counts the step), 'stop' raises FloatingPointError (the Trainer's checkpoints
        are what a stopped run keeps). ``init_loss(model, batch)``: the loss a ``rank_init='data'`` pass measures
        its gradients with (default ``model(**batch).loss``; a Trainer whose loss is computed elsewhere gives it)."""
        if on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}.")
        self.model = model
        self.on_nonfinite = on_nonfinite
        accept_quantized_base(model)  # built before the Trainer, whose __init__ refuses a quantized model
        self.init_loss = init_loss
        prepare_parameters(model)  # the controller's parameters exist before the Trainer builds its optimizer
        self.controller: RankController | None = None
        self.skipped = 0
        self._counted_skip = False  # this step's skip is in `skipped` already (found by on_pre_optimizer_step)
        self.resume_from: Path | None = None  # the checkpoint a resume starts from (set by the mixin)
        self.syncs_before_clipping = False  # the mixin averages resized tensors' gradients after each backward
        self._sync: ResizedGradientSync | None = None
        self._step_loss: torch.Tensor | None = None  # the loss of the optimizer step's micro-batches so far (mixin)
        self.exports_on_save = False  # the mixin's save_model writes the PEFT adapter; a plain Trainer's does not

    def follow(self, model: nn.Module) -> None:
        """Drive ``model`` from now on, from the start of its run: a Trainer's ``model_init`` made it for this
        ``train()`` call (the mixin calls this). The earlier model's controller, if any, is let go."""
        if self.controller is not None:
            self.controller.unbind()
        accept_quantized_base(model)
        prepare_parameters(model)
        self.model, self.controller, self._sync, self._step_loss = model, None, None, None
        self.skipped, self._counted_skip = 0, False

    # ------------------------------------------------------------------ start, resume
    def on_init_end(self, args, state, control, **kwargs):
        undo_dtype_casts(self.model)  # the Trainer's __init__ is over: nothing casts after this
        return control

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        refuse_sharding(args, model=self.model if model is None else model)
        refuse_sharded_checkpoints(args, self.model)
        undo_dtype_casts(self.model)  # a callback added after the Trainer was built saw no on_init_end
        if optimizer is None:
            raise ValueError("the Trainer passed no optimizer to the dynarank callback.")
        refuse_unresizable_optimizer(args, self.model, optimizer)
        refuse_frozen_adapters(self.model)
        refuse_another_model(self.model, _inner(optimizer))
        if self.controller is not None and self.controller.step != state.global_step:
            raise ValueError("this DynaRankCallback has trained already: build the model, callback and Trainer again.")
        if world()[1] > 1:
            if args.max_grad_norm and not self.syncs_before_clipping:
                raise ValueError(
                    "under multi-process training the gradients of resized adapter tensors must be averaged before "
                    f"the Trainer clips them (max_grad_norm={args.max_grad_norm}), which a callback cannot do: use "
                    "dynarank.DynaRankTrainer, or with_dynarank(YourTrainerClass), or set max_grad_norm=0."
                )
            # Built before a rank init resizes anything: it knows the tensors the Trainer's wrapper knows. The
            # controller records a rank snapshot at every resize: the parameters change only then.
            known = () if _no_wrapper_reduces(self.model) else None  # None: what the DDP wrapper was built with
            self._sync = ResizedGradientSync(
                self.model, layout_version=lambda: len(self.controller.history), known=known
            )
        if self.controller is None:
            resumed = self._read_resumed_state(args, state) if state.global_step > 0 else None
            if resumed is None and needs_rank_init(self.model):
                self._init_ranks(
                    kwargs.get("train_dataloader"), _inner(optimizer), state.max_steps, args.gradient_accumulation_steps
                )
            self.controller = build_controller(self.model, total_steps=state.max_steps, restoring=resumed is not None)
            # The Trainer checkpoints the last step after this callback's step end: E stays apart until on_train_end
            # folds it (finish()), so that checkpoint holds the same kind of state as every other, and resumes.
            self.controller.fold_after_last_step = False
            if resumed is not None:
                checkpoint.restore_controller(self.controller, *resumed)
            else:
                warn_of_transformers_default_lr(args, self.controller)
            warn_of_shared_values_rate(_inner(optimizer), self.model)
        if not any(o is _inner(optimizer) for o in self.controller.optimizers):
            self.controller.unbind()  # an optimizer of an earlier train() call steps no more (the controller waits
            # for every bound optimizer to step before it ends an iteration)
        self.controller.bind(_inner(optimizer))
        return control

    def _init_ranks(self, dataloader, optimizer, total_steps: int | None, accumulation: int) -> None:
        """ARD's starting ranks from the first batches of the Trainer's data loader (rank_init='data'); it yields
        micro-batches, ``accumulation`` of them to an optimizer step, and init_batches counts optimizer steps'."""
        if dataloader is None:
            if self.model.dynarank_config.rank_init == "auto":
                return  # the controller starts uniform and says why
            raise ValueError("rank_init='data' needs the Trainer's train_dataloader, which it did not pass.")
        loss = self.init_loss or default_loss
        n = world()[1]  # a worker's loss is its shard's mean: its share of the batch mean is 1 / n

        def loss_fn(model, batch):
            value = loss(model, batch)
            if value is None:  # a batch without labels (a preference or reward Trainer's), read by model(**batch)
                raise ValueError(
                    "ARD's start measured from the data needs this Trainer's loss, and the model returns none for its "
                    f"batches (they hold {sorted(batch)}): use dynarank.DynaRankTrainer or with_dynarank(YourTrainer), "
                    "which measure the loss the Trainer trains on, pass DynaRankCallback(model, init_loss=...), or "
                    "start uniform (rank_init='uniform')."
                )
            return value / n

        init_ranks(
            self.model,
            iter(dataloader),
            loss_fn=loss_fn,
            optimizer=optimizer,
            total_steps=total_steps or None,
            micro_batches=accumulation,
        )

    def _read_resumed_state(self, args, state) -> tuple[dict, dict]:
        """The dynarank state of the checkpoint the Trainer resumed from (its weights, with their slot layout, are
        loaded already), checked against the run and the model before anything is built."""
        path = self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}"
        try:
            saved, tensors = checkpoint.read_trainer_state(path)
        except CheckpointError as exc:
            hint = (
                " (a callback finds a resumed checkpoint in output_dir only; resume with dynarank.DynaRankTrainer or "
                "with_dynarank(...) for checkpoints elsewhere)"
            )
            raise CheckpointError(f"{exc}{'' if self.resume_from else hint}") from None
        if (state.global_step, state.max_steps) != (saved["step"], saved["total_steps"]):
            raise CheckpointError(
                f"the Trainer resumed at step {state.global_step} of {state.max_steps}, the dynarank state in {path} "
                f"is at step {saved['step']} of {saved['total_steps']}: the rank schedule is placed in the run's "
                "length, so resume with the arguments (max_steps / epochs, batch size, accumulation) it started with."
            )
        method = self.model.dynarank_config.method
        if saved["method"] != method:
            raise CheckpointError(f"{path} was trained with method {saved['method']!r}, this model with {method!r}.")
        if {name: layer.slots for name, layer in elastic_layers(self.model).items()} != saved["layout"]:
            raise CheckpointError(
                f"the weights the Trainer loaded do not have the slot layout recorded in {path}/dynarank: load the "
                "checkpoint's weights into the model (the Trainer does it when it resumes from that checkpoint)."
            )
        checkpoint.restore_output_scales(self.model, saved.get("output_scales"))  # the scale the weights trained at
        return saved, tensors

    # ------------------------------------------------------------------ every optimizer step
    def sync_gradients(self) -> None:
        """Under DDP, average across workers the gradients of tensors a resize created (the Trainer's DDP wrapper
        does not know them)."""
        if self._sync is not None:
            self._sync()

    def observe_loss(self, loss: torch.Tensor, step_ends: bool) -> None:
        """Give ARD's calibration the loss the Trainer trains on, once per optimizer step: the sum, over the step's
        micro-batches, of what ``Trainer.training_step`` returns (each micro-batch's loss as the Trainer scales it
        for accumulation; one micro-batch: the loss ``compute_loss`` returned), which the Trainer logs as the
        step's loss. It replaces what the model's ``outputs.loss`` gave for the step (ARDCalibration.observe_loss),
        and reaches the calibration whichever way the loss was computed (compute_loss, label smoothing, TRL)."""
        controller = self.controller
        if controller is None or not getattr(controller, "observes_loss", False):
            return  # not ARD, or past its warm-up: nothing reads the loss, and nothing waits for the device
        loss = loss.detach()
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        if step_ends:
            controller.observe_loss(self._step_loss)
            self._step_loss = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.controller is None:
            return control
        if not self.syncs_before_clipping:
            self.sync_gradients()
        bad = nonfinite_gradients(self.model)  # one wait for the device when everything is finite
        if self._sync is not None and any_worker(bool(bad), next(self.model.parameters()).device) and not bad:
            bad = ["another worker"]  # every worker takes the same branch
        if not bad:
            return control
        message = f"non-finite gradients in: {', '.join(bad[:5])}"
        if self.on_nonfinite == "stop":
            raise FloatingPointError(f"dynarank: {message}; training stopped (on_nonfinite='stop').")
        logger.warning("dynarank: %s; optimizer step skipped", message)
        self.skipped += 1
        self._counted_skip = True
        for p in self.model.parameters():
            p.grad = None  # the optimizer step updates nothing ...
        self.controller.skip_next_step()  # ... and the controller counts it without learning from it
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # Under fp16 mixed precision a GradScaler that finds inf / NaN does not call a non-fused optimizer's step(),
        # so the controller's step hooks did not run: it counts the step here, or its schedule would fall behind
        # the Trainer's (and every later checkpoint would be refused on resume).
        controller = self.controller
        if controller is not None and controller.step < state.global_step:
            controller.count_skipped_step()
            self.skipped += 0 if self._counted_skip else 1
        self._counted_skip = False
        return control

    # ------------------------------------------------------------------ checkpoints, logs, the end
    def on_save(self, args, state, control, **kwargs):
        if self.controller is None or not args.should_save:
            return control
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            checkpoint.save_trainer_state(folder, self.model, self.controller)
        else:
            logger.warning("dynarank: %s not found; the rank state of this checkpoint was not saved.", folder)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.controller is None or logs is None:
            return control
        extra = {
            "dynarank/total_rank": self.controller.total_rank(),
            "dynarank/trainable_parameters": self.controller.trainable_parameters(),
        }
        by_kind: dict[str, list[int]] = {}
        for name, ranks in self.controller.ranks().items():
            by_kind.setdefault(split_name(name)[1], []).extend(ranks)
        for kind, ranks in by_kind.items():
            extra[f"dynarank/mean_rank/{kind}"] = statistics.fmean(ranks) if ranks else 0.0
        logs.update(extra)
        if state.log_history:
            state.log_history[-1].update(extra)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # A run that ends before its last scheduled step (early stopping, skipped fp16 steps) still leaves a plain
        # adapter behind: ElaLoRA / AdaLoRA fold E into it.
        if self.controller is not None:
            self.controller.finish()
            if not self.exports_on_save and args.should_save:
                logger.warning(
                    "dynarank: a plain Trainer's save_model() writes the attached model's own layers "
                    "(<module>.base.weight and dynarank's slots), which transformers' from_pretrained and PEFT cannot "
                    "load (its checkpoints are for resuming). Write the adapter with dynarank.export_peft(model, dir), "
                    "or train with dynarank.DynaRankTrainer / with_dynarank(TrainerClass), whose save_model() does."
                )
        return control


class DynaRankTrainerMixin:
    """Mix into any ``transformers.Trainer`` subclass (``with_dynarank`` does it): adds a :class:`DynaRankCallback`
    (or uses the one given) ahead of the logging integrations, tells it which checkpoint a resume starts from, and
    under DDP averages the resized tensors' gradients right after each backward pass, before clipping."""

    def __init__(self, *args, dynarank_on_nonfinite: str = "skip", **kwargs) -> None:
        if _argument(super().__init__, args, kwargs, "peft_config") is not None:
            raise ValueError(
                f"peft_config must be None with dynarank: the model's adapters are dynarank's (dynarank.attach), and "
                f"given a peft_config {type(self).__name__} would wrap the model in a PEFT model, which freezes them "
                "(nothing of dynarank's would train). Pass peft_config=None; dynarank.export_peft writes a PEFT "
                "adapter after training."
            )
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, nn.Module):
            accept_quantized_base(model)
        super().__init__(*args, **kwargs)
        undo_dtype_casts(self.model)
        handler = self.callback_handler
        callback = next((cb for cb in handler.callbacks if isinstance(cb, DynaRankCallback)), None)
        if callback is None:
            callback = DynaRankCallback(self.model, on_nonfinite=dynarank_on_nonfinite)
        if callback.init_loss is None:  # ARD's data start measures the loss this Trainer trains on
            callback.init_loss = self._dynarank_init_loss
        handler.callbacks = [callback] + [cb for cb in handler.callbacks if cb is not callback]
        callback.syncs_before_clipping = True
        callback.exports_on_save = True
        self.dynarank = callback

    def _dynarank_init_loss(self, model: nn.Module, batch) -> torch.Tensor:
        """The loss of one of this Trainer's batches as it trains on it (``compute_loss``: label smoothing, a
        ``compute_loss_func``, TRL's loss types and preference losses), for ARD's start measured from the data. The
        metrics a TRL trainer's compute_loss records on the way (``_metrics``) are put back: the pass is no step."""
        metrics = getattr(self, "_metrics", None)
        kept = (
            {mode: {k: list(v) for k, v in m.items()} for mode, m in metrics.items()}
            if isinstance(metrics, dict)
            else None
        )
        try:
            return self.compute_loss(model, dict(batch))  # a copy: compute_loss may pop the labels
        finally:
            for mode, recorded in (kept or {}).items():
                metrics[mode].clear()
                metrics[mode].update(recorded)

    def call_model_init(self, trial=None):
        """The Trainer's ``model_init`` (``hyperparameter_search``'s way: a new model at every ``train()``): the
        callback drives the model it returns, and the other callbacks are handed it too."""
        model = super().call_model_init(trial)
        callback = getattr(self, "dynarank", None)  # None while the Trainer's __init__ makes the first one
        if callback is not None:
            callback.follow(model)
            self.callback_handler.model = model
        else:
            accept_quantized_base(model)
        return model

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        refuse_sharding(self.args, self, self.model)
        refuse_sharded_checkpoints(self.args, self.model)
        if resume_from_checkpoint is True:
            found = checkpoint.latest_trainer_checkpoint(self.args.output_dir)
            if found is None and any(Path(self.args.output_dir).glob("checkpoint-*")):
                raise CheckpointError(
                    f"no checkpoint in {self.args.output_dir} holds dynarank state (dynarank/state.json): they were "
                    "saved without DynaRankCallback. The rank controller cannot restart mid-run."
                )
            resume_from_checkpoint = str(found) if found is not None else True
        if resume_from_checkpoint not in (None, False, True):
            checkpoint.read_trainer_state(resume_from_checkpoint)  # refused before the Trainer touches anything
            self.dynarank.resume_from = Path(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``trainer.save_model(dir)``: the model as a plain PEFT LoRA adapter (``dynarank.export_peft``:
        adapter_config.json + adapter_model.safetensors, which ``PeftModel.from_pretrained`` and transformers'
        ``from_pretrained`` read), and the tokenizer / processor. The Trainer's own state dict of the attached model
        names the base weights ``<module>.base.weight``, so a stock ``from_pretrained`` of it found every adapted
        weight missing and drew them at random. The Trainer's checkpoints (its internal calls) are unchanged: they
        resume a run."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".dynarank-export.", dir=out) as staging:
                written = export_peft(self.model, Path(staging) / "adapter")
                for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):  # beside whatever the folder holds (checkpoints)
                    os.replace(written / name, out / name)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(out)
        return None

    def create_optimizer(self, *args, **kwargs):
        """The Trainer's optimizer, with an SVD method's singular values E in a group of their own at
        ``values_lr_ratio`` times their group's rate (before the Trainer builds its schedule over the groups)."""
        optimizer = super().create_optimizer(*args, **kwargs)
        refuse_unresizable_optimizer(self.args, self.model, optimizer)
        separate_values(_inner(optimizer), self.model)
        return optimizer

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        step_ends = self.accelerator.sync_gradients  # the last micro-batch of the step: the Trainer clips next
        if step_ends:
            self.dynarank.sync_gradients()
        self.dynarank.observe_loss(loss, step_ends)  # ARD: the loss this Trainer trains on, however computed
        return loss


_WITH_DYNARANK: dict[type, type] = {}


def with_dynarank(trainer_class: type) -> type:
    """``trainer_class`` with :class:`DynaRankTrainerMixin` mixed in (one class per Trainer class)."""
    if issubclass(trainer_class, DynaRankTrainerMixin):
        return trainer_class
    if trainer_class not in _WITH_DYNARANK:
        name = f"DynaRank{trainer_class.__name__}"
        _WITH_DYNARANK[trainer_class] = type(name, (DynaRankTrainerMixin, trainer_class), {"__module__": __name__})
    return _WITH_DYNARANK[trainer_class]


def __getattr__(name: str):
    if name == "DynaRankTrainer":  # transformers.Trainer with the mixin (built on first use)
        from transformers import Trainer

        return with_dynarank(Trainer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
