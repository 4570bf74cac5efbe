"""ARD-LoRA's alphas and the rank mask they give each adapted module.

Every rank group of the model (a head, or a whole matrix) has one alpha; all of them live in ONE
(N,) parameter, module ``name`` owning ``alpha[start:stop]``. So the optimizer holds one tensor, and
the per-step work of the controller (regulariser, projection, snapshots, read-outs) is a few
vector operations whatever the number of modules.

Per group g with base rank r0 and slots j = 0..r_g-1:

    x_gj   = r0 * alpha_g - j
    soft   = clamp(x_gj, 0, 1)                      # the differentiable mask
    hard   = [x_gj > 1/2]; slots j < floor always on
    m_gj   = hard, with the gradient of soft        # mask='hard': straight-through

The straight-through mask is one autograd function: its forward value is exactly 0 or 1 (what an
exported adapter folds in), and its backward pass is the clamp's gradient, 1 where 0 <= x_gj <= 1.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layer import ElasticLoRALinear
from ..naming import ARD_ATTR as ARD_ATTR  # the model's submodule holding the alphas (re-exported)


class ARDGates(nn.Module):
    """The alphas of every group of every adapted module, as one vector; a submodule of the model so that
    ``.to(device)`` and distributed wrappers see it."""

    def __init__(self, layers: dict[str, ElasticLoRALinear]) -> None:
        super().__init__()
        self.spans: dict[str, tuple[int, int]] = {}
        start = 0
        for name, layer in layers.items():
            self.spans[name] = (start, start + layer.n_groups)
            start += layer.n_groups
        first = next(iter(layers.values()))
        self.alpha = nn.Parameter(torch.ones(start, device=first.shared_weight.device, dtype=first.shared_weight.dtype))
        # Whether the layers compute with the alphas' masks (until the final phase), saved with the weights:
        # a state dict of the model then says whether its group weights need the mask folded in.
        self.register_buffer("gated", torch.ones((), dtype=torch.bool, device=first.shared_weight.device))

    def of(self, name: str) -> torch.Tensor:
        """Module ``name``'s alphas: a (G,) view of the vector (write to it under ``torch.no_grad()``)."""
        start, stop = self.spans[name]
        return self.alpha[start:stop]

    def grad_of(self, name: str) -> torch.Tensor | None:
        """Module ``name``'s part of the alphas' gradient (None before a backward pass)."""
        if self.alpha.grad is None:
            return None
        start, stop = self.spans[name]
        return self.alpha.grad[start:stop]

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A (N,) tensor laid out like the alphas, as one (G,) piece per module."""
        return {name: flat[start:stop] for name, (start, stop) in self.spans.items()}


class _StraightThroughMask(torch.autograd.Function):
    """m = [x > 1/2] (slots below the floor: 1) forward; dL/dx = dL/dm where 0 <= x <= 1 (and not floor) backward,
    the clamp's gradient, ends included as torch's clamp has them (a fresh alpha of 1 puts the last slot at x = 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:  # x: (G, r_max); floor: (r_max,) bool
        ctx.save_for_backward((x >= 0) & (x <= 1) & ~floor)
        return ((x > 0.5) | floor).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def mask_gate(gates: ARDGates, name: str, r0: int, rank_floor: int, soft_only: bool) -> MaskGate:
    """The gate of one module: its groups' rank masks (G, r_max) from their alphas (:class:`MaskGate`)."""
    return MaskGate(gates, name, r0, rank_floor, soft_only)


class MaskGate:
    """The gate of one module: its groups' rank masks (G, r_max) from their alphas (hard with the clamp's
    gradient, or the soft clamp itself). The alphas are read at every call: the gate follows their updates.

    An object, not a closure, so that ``copy.deepcopy(model)`` gives the copy's layers gates that read the copy's
    alphas (a closure is copied by reference: the copy read the original's)."""

    def __init__(self, gates: ARDGates, name: str, r0: int, rank_floor: int, soft_only: bool) -> None:
        self.gates, self.name, self.r0, self.rank_floor, self.soft_only = gates, name, r0, rank_floor, soft_only
        self._key: tuple | None = None  # (r_max, device, dtype) of the slot indices below: one live shape at a time
        self._slots: tuple[torch.Tensor, torch.Tensor] | None = None  # (j, j < floor)

    def _slot_index(self, r_max: int, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (r_max, alpha.device, alpha.dtype)
        if self._key != key:  # the cache follows resizes and moves
            j = torch.arange(r_max, device=alpha.device, dtype=alpha.dtype)
            self._key, self._slots = key, (j, j < self.rank_floor)
        return self._slots

    def __call__(self, layer: ElasticLoRALinear) -> torch.Tensor:
        alpha = self.gates.of(self.name)
        j, floor = self._slot_index(layer.max_rank, alpha)
        x = self.r0 * alpha.unsqueeze(1) - j  # (G, r_max)
        if self.soft_only:
            return torch.where(floor, torch.ones_like(x), x.clamp(0.0, 1.0))
        return _StraightThroughMask.apply(x, floor)
