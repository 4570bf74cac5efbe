"""Rank controllers: one per method, all driven from the optimizer's step hooks."""

from __future__ import annotations

from torch import nn

from ..attach import ATTACHED_ATTR
from .ard import ARDController, ARDSettings
from .base import RankController, StepRecord

CONTROLLERS: dict[str, type[RankController]] = {"lora": RankController, "ard": ARDController}


def build_controller(model: nn.Module, total_steps: int | None = None) -> RankController:
    """The controller of the method the model was attached with."""
    config = getattr(model, ATTACHED_ATTR, None)
    if config is None:
        raise ValueError("build_controller() needs a model returned by dynarank.attach().")
    return CONTROLLERS[config.method](model, total_steps)


__all__ = ["ARDController", "ARDSettings", "CONTROLLERS", "RankController", "StepRecord", "build_controller"]
