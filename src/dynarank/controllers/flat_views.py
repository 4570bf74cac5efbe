"""One flat parameter (the SVD methods' E) read by many layers' gates, as one view per module.

A layer's gate used to read its module's slice of the flat vector. The backward pass of a slice is a zero tensor
of the vector's full size with the slice's gradient copied in, accumulated into the vector's gradient: per module
and per step, three operations and a full-size tensor, 224 of each in a model with 224 adapted modules. One
``torch.split`` of the vector gives every module's view from a single autograd node, whose backward pass is one
concatenation. The split keeps no tensor for its backward pass, so the views serve every forward pass until the
vector changes (an optimizer step or a write under ``no_grad`` bumps its version; a resize replaces it; ``.to()``
swaps its data); they are cut anew under another grad mode, so a view made under ``no_grad`` never feeds a
training step.

Measured on the 224-module decoder of benchmarks/method_overhead.py, paired in one process: ElaLoRA's forward and
backward pass 3.8 ms faster a step (of about 170 ms). ARD's alphas, whose mask keeps tensors of its own per
module, gained nothing measurable and read their slices as before.
"""

from __future__ import annotations

import torch


class FlatViews:
    """The cached split of one flat tensor into named pieces."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._flat: torch.Tensor | None = None
        self._spans: dict[str, tuple[int, int]] | None = None
        self._views: dict[str, torch.Tensor] = {}

    def of(self, flat: torch.Tensor, spans: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
        """{name: flat[start:stop]} for contiguous ``spans`` covering ``flat`` in order (a new layout comes as a new
        ``spans`` dict)."""
        key = (flat._version, flat.data_ptr(), flat.device, torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        if self._flat is not flat or self._spans is not spans or self._key != key:
            widths = [stop - start for start, stop in spans.values()]
            self._views = dict(zip(spans, torch.split(flat, widths)))
            self._flat, self._spans, self._key = flat, spans, key
        return self._views

    def __deepcopy__(self, memo) -> FlatViews:
        """A copy starts with no views: they are non-leaf tensors of the original's graph (which deepcopy refuses),
        and the copy's vector is another tensor anyway."""
        return FlatViews()
