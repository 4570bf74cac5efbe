"""Finding NaN / inf where training produces them: gradients after a backward pass, module outputs of a forward pass.

Used by the training loop and the Trainer integration alike, at every step: the common case (all finite)
waits for the device once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


@torch.no_grad()
def nonfinite_gradients(model: nn.Module) -> list[str]:
    """Names of the modules whose parameter gradients hold NaN or inf.

    Runs at every step: the per-parameter checks stay on their device and are reduced to one flag, so
    the common case (all finite) waits for the device once per device; modules are named only when
    something is not finite.
    """
    grads: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            grads.setdefault(p.grad.device, []).append((name, p.grad))
    bad = set()
    for named in grads.values():
        finite = torch.stack([torch.isfinite(g).all() for _, g in named])
        if not finite.all():
            bad.update(name.rsplit(".", 1)[0] for (name, _), ok in zip(named, finite.tolist()) if not ok)
    return sorted(bad)


@torch.no_grad()
def first_nonfinite_module(model: nn.Module, inputs: dict) -> str | None:
    """Name of the first module (in execution order) whose output holds NaN or inf on ``inputs``.

    A diagnostic forward pass, run only after a non-finite loss; None if every module output is finite
    (the loss computation itself went wrong).
    """
    found: list[str] = []

    def tensors(output) -> list[torch.Tensor]:
        if torch.is_tensor(output):
            return [output]
        if isinstance(output, Mapping):  # dicts and transformers' ModelOutput
            output = list(output.values())
        return [t for t in output if torch.is_tensor(t)] if isinstance(output, (tuple, list)) else []

    def check(name):
        def hook(module, args, output):
            if not found and any(t.is_floating_point() and not torch.isfinite(t).all() for t in tensors(output)):
                found.append(name)

        return hook

    handles = [m.register_forward_hook(check(n)) for n, m in model.named_modules() if n]
    was_training = model.training
    try:
        model.eval()  # no dropout: the same function as the failed step, minus its randomness
        model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found[0] if found else None
