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
"""

from __future__ import annotations

import statistics

import torch
from torch import nn
from transformers import TrainerCallback

from ..controllers import RankController, build_controller, prepare_parameters
from ..report import split_name


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


class DynaRankCallback(TrainerCallback):
    """Drive a dynarank controller from ``transformers.Trainer``; no manual call per step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.gate_parameters = prepare_parameters(model)
        self.controller: RankController | None = None

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
        self.controller.bind(inner)
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
