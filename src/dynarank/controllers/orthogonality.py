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
the indices are built once per layout (``OrthogonalityPlan``: after a layer's ``layout_version`` or tensors change,
only the widths holding it are built again), so a step does no per-module work beyond checking the layers.
"""

from __future__ import annotations

import itertools
import operator
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
        self.side, self.params, self.layers = side, params, layers
        shared = side == "shared"
        self.sizes = [p.shape[0] if shared else p.shape[1] for p in params]
        self.total = sum(self.sizes)
        width = params[0].shape[1] if shared else params[0].shape[0]
        layouts = [layer.slot_tuple for layer in layers]
        ranks = [len(slots) for layout in layouts for slots in layout]  # one per group, modules in order
        r_max = max(ranks)
        # The valid entries of the index, row by row: a shared-side row is its slot plus the module's first row;
        # the group side packs every group's columns in order and the modules one after another, so its valid
        # entries are 0, 1, ..., total - 1 in that order.
        if shared:
            starts = itertools.accumulate(self.sizes[:-1], initial=0)  # each module's first row
            valid_entries = torch.tensor(
                [start + s for layout, start in zip(layouts, starts) for slots in layout for s in slots],
                dtype=torch.long,
            )
        else:
            valid_entries = torch.arange(self.total)
        ranks_t = torch.tensor(ranks)
        valid = torch.arange(r_max) < ranks_t[:, None]  # (B, R)
        index = torch.full(valid.shape, self.total, dtype=torch.long)  # past a group's rank: the zero row
        index[valid] = valid_entries  # row-major: every group's rows in order
        device, dtype = params[0].device, params[0].dtype
        self.index = index.to(device)  # (B, R)
        self.flat_index = self.index.flatten()
        self.eye = torch.diag_embed(valid.to(device=device, dtype=dtype))  # I on each group's true rank
        self.live = (ranks_t > 0).to(device)
        self.zero = torch.zeros(1, width, dtype=dtype, device=device)

    def held_bytes(self) -> int:
        """Bytes of what the width holds besides the parameters: its index (``flat_index`` is a view of it), the
        identity, the live flags and the zero row."""
        return sum(t.numel() * t.element_size() for t in (self.index, self.eye, self.live, self.zero))

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


def _signature(layer: ElasticLoRALinear) -> tuple:
    """What a layer's part of a cached plan depends on: its layout version and its two tensors (identity, dtype,
    device)."""
    shared, group = layer.factors()
    return (shared, group, layer.layout_version, shared.dtype, group.dtype, shared.device)


def _same(a: tuple | None, b: tuple) -> bool:
    """The same tensor objects (``is``), the same version, dtypes and device."""
    return a is not None and a[0] is b[0] and a[1] is b[1] and a[2:] == b[2:]


class OrthogonalityPlan:
    """The gathers of :func:`orthogonality_gradients`, built once per layout and reused while it holds: a step then
    costs one concatenation and one index per width, one batched product, and one index_add_ per width for the
    gradients. When layers change (a resize touches a few modules), only the widths holding one of them are built
    again, and the modules are sorted into widths again only when one joins or leaves a width (its last rank gone,
    a new dtype or device)."""

    def __init__(self) -> None:
        self._signatures: dict[ElasticLoRALinear, tuple] = {}  # layer -> its signature when the plan was built
        self._keys: dict[ElasticLoRALinear, tuple] = {}  # layer -> the widths it belongs to
        self._layers: list[ElasticLoRALinear] = []
        self._members: dict[tuple, list[ElasticLoRALinear]] = {}  # (side, width, dtype, device) -> its layers
        self._by_key: dict[tuple, _Width] = {}
        self.widths: list[_Width] = []
        self._quick: tuple | None = None  # _quick_key of the layers when the plan was last checked

    def held_bytes(self) -> int:
        """Bytes of the gathers the plan holds (:meth:`_Width.held_bytes` of every width)."""
        return sum(w.held_bytes() for w in self.widths)

    def widths_for(self, layers: Iterable[ElasticLoRALinear]) -> list[_Width]:
        layers = list(layers)
        # The common step changes nothing: the same layers at the same versions, with the same tensors (identity,
        # dtype, device), compared in C (``map``) rather than a signature built per layer.
        quick = _quick_key(layers)
        if self._quick is not None and _same_quick_key(quick, self._quick):
            return self.widths
        self._quick = quick
        signatures = [_signature(layer) for layer in layers]
        same_layers = len(layers) == len(self._layers) and all(a is b for a, b in zip(layers, self._layers))
        changed = {
            layer
            for layer, signature in zip(layers, signatures)
            if not same_layers or not _same(self._signatures.get(layer), signature)
        }
        if not changed:
            return self.widths
        if not same_layers or any(_keys(layer) != self._keys[layer] for layer in changed):
            self._keys = {layer: _keys(layer) for layer in layers}
            self._members = {}
            for layer in layers:
                for key in self._keys[layer]:
                    self._members.setdefault(key, []).append(layer)
        by_key = {}
        for key, owners in self._members.items():
            width = self._by_key.get(key)
            if (
                width is None
                or len(width.layers) != len(owners)
                or any(a is not b for a, b in zip(width.layers, owners))
                or any(owner in changed for owner in owners)
            ):
                side = key[0]
                params = [owner.factors()[0 if side == "shared" else 1] for owner in owners]
                width = _Width(side, params, owners)
            by_key[key] = width
        self._by_key, self.widths = by_key, list(by_key.values())
        self._layers, self._signatures = layers, dict(zip(layers, signatures))
        return self.widths


def _quick_key(layers: list[ElasticLoRALinear]) -> tuple:
    """(layers, their layout versions, their factors, the factors' dtypes and devices): what the plan depends on, as
    lists built in one pass each."""
    factors = [layer._parameters for layer in layers]  # ElasticLoRALinear.factors() without the call per layer
    shared = [p["shared_weight"] for p in factors]
    group = [p["group_weight"] for p in factors]
    return (
        layers,
        [layer.layout_version for layer in layers],
        shared,
        group,
        [(p.dtype, p.device) for p in shared],
        [p.dtype for p in group],
    )


def _same_quick_key(a: tuple, b: tuple) -> bool:
    """Equal quick keys: the same objects (``is``) in the lists of layers and tensors, equal versions, dtypes and
    devices."""
    return (
        len(a[0]) == len(b[0])
        and all(map(operator.is_, a[0], b[0]))
        and all(map(operator.is_, a[2], b[2]))
        and all(map(operator.is_, a[3], b[3]))
        and a[1] == b[1]
        and a[4] == b[4]
        and a[5] == b[5]
    )


def _keys(layer: ElasticLoRALinear) -> tuple:
    """The widths (side, width, dtype, device) a layer's factors belong to; none once it has no rank left."""
    if layer.max_rank == 0:
        return ()
    shared, group = layer.factors()
    return (
        ("shared", shared.shape[1], shared.dtype, shared.device),
        ("group", group.shape[0], group.dtype, group.device),
    )


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
