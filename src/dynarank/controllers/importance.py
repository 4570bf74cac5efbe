"""Importance of every adapter element and of every rank (AdaLoRA / ElaLoRA).

Per element w with gradient g (after the optimizer step, as both authors' codes do):

    I    = |w * g|                                  # sensitivity
    Ibar = beta1 * Ibar + (1 - beta1) * I            # smoothed sensitivity
    Ubar = beta2 * Ubar + (1 - beta2) * |I - Ibar|   # uncertainty (with the new Ibar)
    s    = Ibar * Ubar

Score of rank j of group g (a triplet E_gj, A row, B column):

    S_gj = s(E_gj) + mean_i s(A_gj,i) + mean_i s(B_i,gj)

In the engine's storage (docs/architecture.md) a rank owns one shared-side row (slot
``slots[g][j]``) and one group-side column (packed column ``sum(r[:g]) + j``); whichever is A
or B, the triplet score is ``s(E)[c] + mean(s(shared)[slot, :]) + mean(s(group)[:, c])``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..layer import ElasticLoRALinear


class _StateCarrier(torch.optim.Optimizer):
    """Holds the EMAs as optimizer state so that every resize re-indexes them like Adam's moments.

    ``layer.remove_slots`` / ``add_slots`` / ``optim_state.reindex_parameter`` rebind every
    optimizer they are given and slice every state tensor shaped like the parameter with the
    same index: passing this carrier along keeps the scores of kept ranks and gives new ranks
    zero scores, with no index bookkeeping of our own. It never steps.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {})

    def step(self, closure=None):  # pragma: no cover - never called
        raise RuntimeError("the importance store is not an optimizer; it never steps.")


