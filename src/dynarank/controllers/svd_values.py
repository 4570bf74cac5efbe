"""The singular values E of the SVD methods (ElaLoRA, AdaLoRA): one flat vector over every adapted module, a
submodule of the model (``model.dynarank_svd``), and the AdaLoRA initialisation of fresh adapters it makes.

The controller that trains and resizes it is svd.py.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layer import ElasticLoRALinear
from ..naming import SVD_ATTR
from .flat_views import FlatViews

INIT_STD = 0.02  # P, Q ~ N(0, 0.02) (AdaLoRA / ElaLoRA)


class SVDValues(nn.Module):
    """E of every adapted module, as ONE vector (one optimizer parameter, one score state): module ``name``
    owns ``values[start:stop]``, aligned with its layer's packed group-side columns (T of them).

    A submodule of the model (``model.dynarank_svd``) so that ``.to()`` and distributed wrappers
    see it. Creating it starts fresh adapters as ``start`` says: 'adalora' draws P, Q ~ N(0, 0.02) with E = 0
    (AdaLoRA / ElaLoRA); 'lora' keeps the factors as the layer drew them, plain LoRA's (A kaiming-uniform, B = 0),
    with E = 1, so the update is plain LoRA's until the ranks move. An adapter that already carries an update (a
    loaded one) keeps it, with E = 1.
    """

    def __init__(
        self, layers: dict[str, ElasticLoRALinear], generator: torch.Generator | None = None, start: str = "adalora"
    ) -> None:
        super().__init__()
        if start not in ("adalora", "lora"):
            raise ValueError(f"start must be 'adalora' or 'lora', not {start!r}.")
        parts = []
        for layer in layers.values():
            fresh = start == "adalora" and init_svd_factors(layer, generator)
            w = layer.group_weight
            parts.append(torch.full((w.shape[1],), 0.0 if fresh else 1.0, dtype=w.dtype, device=w.device))
        self.values = nn.Parameter(torch.cat(parts))
        self._layers = layers  # plain dict, not submodules: the layers belong to the model
        self.respan(layers)

    def respan(self, layers: dict[str, ElasticLoRALinear]) -> None:
        """Recompute every module's span from its layer's current width (after a resize). The views cut before are
        dropped: they would be cut anew anyway, and they hold the E a resize replaced (and its gradient)."""
        self._views = FlatViews()
        self.spans: dict[str, tuple[int, int]] = {}
        start = 0
        for name, layer in layers.items():
            self.spans[name] = (start, start + layer.group_weight.shape[1])
            start += layer.group_weight.shape[1]

    def pieces(self) -> dict[str, torch.Tensor]:
        """Every module's E as a view of the vector, cut by one split per version of E (flat_views.py): what the
        layers' gates read in a forward pass."""
        return self._views.of(self.values, self.spans)  # respan() makes a new spans dict

    def of(self, name: str) -> torch.Tensor:
        """Module ``name``'s E: a (T,) view of the vector."""
        start, stop = self.spans[name]
        return self.values[start:stop]

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A tensor laid out like E, as one piece per module."""
        return {name: flat[start:stop] for name, (start, stop) in self.spans.items()}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """Saved E of another size (a run that resized since): take its size, then load it. The layers, loaded
        before this module (they come first in the model), already have the saved layout."""
        saved = state_dict.get(prefix + "values")
        if saved is not None and saved.shape != self.values.shape:
            self.values = nn.Parameter(self.values.new_zeros(saved.shape), requires_grad=self.values.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        if self._layers is not None:
            self.respan(self._layers)

    def match_layout(self, layers: dict[str, ElasticLoRALinear]) -> None:
        """Give E the size of the layers' current rank layout (values zero; a restore fills them).

        For code that reshapes layers outside the controller (``set_slots`` when restoring a checkpoint).
        """
        total = sum(layer.group_weight.shape[1] for layer in layers.values())
        if self.values.shape[0] != total:
            self.values = nn.Parameter(self.values.new_zeros(total), requires_grad=self.values.requires_grad)
        self.respan(layers)


@torch.no_grad()
def init_svd_factors(layer: ElasticLoRALinear, generator: torch.Generator | None = None) -> bool:
    """Draw P and Q from N(0, 0.02) if the adapter is fresh (its B side is zero); returns whether it was."""
    b_side = layer.group_weight if layer.split == "rows" else layer.shared_weight
    if b_side.numel() and bool(b_side.any()):
        return False
    for p in layer.adapter_parameters():
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype) * INIT_STD
        p.copy_(noise.to(p.device))
    return True


def ensure_svd_values(
    model: nn.Module, layers: dict[str, ElasticLoRALinear], seed: int | None, start: str = "adalora"
) -> SVDValues:
    """``model.dynarank_svd``, created (and fresh adapters started as ``start`` says: SVDValues) on the first call."""
    values = getattr(model, SVD_ATTR, None)
    if values is None:
        generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        values = SVDValues(layers, generator, start)
        model.add_module(SVD_ATTR, values)
    return values
