"""transformers Trainer integration: one callback drives the rank controller.

    model = dynarank.attach(model, DynaRankConfig(method="ard", ...))
    callback = DynaRankCallback(model)        # before the Trainer: creates the alphas
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()                            # or trainer.train(resume_from_checkpoint=True)

``Trainer(callbacks=[callback])`` installs the callback while the Trainer is built (the callback
finds it on the call stack of ``on_init_end``); one added later with ``trainer.add_callback``
installs itself when training begins, too late for ``resume_from_checkpoint``: call
``callback.install(trainer)`` first. Installed, it runs ahead of the report_to integrations (they
log the ranks), and resuming works.

At ``on_train_begin`` the callback builds the controller with the Trainer's total optimizer
steps, moves the controller's parameters into their own optimizer group (their learning rate,
no weight decay) and binds the controller to the optimizer's step hooks: it then runs inside
every optimizer step (gradient accumulation counts optimizer steps). ``on_log`` adds the total
rank, the trainable parameters and the mean rank per projection type to the logs.

Resume. A Trainer checkpoint gains ``dynarank/`` (``on_save``): the slot layout of every elastic
layer and the controller's state, as JSON and safetensors. The Trainer loads the weights before
any callback runs, at their saved (resized) shapes, and then its optimizer state by position;
``install`` therefore wraps ``trainer.train`` (the layers take the saved layout before the Trainer
loads anything) and ``trainer.create_optimizer`` (the alpha group exists before the optimizer
state is loaded). ``on_train_begin`` then restores the controller, so the rank schedule goes on
where it stopped. A resume that cannot be exact raises instead of restarting the controller.
``load_best_model_at_end``: ``trainer._load_best_model`` is wrapped the same way (the layers take the best
checkpoint's layout before its weights load), and what the run has dropped since that checkpoint (ARD's
mask, a folded E) is folded into the loaded weights.

Under DDP (torchrun / accelerate launch) a resize hands the adapters NEW parameter tensors, which
the Trainer's DDP wrapper (built once, before training) does not know: their gradients would stay
per worker. Every optimizer step therefore first averages, across workers, the gradients of every
trainable parameter the wrapper was not built with; every worker then updates, scores and resizes
from the same global gradient.
"""

from __future__ import annotations

import inspect
import logging
import statistics
import sys
import types
import weakref
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from .. import checkpoint
from ..attach import elastic_layers
from ..checkpoint import CheckpointError
from ..controllers import ARDController, RankController, build_controller, prepare_parameters
from ..controllers.svd import SVD_ATTR
from ..distributed import ResizedGradientSync, any_worker, refuse_sharding, world
from ..guards import nonfinite_gradients
from ..naming import split_name

logger = logging.getLogger(__name__)


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper (hooks must sit on the real one; the
    wrapper subclasses torch.optim.Optimizer without initialising it)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _extend_scheduler(scheduler, lr: float) -> None:
    """Give the scheduler an entry for a group added after it was built (torch zips its per-group
    lists strictly). The entry is constant: the controller owns that group's rate."""
    while scheduler is not None and not hasattr(scheduler, "base_lrs") and hasattr(scheduler, "scheduler"):
        scheduler = scheduler.scheduler
    if scheduler is None or not hasattr(scheduler, "base_lrs"):
        return
    scheduler.base_lrs.append(lr)
    if isinstance(getattr(scheduler, "lr_lambdas", None), list):
        scheduler.lr_lambdas.append(lambda step: 1.0)
    if isinstance(getattr(scheduler, "_last_lr", None), list):
        scheduler._last_lr.append(lr)


class NonFiniteGuard:
    """Names the modules whose gradients hold NaN or inf, and applies the policy: 'skip' (counted in
    ``skipped``) or 'stop' (FloatingPointError)."""

    def __init__(self, model: nn.Module, policy: str) -> None:
        self.model, self.policy = model, policy
        self.skipped = 0

    def bad_modules(self) -> list[str]:
        """Modules with NaN/inf gradients (one read of the device when all are finite)."""
        return nonfinite_gradients(self.model)

    def react(self, bad: list[str]) -> None:
        message = f"non-finite gradients in: {', '.join(bad[:5])}"
        if self.policy == "stop":
            raise FloatingPointError(f"dynarank: {message}; training stopped (on_nonfinite='stop').")
        logger.warning("dynarank: %s; optimizer step skipped", message)
        self.skipped += 1