class ImportanceEMA:
    """Sensitivity and uncertainty moving averages of every element of the tracked parameters.

    The EMAs of all parameters live in two flat buffers, and each parameter's state (in ``carrier``)
    is a view into them: a step is a handful of operations over every element at once (the weights and
    gradients are flattened by one C++ call, ``_flatten_dense_tensors``, not one operation per parameter). A resize
    re-indexes a parameter's state into a tensor of its own (``invalidate``); the next update packs
    the buffers again.

    Args:
        params: parameters to score (A, B and E of every adapted module).
        beta1: EMA factor of the sensitivity (0.85 in AdaLoRA and ElaLoRA).
        beta2: EMA factor of the uncertainty (0.85).
    """

    def __init__(self, params: Iterable[nn.Parameter], beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.carrier = _StateCarrier(list(params))
        self._packed: tuple[list[nn.Parameter], torch.Tensor, torch.Tensor] | None = None

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for group in self.carrier.param_groups for p in group["params"]]

    def track(self, params: list[nn.Parameter]) -> None:
        """Score exactly ``params`` from now on: EMAs of parameters no longer listed are dropped
        (a parameter replaced outside a resize, e.g. by a checkpoint restore, starts afresh)."""
        current = self.params
        if len(current) == len(params) and all(a is b for a, b in zip(current, params)):
            return
        keep = {id(p) for p in params}
        for p in current:
            if id(p) not in keep:
                self.carrier.state.pop(p, None)
        self.carrier.param_groups[0]["params"] = list(params)
        del self.carrier.param_groups[1:]
        self.invalidate()

    def invalidate(self) -> None:
        """The states were re-indexed or replaced one by one: pack them again at the next update."""
        self._packed = None

    def _pack(self, params: list[nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat (sensitivity, uncertainty) buffers over ``params``, each parameter's state a view into them."""
        if self._packed is not None and len(self._packed[0]) == len(params):
            if all(a is b for a, b in zip(self._packed[0], params)):
                return self._packed[1], self._packed[2]
        buffers, views = [], []
        for key in ("sensitivity", "uncertainty"):
            parts = [self.carrier.state[p].get(key) for p in params]
            parts = [t if t is not None else torch.zeros_like(p) for t, p in zip(parts, params)]
            buffers.append(_flatten_dense_tensors(parts))
            views.append(_unflatten_dense_tensors(buffers[-1], parts))
        for p, ibar, ubar in zip(params, *views):
            self.carrier.state[p] = {"sensitivity": ibar, "uncertainty": ubar}
        self._packed = (list(params), buffers[0], buffers[1])
        return buffers[0], buffers[1]

    @torch.no_grad()
    def update(self) -> list[nn.Parameter]:
        """One EMA step from the current weights and gradients; returns the parameters skipped
        (no gradient, or a non-finite one). One wait for the device, to learn whether every gradient
        is finite; the per-parameter path runs only when one is not, or one has no gradient."""
        params = [p for p in self.params if p.numel()]
        if not params:
            return []
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            return self._update_each(params)
        grads = _flatten_dense_tensors(grads)  # one concatenation, no per-parameter operation
        if not bool(grads.isfinite().all()):
            return self._update_each(params)
        ibar, ubar = self._pack(params)
        sensitivity = (_flatten_dense_tensors(params) * grads).abs_()  # I = |w * g|
        ibar.mul_(self.beta1).add_(sensitivity, alpha=1.0 - self.beta1)  # Ibar = b1 Ibar + (1 - b1) I
        spread = (sensitivity - ibar).abs_()  # |I - Ibar|, with the new Ibar
        ubar.mul_(self.beta2).add_(spread, alpha=1.0 - self.beta2)  # Ubar = b2 Ubar + (1 - b2) |I - Ibar|
        return []

    def _update_each(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """The same update parameter by parameter, skipping those without a finite gradient."""
        skipped = []
        for p in params:
            if p.grad is None or not torch.isfinite(p.grad).all():
                skipped.append(p)
                continue
            sensitivity = (p.detach() * p.grad).abs()
            state = self.carrier.state[p]
            if not state:
                state["sensitivity"] = torch.zeros_like(p)
                state["uncertainty"] = torch.zeros_like(p)
            ibar, ubar = state["sensitivity"], state["uncertainty"]
            ibar.mul_(self.beta1).add_(sensitivity, alpha=1.0 - self.beta1)
            ubar.mul_(self.beta2).add_((sensitivity - ibar).abs(), alpha=1.0 - self.beta2)
        return skipped

    def score(self, p: nn.Parameter) -> torch.Tensor:
        """s = Ibar * Ubar, shaped like ``p`` (zeros before the first update)."""
        state = self.carrier.state.get(p)
        if not state:
            return torch.zeros_like(p, dtype=torch.float32).detach()
        return (state["sensitivity"] * state["uncertainty"]).float()

    def scores(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """``score(p)`` of every parameter of ``params``: one product over the packed EMAs when every parameter has
        them (views of one flat vector), else parameter by parameter."""
        state = self.carrier.state
        if params and all(p.numel() and state.get(p) for p in params):
            ibar, ubar = self._pack(params)
            return list(_unflatten_dense_tensors((ibar * ubar).float(), params))
        return [self.score(p) for p in params]

    def set_state(self, p: nn.Parameter, sensitivity: torch.Tensor, uncertainty: torch.Tensor) -> None:
        """Overwrite the EMAs of ``p`` (tests and checkpoint restores)."""
        self.invalidate()
        self.carrier.state[p] = {
            "sensitivity": sensitivity.detach().to(p).clone(),
            "uncertainty": uncertainty.detach().to(p).clone(),
        }

    def clear(self) -> None:
        """Drop every EMA (frees their memory once ranks are final)."""
        self.carrier.state.clear()
        self.invalidate()


def triplet_scores(
    layer: ElasticLoRALinear, shared: torch.Tensor, group: torch.Tensor, values: torch.Tensor
) -> list[torch.Tensor]:
    """Score of every rank of every group, ``S_gj = s(E)[c] + mean s(shared)[slot] + mean s(group)[:, c]``.

    Args:
        layer: the adapted module (gives the slot layout).
        shared: element scores of ``layer.shared_weight``, (S, d_other).
        group: element scores of ``layer.group_weight``, (d_g, T).
        values: element scores of the module's E, (T,) aligned with the packed columns.

    Returns:
        One (r_g,) tensor per group, in rank-position order.
    """
    row_mean = shared.mean(dim=1) if shared.shape[1] else shared.new_zeros(shared.shape[0])  # (S,)
    column = values + group.mean(dim=0)  # (T,)
    out, offset = [], 0
    for slots in layer.slots:
        r = len(slots)
        index = torch.tensor(slots, dtype=torch.long, device=row_mean.device)
        out.append(column[offset : offset + r] + row_mean[index])
        offset += r
    return out


class TripletPlan:
    """:func:`triplet_scores` of every module at once, its indices built once per layout.

    The row means of the shared sides are taken over one concatenation per width, the column means of the group
    sides over one stack per shape (d_g, T): a reduction over the rows of a stack sums each element in the same
    order as over each tensor alone, so every score is bitwise the one module-by-module code gives.
    """

    def __init__(self) -> None:
        self._key: list | None = None

    def _build(self, layers: list[ElasticLoRALinear], shared: list[torch.Tensor], group: list[torch.Tensor]) -> None:
        device = shared[0].device if shared else None
        self.row_batches: dict[int, list[int]] = {}  # width -> modules
        for i, t in enumerate(shared):
            self.row_batches.setdefault(t.shape[1], []).append(i)
        row_offset, offset = [0] * len(layers), 0
        for members in self.row_batches.values():
            for i in members:
                row_offset[i] = offset
                offset += shared[i].shape[0]
        self.col_batches: dict[tuple, list[int]] = {}  # (d_g, T) -> modules
        for i, t in enumerate(group):
            if t.shape[1]:
                self.col_batches.setdefault(tuple(t.shape), []).append(i)
        piece_start, offset = [0] * len(layers), 0
        for members in self.col_batches.values():
            for i in members:
                piece_start[i] = offset
                offset += group[i].shape[1]
        column_order, row_of_column, self.ranks, self.n_groups = [], [], [], []
        for i, layer in enumerate(layers):
            slots = layer.slots
            column_order.extend(range(piece_start[i], piece_start[i] + group[i].shape[1]))
            row_of_column.extend(row_offset[i] + s for g in slots for s in g)
            self.ranks.extend(len(g) for g in slots)
            self.n_groups.append(len(slots))
        self.column_order = torch.tensor(column_order, dtype=torch.long, device=device)
        self.row_of_column = torch.tensor(row_of_column, dtype=torch.long, device=device)

    def scores(
        self, layers: dict[str, ElasticLoRALinear], shared: list[torch.Tensor], group: list[torch.Tensor], values
    ) -> dict[str, list[torch.Tensor]]:
        """{module: [S_g (r_g,) per group]} from the element scores of every module's shared and group sides (in
        ``layers``' order) and of E (one vector over every module)."""
        modules = list(layers.values())
        key = [(layer, layer.layout_version) for layer in modules] + [(t.shape, t.device) for t in shared + group]
        if (
            self._key is None
            or len(key) != len(self._key)
            or any(a[0] is not b[0] or a[1] != b[1] for a, b in zip(key, self._key))
        ):
            self._build(modules, shared, group)
            self._key = key
        row_means = [
            torch.cat([shared[i] for i in members]).mean(dim=1)
            if width
            else values.new_zeros(sum(shared[i].shape[0] for i in members))
            for width, members in self.row_batches.items()
        ]
        col_means = [
            torch.stack([group[i] for i in members]).mean(dim=1).flatten() for members in self.col_batches.values()
        ]
        column = values + (torch.cat(col_means)[self.column_order] if col_means else values.new_zeros(0))
        scores = (column + torch.cat(row_means)[self.row_of_column]).split(self.ranks)
        out, k = {}, 0
        for name, n in zip(layers, self.n_groups):
            out[name] = list(scores[k : k + n])
            k += n
        return out
