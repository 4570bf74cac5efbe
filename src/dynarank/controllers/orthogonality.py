"""The SVD methods' orthogonality penalty and its gradient, for every adapted module at once.

    R = mean over (modules, groups g with r_g > 0, factor X in {Q_g, P_g^T}) of ||X X^T - I||_F

For one term f = ||D||_F with D = X X^T - I (D symmetric), df/dX = 2 D X / f. The gradient is therefore
computed in closed form, without building an autograd graph, and batched: the factors of every module
with the same width are padded to a common rank and stacked, so a step costs one batched product per
distinct width (seven for a Llama block, whatever the depth) instead of a dozen small operations per
module. Padded rows are zero and outside the identity, so they add nothing.

In the engine's storage (docs/architecture.md) the rows of a group's factors are gathered from the
shared side (rows ``slot_index[g]``) and the group side (columns ``column_index[g]``); the gradient of
each row goes back to where it was read from. The gathers of a width are one concatenation of its modules'
tensors and one index, and the gradients one index_add_ into a flat tensor split into a view per parameter;
the indices are built once per layout (``OrthogonalityPlan``, rebuilt when a layer's ``layout_version`` or
tensors change), so a step does no per-module work beyond listing the tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from ..layer import ElasticLoRALinear


class _Width:
    """The row stacks of one factor side (shared: Q_g, group: P_g^T) of every module whose rows have width d,
    as one gather: the modules' tensors concatenated along their rows (the group side transposed, a column per
    row) with a zero row after them, and ``index`` (B, R) picking every group's rows from it (past a group's rank:
    the zero row). B = sum of the modules' groups, R = the largest rank among them."""

    def __init__(self, side: str, params: list[torch.Tensor], layers: list[ElasticLoRALinear]) -> None:
        self.side, self.params = side, params
        self.sizes = [p.shape[0] if side == "shared" else p.shape[1] for p in params]
        self.total = sum(self.sizes)
        width = params[0].shape[1] if side == "shared" else params[0].shape[0]
        r_max = max(layer.max_rank for layer in layers)
        index, ranks, offset = [], [], 0  # built from the slot lists: no tensor operation per module
        for layer, size in zip(layers, self.sizes):
            column = offset
            for slots in layer.slots:
                if side == "shared":
                    row = [offset + s for s in slots]
                else:
                    row = list(range(column, column + len(slots)))
                    column += len(slots)
                index.append(row + [self.total] * (r_max - len(slots)))  # past the rank: the zero row
                ranks.append(len(slots))
            offset += size
        device, dtype = params[0].device, params[0].dtype
        self.index = torch.tensor(index, dtype=torch.long, device=device)  # (B, R)
        self.flat_index = self.index.flatten()
        ranks_t = torch.tensor(ranks, device=device)
        valid = torch.arange(r_max, device=device) < ranks_t[:, None]  # (B, R)
        self.eye = torch.diag_embed(valid.to(dtype))  # I on each group's true rank
        self.live = ranks_t > 0
        self.zero = torch.zeros(1, width, dtype=dtype, device=device)

    @torch.no_grad()
    def rows(self) -> torch.Tensor:
        """(B, R, d): every group's rows, zero past its rank."""
        if self.side == "shared":
            return torch.cat([*self.params, self.zero])[self.index]  # rows of (sum S + 1, d)
        return torch.cat([*self.params, self.zero.t()], dim=1).t()[self.index]  # columns of (d_g, sum T + 1)

    @torch.no_grad()
    def scatter(self, grad_rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(parameter, its gradient)] from the gradient of the row stack: one index_add_, views per parameter."""
        d = grad_rows.shape[-1]
        if self.side == "shared":
            out = grad_rows.new_zeros(self.total + 1, d).index_add_(0, self.flat_index, grad_rows.reshape(-1, d))
            return list(zip(self.params, out[: self.total].split(self.sizes)))
        out = grad_rows.new_zeros(d, self.total + 1).index_add_(1, self.flat_index, grad_rows.reshape(-1, d).t())
        return list(zip(self.params, out[:, : self.total].split(self.sizes, dim=1)))


def _signature(layers: list[ElasticLoRALinear]) -> list[tuple]:
    """What a cached plan depends on: every layer's layout version and its two tensors (identity, dtype, device)."""
    out = []
    for layer in layers:
        shared, group = layer.shared_weight, layer.group_weight
        out.append((layer, shared, group, layer.layout_version, shared.dtype, group.dtype, shared.device))
    return out