# The load check of each model's current callback (a new callback for the same model replaces it).
_LOAD_CHECKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _caller_of_type(cls):
    """The nearest ``self`` up the call stack that is a ``cls`` (None if there is none).

    Callbacks get no reference to the Trainer nor to the handler dispatching the event; both are
    on the stack when a Trainer event runs (Trainer.__init__ -> handler.on_init_end -> call_event).
    """
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, cls):
            return candidate
        frame = frame.f_back
    return None


class DynaRankCallback(TrainerCallback):
    """Drive a dynarank controller from ``transformers.Trainer``; no manual call per step."""

    def __init__(self, model: nn.Module, on_nonfinite: str = "skip") -> None:
        """``on_nonfinite``: 'skip' drops an optimizer step whose gradients are NaN/inf (naming the
        modules; nothing is updated, the rank schedule counts the step), 'stop' raises FloatingPointError;
        the Trainer's own checkpoints are what a stopped run keeps.

        From here until training ends, weights loaded into ``model`` are checked against its rank layout (a
        mismatch says how to resume instead of 'size mismatch'); a newer callback for the same model takes the
        check over."""
        if on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}.")
        self.model = model
        self.gate_parameters = prepare_parameters(model)
        self.controller: RankController | None = None
        self.guard = NonFiniteGuard(model, on_nonfinite)
        self.trainer = None  # set by install()
        self._resume: tuple[dict, dict] | None = None  # dynarank state read by the wrapped train(), for on_train_begin
        self._guarded: weakref.WeakSet = weakref.WeakSet()  # optimizers whose step() is wrapped
        self._sync: ResizedGradientSync | None = None  # under DDP, from on_train_begin
        self._synced_at: int | None = None  # the controller step whose gradients were last averaged
        self._order_warned = False
        self._best_values: dict[str, torch.Tensor] | None = None  # E (one vector) read while the best checkpoint loads
        previous = _LOAD_CHECKS.pop(model, None)
        if previous is not None:  # the model's previous callback: this one takes over its check
            previous.remove()
        self._load_check = _LOAD_CHECKS[model] = model.register_load_state_dict_pre_hook(self._check_loaded_layout)

    def _stop_checking_loads(self) -> None:
        self._load_check.remove()
        if _LOAD_CHECKS.get(self.model) is self._load_check:
            del _LOAD_CHECKS[self.model]

    # ------------------------------------------------------------------ installing into a Trainer
    def install(self, trainer) -> DynaRankCallback:
        """Add this callback to ``trainer`` ahead of the logging integrations, and wrap ``trainer.train`` and
        ``trainer.create_optimizer`` so that ``resume_from_checkpoint`` restores the rank layout and controller."""
        refuse_sharding(trainer.args, trainer)
        if trainer.args.load_best_model_at_end and not hasattr(trainer, "_load_best_model"):
            raise ValueError(
                "load_best_model_at_end=True: this transformers version loads the best checkpoint in a way "
                "DynaRankCallback cannot give the checkpoint's rank layout first. Set load_best_model_at_end=False "
                "and load the checkpoint you want with its dynarank/ state."
            )
        # A new list: an event being dispatched (install() may run inside one) goes on over the old one.
        handler = trainer.callback_handler
        handler.callbacks = [self] + [cb for cb in handler.callbacks if cb is not self]
        if self.trainer is not trainer:
            self.trainer = trainer
            trainer.train = types.MethodType(_wrap(trainer.train, self._train), trainer)
            trainer.create_optimizer = types.MethodType(
                _wrap(trainer.create_optimizer, self._create_optimizer), trainer
            )
            if hasattr(trainer, "_load_best_model"):  # load_best_model_at_end
                trainer._load_best_model = types.MethodType(
                    _wrap(trainer._load_best_model, self._load_best_model), trainer
                )
            clip = trainer.accelerator.clip_grad_norm_

            def clip_grad_norm_(*args, **kwargs):
                self._sync_resized()  # the norm (and the clipping) must see the averaged gradients
                return clip(*args, **kwargs)

            trainer.accelerator.clip_grad_norm_ = clip_grad_norm_
        return self

    def _sync_resized(self) -> None:
        """Under DDP, average the gradients of tensors created by resizes across workers, once per optimizer
        step (before gradient clipping measures them, or else before the optimizer step)."""
        if self._sync is not None and self._synced_at != self.controller.step:
            self._sync()
            self._synced_at = self.controller.step

    def _train(self, original, *args, **kwargs):
        """``trainer.train``: a resume first gives the layers the checkpoint's layout (the Trainer loads the
        weights next, at those shapes) and builds the controller the checkpoint's state goes into."""
        refuse_sharding(self.trainer.args, self.trainer)
        bound = inspect.signature(original).bind(*args, **kwargs)
        resume = bound.arguments.get("resume_from_checkpoint")
        if resume is True:
            resume = checkpoint.latest_trainer_checkpoint(self.trainer.args.output_dir)
            if resume is None and any(Path(self.trainer.args.output_dir).glob("checkpoint-*")):
                raise CheckpointError(
                    f"no checkpoint in {self.trainer.args.output_dir} holds dynarank state (dynarank/state.json): "
                    "they were saved without DynaRankCallback. The rank controller cannot restart mid-run."
                )
            resume = True if resume is None else resume  # no checkpoint at all: the Trainer says so
        if resume not in (None, False, True):
            self._prepare_resume(Path(resume))
            bound.arguments["resume_from_checkpoint"] = str(resume)
        return original(*bound.args, **bound.kwargs)

    def _prepare_resume(self, path: Path) -> None:
        if self.controller is not None:
            raise ValueError(
                "resume_from_checkpoint needs a model and a DynaRankCallback that have not trained yet: build the "
                "model, attach, the callback and the Trainer again, then resume."
            )
        saved, tensors = checkpoint.read_trainer_state(path)
        method = self.model.dynarank_config.method
        if saved["method"] != method:
            raise CheckpointError(f"{path} was trained with method {saved['method']!r}, this model with {method!r}.")
        checkpoint.check_layout(self.model, saved["layout"])  # before anything changes: a refusal leaves all as it was
        # Built on the fresh layers, as the checkpoint's run built it; the state it had is restored at on_train_begin.
        controller = build_controller(self.model, total_steps=saved["total_steps"])
        checkpoint.restore_layout(self.model, saved["layout"])
        self.controller, self._resume = controller, (saved, tensors)

    def _load_best_model(self, original, *args, **kwargs):
        """``trainer._load_best_model`` (load_best_model_at_end): the layers first take the best checkpoint's
        slot layout, the Trainer then loads its weights at those shapes; what the checkpoint computed with and the
        run has dropped since (ARD's mask, ElaLoRA / AdaLoRA's E) is then folded into the group side."""
        best = self.trainer.state.best_model_checkpoint
        if self.controller is None or best is None:
            return original(*args, **kwargs)
        try:
            saved, _ = checkpoint.read_trainer_state(best)
            checkpoint.check_layout(self.model, saved["layout"])
        except CheckpointError as exc:
            missing = not (Path(best) / checkpoint.TRAINER_DIR / checkpoint.STATE_FILE).is_file()
            reason = f"it has no {checkpoint.TRAINER_DIR}/{checkpoint.STATE_FILE}" if missing else str(exc).rstrip(".")
            raise CheckpointError(
                f"load_best_model_at_end: the rank layout of the best checkpoint, {best}, cannot be given to the "
                f"model ({reason}), and its weights fit only that layout. The model is left as training ended it: "
                "use it, or pick another checkpoint that has its dynarank/ state (or set load_best_model_at_end=False)."
            ) from None
        checkpoint.restore_layout(self.model, saved["layout"])
        self._best_values = {} if getattr(self.model, SVD_ATTR, None) is None else None
        try:
            result = original(*args, **kwargs)
        finally:
            values, self._best_values = self._best_values, None
        self._fold_best_gates(saved, values or {})
        return result

    @torch.no_grad()
    def _fold_best_gates(self, saved: dict, values: dict[str, torch.Tensor]) -> None:
        """After the best checkpoint's weights are loaded: the gate it computed with, where the run has dropped
        its own since, goes into the group side, so the layers compute what the checkpoint computed."""
        layers = elastic_layers(self.model)
        flat, offset = values.get("values"), 0  # ElaLoRA / AdaLoRA's E, when the run has folded its own
        for layer in layers.values() if flat is not None else ():
            width = layer.group_weight.shape[1]  # E runs over the modules in order, T entries each
            layer.group_weight.mul_(flat[offset : offset + width].to(layer.group_weight).unsqueeze(0))
            offset += width
        ard = self.controller
        if isinstance(ard, ARDController) and saved["step"] < ard.settings.final_start <= ard.step:
            # The checkpoint was masked by its alphas (now loaded); the run's final phase has no mask any more.
            for name, layer in layers.items():
                layer.set_gate(ard.mask_gate(name))
                folded = layer.gated_group_weight()
                layer.set_gate(None)
                layer.group_weight.copy_(folded)

    def _create_optimizer(self, original, *args, **kwargs):
        """``trainer.create_optimizer``: the alphas get their group before the Trainer loads a saved optimizer
        state into it (which maps by position) and before it builds the scheduler."""
        optimizer = original(*args, **kwargs)
        self._arrange(_inner(optimizer), self.trainer.args.learning_rate, self.trainer.lr_scheduler)
        return optimizer

    def _arrange(self, inner: torch.optim.Optimizer, lr: float, scheduler) -> None:
        """The Trainer put the alphas among the adapters: move them into their own group (no weight decay)."""
        if not self.gate_parameters:
            return
        gate_ids = {id(p) for p in self.gate_parameters}
        for group in inner.param_groups:
            if group.get("name") != "ard_alpha":
                group["params"] = [p for p in group["params"] if id(p) not in gate_ids]
        if not any(g.get("name") == "ard_alpha" for g in inner.param_groups):
            # The controller sets this group's rate before every step; until it exists, any rate will do.
            alpha_lr = self.controller.param_groups(lr)[-1]["lr"] if self.controller is not None else lr
            inner.add_param_group(
                {"params": list(self.gate_parameters), "lr": alpha_lr, "weight_decay": 0.0, "name": "ard_alpha"}
            )
            _extend_scheduler(scheduler, alpha_lr)

    def _check_loaded_layout(self, module, state_dict, prefix, *args) -> None:
        """Weights of a dynarank training state loaded before install(), or into layers of another layout: say how
        to resume (not 'size mismatch', nor a silent restart of the controller)."""
        if self._best_values is not None:  # E of a run that has folded its own: kept to fold into the loaded weights
            key = f"{prefix}{SVD_ATTR}.values"
            if key in state_dict:
                self._best_values["values"] = state_dict.pop(key)
        if self.trainer is None and self.controller is None:
            controller_keys = [
                k for k in state_dict if k.startswith((f"{prefix}dynarank_ard.", f"{prefix}dynarank_svd."))
            ]
            if controller_keys:
                raise CheckpointError(
                    "the weights being loaded are a dynarank training state (they hold the controller's parameters, "
                    f"{controller_keys[0]}): to resume a Trainer run, call callback.install(trainer) before "
                    "trainer.train(resume_from_checkpoint=...); to load a saved adapter, use dynarank.load_adapter."
                )
        for name, layer in elastic_layers(self.model).items():
            for key in ("shared_weight", "group_weight"):
                saved = state_dict.get(f"{prefix}{name}.{key}")
                if saved is not None and tuple(saved.shape) != tuple(getattr(layer, key).shape):
                    raise CheckpointError(
                        f"the weights being loaded hold {name}.{key} with shape {tuple(saved.shape)}, the model "
                        f"has {tuple(getattr(layer, key).shape)}: they come from a run that resized its adapters. "
                        "To resume a Trainer run, call callback.install(trainer) before "
                        "trainer.train(resume_from_checkpoint=...); to load a saved adapter, use dynarank.load_adapter."
                    )

    # ------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, **kwargs):
        """``Trainer(callbacks=[callback])``: install into the Trainer being built (found on the call stack)."""
        from transformers import Trainer

        trainer = _caller_of_type(Trainer)
        if trainer is not None and self.trainer is None:
            self.install(trainer)
        return control

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        refuse_sharding(args, self.trainer, model)
        self._install_late()
        if optimizer is None:
            raise ValueError("the Trainer passed no optimizer to the dynarank callback.")
        if state.global_step > 0 and self._resume is None:
            raise CheckpointError(
                f"the Trainer resumed at step {state.global_step}, but the dynarank controller state was not restored "
                "(it would restart its rank schedule at step 0): call callback.install(trainer) before "
                "trainer.train(resume_from_checkpoint=...)."
            )
        if self.controller is None:
            self.controller = build_controller(self.model, total_steps=state.max_steps)
        inner = _inner(optimizer)
        self._arrange(inner, args.learning_rate, lr_scheduler)
        if self._resume is not None:
            self._restore(inner, state)
        self._guard_steps(inner)
        self.controller.bind(inner)
        return control

    def _restore(self, inner: torch.optim.Optimizer, state) -> None:
        saved, tensors = self._resume
        if (state.global_step, state.max_steps) != (saved["step"], saved["total_steps"]):
            raise CheckpointError(
                f"the Trainer resumed at step {state.global_step} of {state.max_steps}, the dynarank state is at step "
                f"{saved['step']} of {saved['total_steps']}: the rank schedule is placed in the run's length, so "
                "resume with the arguments (max_steps / epochs, batch size, accumulation) the run started with."
            )
        # The Trainer loaded the optimizer state by position: every moment must have its parameter's shape.
        for i, group in enumerate(inner.param_groups):
            for p in group["params"]:
                for key, value in inner.state.get(p, {}).items():
                    if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                        raise CheckpointError(
                            f"the optimizer state loaded for a parameter of group {i} ({key}) has shape "
                            f"{tuple(value.shape)}, the parameter {tuple(p.shape)}: the optimizer's parameter "
                            "groups differ from the checkpoint's run."
                        )
        checkpoint.restore_controller(self.controller, saved, tensors)
        self._resume = None

    def _guard_steps(self, inner: torch.optim.Optimizer) -> None:
        """Wrap ``inner.step``: gradients of resized parameters are averaged across workers, then checked; a
        non-finite step is not taken at all (no update, no regulariser, no importance update) and the controller
        counts it as skipped, so its schedule keeps time with the Trainer's."""
        if inner in self._guarded:
            return
        self._guarded.add(inner)
        if world()[1] > 1:  # the Trainer's DDP wrapper exists now: what it knows is what it syncs
            # The controller records a rank snapshot at every resize: the parameters change only then.
            self._sync = ResizedGradientSync(self.model, layout_version=lambda: len(self.controller.history))
        original = inner.step  # possibly the LR scheduler's own wrapper: it stays in the chain

        def step(optimizer, *args, **kwargs):
            self._sync_resized()
            bad = self.guard.bad_modules()
            if self._sync is not None and any_worker(bool(bad), self._device()) and not bad:
                bad = ["another worker"]  # every worker takes the same branch
            if not bad:
                return original(*args, **kwargs)
            self.guard.react(bad)
            self.controller.skip_step(optimizer)  # drops the gradients, counts the step (may resize)
            return None

        inner.step = types.MethodType(step, inner)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _install_late(self) -> None:
        """A callback given by ``trainer.add_callback`` installs itself now (too late only for a resume): it then
        runs ahead of the report_to integrations, and under DDP gradient clipping sees averaged gradients."""
        if self.trainer is not None:
            return
        from transformers import Trainer

        trainer = _caller_of_type(Trainer)
        if trainer is not None:
            self.install(trainer)
        elif not self._order_warned:
            self._order_warned = True
            logger.warning("dynarank: call callback.install(trainer) before training (the Trainer was not found).")

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

    def on_train_end(self, args, state, control, **kwargs):
        # A run that ends before its last scheduled step (early stopping, skipped fp16 steps) still
        # leaves a plain adapter behind: ElaLoRA / AdaLoRA fold E into it.
        if self.controller is not None:
            self.controller.finish()
        self._stop_checking_loads()  # training is over: loads into the model are the user's business again
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


def _wrap(original, replacement):
    """A method calling ``replacement(original, ...)`` (bound with types.MethodType to the Trainer)."""

    def method(trainer, *args, **kwargs):
        return replacement(original, *args, **kwargs)

    return method
