"""Resize a parameter in place and carry its optimizer state along.

A resize is a *re-index*: the new tensor is ``cat([old, appended], dim)[source]`` along one
dimension. Kept entries keep their optimizer moments bit for bit, appended entries start
with zero moments, scalar state (Adam's ``step``) is left alone. The Parameter object is
the same before and after (``param.data`` is swapped), so an optimizer and the
learning-rate scheduler bound to it stay valid.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _as_optimizers(optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None):
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    return list(optimizer)


def _reindex(tensor: torch.Tensor, dim: int, source: torch.Tensor, n_appended: int, fill=None) -> torch.Tensor:
    if n_appended:
        shape = list(tensor.shape)
        shape[dim] = n_appended
        extra = fill if fill is not None else tensor.new_zeros(shape)
        tensor = torch.cat([tensor, extra.to(dtype=tensor.dtype, device=tensor.device)], dim)
    return tensor.index_select(dim, source.to(tensor.device))


@torch.no_grad()
def reindex_parameter(
    param: torch.nn.Parameter,
    dim: int,
    source: torch.Tensor,
    appended: torch.Tensor | None = None,
    optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
) -> None:
    """Replace ``param`` by ``cat([param, appended], dim).index_select(dim, source)``.

    Args:
        param: the parameter to resize; stays the same object.
        dim: the dimension along which slots are kept, dropped, reordered or appended.
        source: 1-D long tensor; entry i names the old index (or ``len + k`` for the k-th
            appended slice) that becomes index i.
        appended: new slices (same shape as ``param`` except along ``dim``), or None.
        optimizer: optimizer(s) whose per-element state follows the same re-index.
    """
    n_appended = 0 if appended is None else appended.shape[dim]
    old_shape = param.shape
    for opt in _as_optimizers(optimizer):
        state = opt.state.get(param)
        if not state:
            continue
        for key, value in list(state.items()):
            if torch.is_tensor(value) and value.shape == old_shape and value.dim() > 0:
                state[key] = _reindex(value, dim, source, n_appended)
    param.data = _reindex(param.data, dim, source, n_appended, fill=appended)
    param.grad = None


def state_bytes(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]) -> int:
    """Bytes held by ``optimizer`` state for ``params`` (tensors only)."""
    total = 0
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total