def _same(a: list[tuple], b: list[tuple]) -> bool:
    """Same layers, the same tensor objects (``is``), the same versions, dtypes and device."""
    return len(a) == len(b) and all(all(x is y for x, y in zip(p[:3], q[:3])) and p[3:] == q[3:] for p, q in zip(a, b))


class OrthogonalityPlan:
    """The gathers of :func:`orthogonality_gradients`, built once per layout (every layer's ``layout_version``
    and tensors) and reused while it holds: a step then costs one concatenation and one index per width, one
    batched product, and one index_add_ per width for the gradients."""

    def __init__(self) -> None:
        self._signature: list[tuple] = []
        self.widths: list[_Width] = []

    def widths_for(self, layers: Iterable[ElasticLoRALinear]) -> list[_Width]:
        layers = list(layers)
        signature = _signature(layers)
        if not _same(signature, self._signature):
            self.widths = _plan(layers)
            self._signature = signature
        return self.widths


def _plan(layers: list[ElasticLoRALinear]) -> list[_Width]:
    by_width: dict[tuple, tuple[list, list]] = {}
    for layer in layers:
        if layer.max_rank == 0:
            continue
        shared, group = layer.shared_weight, layer.group_weight
        for side, p, width in (("shared", shared, shared.shape[1]), ("group", group, group.shape[0])):
            params, owners = by_width.setdefault((side, width, p.dtype, p.device), ([], []))
            params.append(p)
            owners.append(layer)
    return [_Width(key[0], params, owners) for key, (params, owners) in by_width.items()]


def orthogonality_gradients(
    layers: Iterable[ElasticLoRALinear], weight: float, plan: OrthogonalityPlan | None = None
) -> tuple[torch.Tensor | None, list[tuple[torch.nn.Parameter, torch.Tensor]]]:
    """(R, [(parameter, weight * dR/dparameter), ...]); (None, []) when no module has a rank left.

    R stays on the device (no wait for it). ``plan`` keeps the gathers from one call to the next (rebuilt when
    a layout changed); without one they are built for this call."""
    widths = (plan or OrthogonalityPlan()).widths_for(layers)
    if not widths:
        return None, []
    batches = []
    for w in widths:
        rows = w.rows()  # every group of every module of this width, padded to a common rank: (B, R, d)
        diff = rows @ rows.transpose(1, 2) - w.eye  # D = X X^T - I  (B, R, R)
        norms = torch.linalg.matrix_norm(diff)  # (B,)
        batches.append((w, rows, diff, norms, w.live))
    n_terms = torch.stack([live.sum() for *_, live in batches]).sum()  # a device scalar: no wait for the device
    penalty = torch.stack([torch.where(live, norms, 0.0).sum() for *_, norms, live in batches]).sum() / n_terms
    updates = []
    for w, rows, diff, norms, live in batches:
        scale = torch.where(live & (norms > 0), 2.0 * weight / (n_terms * norms.clamp(min=1e-30)), 0.0)
        updates.extend(w.scatter((diff @ rows) * scale[:, None, None]))  # (B, R, d) -> each parameter
    return penalty, updates


def add_orthogonality_gradient(
    layers: Iterable[ElasticLoRALinear], weight: float, plan: OrthogonalityPlan | None = None
) -> torch.Tensor | None:
    """Add ``weight * dR/dw`` to the gradient of every factor; returns R, a device scalar (None: no rank left)."""
    penalty, updates = orthogonality_gradients(layers, weight, plan)
    if penalty is None:
        return None
    with torch.no_grad():
        accumulate = [(p, g) for p, g in updates if p.grad is not None]
        for p, g in updates:
            if p.grad is None:
                p.grad = g.clone(memory_format=torch.contiguous_format)
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
