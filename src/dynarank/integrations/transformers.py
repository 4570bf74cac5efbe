"""transformers Trainer integration: one callback drives the rank controller.

    model = dynarank.attach(model, DynaRankConfig(method="ard", ...))
    callback = DynaRankCallback(model)        # before the Trainer: creates the alphas
    trainer = Trainer(model=model, args=args, train_dataset=ds)
    callback.install(trainer)                  # first in line, so report_to backends see its logs
    trainer.train()

At ``on_train_begin`` the callback builds the controller with the Trainer's total optimizer
steps, moves the controller's parameters into their own optimizer group (their learning rate,
no weight decay) and binds the controller to the optimizer's step hooks: it then runs inside
every optimizer step (gradient accumulation counts optimizer steps). ``on_log`` adds the total
rank, the trainable parameters and the mean rank per projection type to the logs.

Under DDP (torchrun / accelerate launch) a resize hands the adapters NEW parameter tensors, which
the Trainer's DDP wrapper (built once, before training) does not know: their gradients would stay
per worker. The callback therefore averages, across workers, the gradients of every trainable
parameter the wrapper was not built with, in the optimizer's pre-step hook, before the controller
reads them. Every worker then updates, scores and resizes from the same global gradient.
"""

from __future__ import annotations

import logging
import statistics

import torch
from torch import nn
from transformers import TrainerCallback

from ..controllers import RankController, build_controller, prepare_parameters
from ..report import split_name

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


class ResizedGradientSync:
    """Optimizer pre-step hook: average across workers the gradients of parameters a distributed
    wrapper does not know (those created by resizes after it was built)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.known = {id(p) for p in model.parameters() if p.requires_grad}

    def unknown(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad and id(p) not in self.known]

    @torch.no_grad()
    def __call__(self, optimizer, args, kwargs) -> None:
        import torch.distributed as dist

        params = self.unknown()
        if not params:
            return
        device = params[0].device
        present = torch.tensor([float(p.grad is not None) for p in params], device=device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)  # a gradient on any worker: sync it everywhere
        synced = [p for p, flag in zip(params, present.tolist()) if flag]
        if not synced:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in synced])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p in synced:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()


class NonFiniteGuard:
    """Optimizer pre-step hook: a step whose gradients hold NaN or inf is dropped (every gradient set to
    None, so AdamW leaves every parameter and moment as it was) or stops training ('stop'), naming the
    modules. The controller still counts the step, so its schedule keeps time with the Trainer's."""

    def __init__(self, model: nn.Module, policy: str) -> None:
        self.model, self.policy = model, policy
        self.skipped = 0

    @torch.no_grad()
    def __call__(self, optimizer, args, kwargs) -> None:
        bad = sorted(
            {
                name.rsplit(".", 1)[0]
                for name, p in self.model.named_parameters()
                if p.grad is not None and not torch.isfinite(p.grad).all()
            }
        )
        if not bad:
            return
        message = f"non-finite gradients in: {', '.join(bad[:5])}"
        if self.policy == "stop":
            raise FloatingPointError(f"dynarank: {message}; training stopped (on_nonfinite='stop').")
        logger.warning("dynarank: %s; optimizer step skipped", message)
        self.skipped += 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and (torch.distributed.get_world_size() > 1)
    )


class DynaRankCallback(TrainerCallback):
    """Drive a dynarank controller from ``transformers.Trainer``; no manual call per step."""

    def __init__(self, model: nn.Module, on_nonfinite: str = "skip") -> None:
        """``on_nonfinite``: 'skip' drops an optimizer step whose gradients are NaN/inf (naming the
        modules), 'stop' raises; the Trainer's own checkpoints are what a stopped run keeps."""
        if on_nonfinite not in ("skip", "stop"):
            raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}.")
        self.model = model
        self.gate_parameters = prepare_parameters(model)
        self.controller: RankController | None = None
        self.guard = NonFiniteGuard(model, on_nonfinite)
        self._sync_hook = None
        self._guard_hook = None

    def install(self, trainer) -> DynaRankCallback:
        """Add this callback to ``trainer`` ahead of the logging integrations."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            raise ValueError(
                "dynarank resizes adapter tensors while training; FSDP and DeepSpeed ZeRO shard them into flat "
                "buffers that cannot be resized. Use plain data parallelism (DDP: torchrun / accelerate launch)."
            )
        if self.controller is None:
            self.controller = build_controller(self.model, total_steps=state.max_steps)
        if optimizer is None:
            raise ValueError("the Trainer passed no optimizer to the dynarank callback.")
        inner = _inner(optimizer)
        gate_ids = {id(p) for p in self.gate_parameters}
        for group in inner.param_groups:  # the Trainer put the alphas among the adapters
            group["params"] = [p for p in group["params"] if id(p) not in gate_ids]
        if self.gate_parameters and not any(g.get("name") == "ard_alpha" for g in inner.param_groups):
            alpha_group = self.controller.param_groups(args.learning_rate)[-1]
            inner.add_param_group(alpha_group)
            _extend_scheduler(lr_scheduler, alpha_group["lr"])
        # Registered before the controller's hooks, so they run first: gradients are averaged across
        # workers, then checked, then read by the controller.
        if _distributed() and self._sync_hook is None:
            self._sync_hook = inner.register_step_pre_hook(ResizedGradientSync(self.model))
        if self._guard_hook is None:
            self._guard_hook = inner.register_step_pre_hook(self.guard)
        self.controller.bind(inner)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # A run that ends before its last scheduled step (early stopping, skipped fp16 steps) still
        # leaves a plain adapter behind: ElaLoRA / AdaLoRA fold E into it.
        if self.controller is not None:
            self.controller.finish()
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
