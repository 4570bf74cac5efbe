"""The SVD methods' orthogonality penalty and its gradient, for every adapted module at once.

    R = mean over (modules, groups g with r_g > 0, factor X in {Q_g, P_g^T}) of ||X X^T - I||_F

For one term f = ||D||_F with D = X X^T - I (D symmetric), df/dX = 2 D X / f. The gradient is therefore
computed in closed form, without building an autograd graph, and batched: the factors of every module
with the same width are padded to a common rank and stacked, so a step costs one batched product per
distinct width (seven for a Llama block, whatever the depth) instead of a dozen small operations per
module. Padded rows are zero and outside the identity, so they add nothing.

In the engine's storage (docs/architecture.md) the rows of a group's factors are gathered from the
shared side (rows ``slot_index[g]``) and the group side (columns ``column_index[g]``); the gradient of
each row goes back to where it was read from.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from ..layer import ElasticLoRALinear


@dataclass
class _Rows:
    """One factor of one module as row stacks: rows (G, r_max, d) (the dense case: (r, d) for G = 1), and every
    group's true rank (rows past it are zero)."""

    layer: ElasticLoRALinear
    side: str  # "shared" or "group"
    rows: torch.Tensor
    ranks: list[int]


def factor_rows(layer: ElasticLoRALinear) -> tuple[_Rows, _Rows]:
    """Every group's factors as row stacks: shared (G, r_max, d_other) and group (G, r_max, d_g).

    Rows: shared = Q_g (A rows), group = P_g^T (B columns); cols: shared = P_g^T, group = Q_g.
    """
    g, d_g, ranks = layer.n_groups, layer.group_size, layer.ranks
    if layer._dense:  # equal ranks, own slots: plain views of the storage
        r = layer.max_rank
        shared = layer.shared_weight.detach().view(g, r, layer.other_dim)
        group = layer.group_weight.detach().view(d_g, g, r).permute(1, 2, 0)
    else:
        shared = F.pad(layer.shared_weight.detach(), (0, 0, 0, 1))[layer.slot_index]
        group = F.pad(layer.group_weight.detach(), (0, 1))[:, layer.column_index].permute(1, 2, 0)
    return _Rows(layer, "shared", shared, ranks), _Rows(layer, "group", group, ranks)


def _scatter_back(part: _Rows, grad_rows: torch.Tensor) -> torch.Tensor:
    """The gradient of the stored tensor from the gradient of its row stack (G, r_max, d)."""
    layer = part.layer
    if part.side == "shared":
        if layer._dense:
            return grad_rows.reshape(layer.n_slots, layer.other_dim)
        out = grad_rows.new_zeros(layer.n_slots + 1, layer.other_dim)
        out.index_add_(0, layer.slot_index.flatten(), grad_rows.reshape(-1, layer.other_dim))
        return out[: layer.n_slots]
    if layer._dense:
        return grad_rows.permute(2, 0, 1).reshape(layer.group_size, -1)
    n_cols = layer.group_weight.shape[1]
    out = grad_rows.new_zeros(layer.group_size, n_cols + 1)
    out.index_add_(1, layer.column_index.flatten(), grad_rows.reshape(-1, layer.group_size).t())
    return out[:, :n_cols]


def orthogonality_gradients(
    layers: Iterable[ElasticLoRALinear], weight: float
) -> tuple[torch.Tensor | None, list[tuple[torch.nn.Parameter, torch.Tensor]]]:
    """(R, [(parameter, weight * dR/dparameter), ...]); (None, []) when no module has a rank left.

    R stays on the device (no wait for it)."""
    by_width: dict[tuple, list[_Rows]] = {}
    for layer in layers:
        if layer.max_rank == 0:
            continue
        for part in factor_rows(layer):
            key = (part.side, part.rows.shape[-1], part.rows.dtype, part.rows.device)
            by_width.setdefault(key, []).append(part)
    if not by_width:
        return None, []
    batches = []
    for parts in by_width.values():
        # Every group of every module of this width, padded to a common rank: (B, R, d), B = sum of groups.
        items = [row for part in parts for row in part.rows.unbind(0)]
        rows = pad_sequence(items, batch_first=True)
        ranks = torch.tensor([r for part in parts for r in part.ranks], device=rows.device)
        valid = torch.arange(rows.shape[1], device=rows.device) < ranks[:, None]  # (B, R)
        diff = rows @ rows.transpose(1, 2) - torch.diag_embed(valid.to(rows.dtype))  # D = X X^T - I  (B, R, R)
        norms = torch.linalg.matrix_norm(diff)  # (B,)
        batches.append((parts, rows, diff, norms, ranks > 0))
    n_terms = torch.stack([live.sum() for *_, live in batches]).sum()  # a device scalar: no wait for the device
    penalty = torch.stack([torch.where(live, norms, 0.0).sum() for *_, norms, live in batches]).sum() / n_terms
    updates = []
    for parts, rows, diff, norms, live in batches:
        scale = torch.where(live & (norms > 0), 2.0 * weight / (n_terms * norms.clamp(min=1e-30)), 0.0)
        grad_rows = (diff @ rows) * scale[:, None, None]  # (B, R, d)
        start = 0
        for part in parts:
            g, r = part.rows.shape[:2]
            grad = _scatter_back(part, grad_rows[start : start + g, :r])
            param = part.layer.shared_weight if part.side == "shared" else part.layer.group_weight
            updates.append((param, grad))
            start += g
    return penalty, updates


def add_orthogonality_gradient(layers: Iterable[ElasticLoRALinear], weight: float) -> torch.Tensor | None:
    """Add ``weight * dR/dw`` to the gradient of every factor; returns R, a device scalar (None: no rank left)."""
    penalty, updates = orthogonality_gradients(layers, weight)
    if penalty is None:
        return None
    with torch.no_grad():
        accumulate = [(p, g) for p, g in updates if p.grad is not None]
        for p, g in updates:
            if p.grad is None:
                p.grad = g.clone()
        if accumulate:
            torch._foreach_add_([p.grad for p, _ in accumulate], [g for _, g in accumulate])
    return penalty.detach()


def orthogonality_penalty(layers: Iterable[ElasticLoRALinear]) -> torch.Tensor | None:
    """R as a differentiable value of the factors (for tests and readers; training uses the closed form)."""
    terms = []
    for layer in layers:
        if layer.max_rank == 0:
            continue
        shared = F.pad(layer.shared_weight, (0, 0, 0, 1))[layer.slot_index]
        group = F.pad(layer.group_weight, (0, 1))[:, layer.column_index].permute(1, 2, 0)
        valid = layer.slot_index < layer.n_slots
        eye = torch.diag_embed(valid.to(shared.dtype))
        live = valid.any(dim=1)
        for x in (shared, group):
            terms.append(torch.linalg.matrix_norm(x @ x.transpose(1, 2) - eye)[live])
    if not terms:
        return None
    return torch.cat(terms).mean()
