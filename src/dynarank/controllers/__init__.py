"""Rank controllers: one per method, all driven from the optimizer's step hooks."""

from __future__ import annotations

from torch import nn

from ..attach import ATTACHED_ATTR, elastic_layers
from ..config import SVDConfig
from ..naming import uncompiled
from .adalora import AdaLoRAController
from .ard import ARDController
from .ard_gates import ARD_ATTR, ARDGates
from .ard_settings import ARDSettings
from .base import BudgetRecord, RankController, StepRecord
from .elalora import ElaLoRAController
from .load_folding import install_gate_folding
from .svd import ensure_svd_values, svd_init_of

CONTROLLERS: dict[str, type[RankController]] = {
    "dynarank-lora": RankController,
    "ard": ARDController,
    "elalora": ElaLoRAController,
    "adalora-physical": AdaLoRAController,
}


def build_controller(model: nn.Module, total_steps: int | None = None, *, restoring: bool = False) -> RankController:
    """The controller of the method the model was attached with (``restoring``: for a checkpoint's state, which
    :func:`dynarank.checkpoint.restore_controller` gives it next; see RankController). A ``torch.compile``'d model
    is controlled through the model it compiled, whose module names its state and records use."""
    model = uncompiled(model)
    config = getattr(model, ATTACHED_ATTR, None)
    if config is None:
        raise ValueError("build_controller() needs a model returned by dynarank.attach().")
    controller = CONTROLLERS[config.method](model, total_steps, restoring=restoring)
    install_gate_folding(model)
    return controller


def prepare_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Create the controller's own parameters now (before an optimizer or a distributed wrapper is
    built); the controller built later reuses them.

    Returns ARD's alphas (model parameters, stepped by the controller's own optimizer); ElaLoRA /
    AdaLoRA's singular values E (``model.dynarank_svd``, created here, and fresh adapters started as the config's
    ``svd_init`` says) train with the adapters, in the caller's optimizer: none returned.
    """
    model = uncompiled(model)
    config = getattr(model, ATTACHED_ATTR, None)
    if config is None:
        raise ValueError("prepare_parameters() needs a model returned by dynarank.attach().")
    install_gate_folding(model)
    if config.method == "ard":
        if getattr(model, ARD_ATTR, None) is None:
            model.add_module(ARD_ATTR, ARDGates(elastic_layers(model)))
        return list(getattr(model, ARD_ATTR).parameters())
    if isinstance(config, SVDConfig):
        ensure_svd_values(model, elastic_layers(model), config.seed, svd_init_of(model)[0])
    return []


__all__ = [
    "ARDController",
    "AdaLoRAController",
    "BudgetRecord",
    "ElaLoRAController",
    "ARDSettings",
    "CONTROLLERS",
    "RankController",
    "StepRecord",
    "build_controller",
    "prepare_parameters",
]
