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

import itertools
import operator
import weakref
from collections.abc import Iterable

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..layer import ElasticLoRALinear


class _StateCarrier(torch.optim.Optimizer):
    """Holds EMAs as optimizer state so that a resize re-indexes them like Adam's moments.

    It holds the states handed over before a resize (``ImportanceEMA.hand_over``), and those a resize or a
    restore made, until the next update packs them into the flat buffers. ``layer.remove_slots`` / ``add_slots`` /
    ``optim_state.reindex_parameter`` rebind every optimizer they are given and slice every state tensor shaped like
    the parameter with the same index: passing this carrier along keeps the scores of kept ranks and gives new ranks
    zero scores, with no index bookkeeping of our own. It never steps.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {})

    def step(self, closure=None):  # pragma: no cover - never called
        raise RuntimeError("the importance store is not an optimizer; it never steps.")


class ImportanceEMA:
    """Sensitivity and uncertainty moving averages of every element of the tracked parameters.

    The EMAs of all parameters live in two flat buffers: a step is a handful of operations over every element at once
    (the weights and gradients are flattened by one C++ call, ``_flatten_dense_tensors``, not one operation per
    parameter). A parameter's state is read as views of the buffers (:meth:`state_of`); the carrier holds states of
    its own only where the buffers do not: those a resize re-indexed (:meth:`hand_over` first gives the carrier the
    states of the parameters a resize will touch, as views), or :meth:`set_state` gave. The next update packs the
    buffers again: the states still in the old buffers are copied from them in runs (one slice per run of such
    parameters), the carrier's one by one, which then leave it.

    Args:
        params: parameters to score (A, B and E of every adapted module).
        beta1: EMA factor of the sensitivity (0.85 in AdaLoRA and ElaLoRA).
        beta2: EMA factor of the uncertainty (0.85).
    """

    def __init__(self, params: Iterable[nn.Parameter], beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.carrier = _StateCarrier(list(params))
        self._packed: _Packing | None = None  # the buffers, and where each parameter's EMAs are in them

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

    # ------------------------------------------------------------------ each parameter's state
    def has_state(self, p: nn.Parameter) -> bool:
        """Whether ``p`` has EMAs (it had an update, or was given them)."""
        return bool(self.carrier.state.get(p)) or (self._packed is not None and self._packed.start_of(p) is not None)

    def state_of(self, p: nn.Parameter) -> dict[str, torch.Tensor] | None:
        """{'sensitivity': Ibar, 'uncertainty': Ubar} of ``p``, shaped like it (views of the buffers, or the carrier's
        own tensors); None before its first update."""
        own = self.carrier.state.get(p)
        if own:
            return own
        return self._packed.views_of(p) if self._packed is not None else None

    def held(self) -> list[nn.Parameter]:
        """The tracked parameters that have EMAs."""
        return [p for p in self.params if self.has_state(p)]

    def hand_over(self, params: Iterable[nn.Parameter]) -> None:
        """Give the carrier the states of ``params`` (views of the buffers), so that a resize passing the carrier
        (``remove_slots``, ``add_slots``, ``reindex_parameter``) re-indexes them as it does the optimizer's
        moments."""
        for p in params:
            if not self.carrier.state.get(p):
                views = self._packed.views_of(p) if self._packed is not None else None
                if views is not None:
                    self.carrier.state[p] = views

    def _pack(self, params: list[nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat (sensitivity, uncertainty) buffers over ``params``: the current ones while they hold exactly
        ``params`` and the carrier holds no state of its own; else packed again from the old buffers (runs of the
        states still there) and the carrier's states (copied one by one; zeros for a parameter without any)."""
        packed, state = self._packed, self.carrier.state
        own = {id(p) for p in params if state.get(p)} if state else set()  # states the carrier holds
        if packed is not None and not own and packed.holds(params):
            return packed.buffers
        starts = [None if id(p) in own or packed is None else packed.start_of(p) for p in params]
        # What the new buffers are made of, in order: (start, stop) runs of states still in the old buffers, or a
        # parameter whose state the carrier holds (or that has none: zeros). Worked out once for both buffers.
        parts: list = []
        for p, start in zip(params, starts):
            if start is None:
                parts.append(p)
            elif parts and isinstance(parts[-1], list) and parts[-1][1] == start:
                parts[-1][1] += p.numel()
            else:
                parts.append([start, start + p.numel()])
        buffers = []
        for k, key in enumerate(("sensitivity", "uncertainty")):
            pieces: list[torch.Tensor] = []
            for part in parts:
                if isinstance(part, list):
                    pieces.append(packed.buffers[k][part[0] : part[1]])
                    continue
                t = state[part].get(key) if id(part) in own else None
                pieces.append((t if t is not None else torch.zeros_like(part)).reshape(-1))
            buffers.append(torch.cat(pieces) if len(pieces) != 1 else pieces[0].clone())
        state.clear()  # every state is in the buffers now
        self._packed = _Packing(params, (buffers[0], buffers[1]))
        return buffers[0], buffers[1]

    # ------------------------------------------------------------------ the EMA step
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
            state = self.state_of(p)  # views of the buffers are updated in place
            if state is None:
                state = self.carrier.state[p] = {"sensitivity": torch.zeros_like(p), "uncertainty": torch.zeros_like(p)}
            ibar, ubar = state["sensitivity"], state["uncertainty"]
            ibar.mul_(self.beta1).add_(sensitivity, alpha=1.0 - self.beta1)
            ubar.mul_(self.beta2).add_((sensitivity - ibar).abs(), alpha=1.0 - self.beta2)
        return skipped

    # ------------------------------------------------------------------ scores
    def score(self, p: nn.Parameter) -> torch.Tensor:
        """s = Ibar * Ubar, shaped like ``p`` (zeros before the first update)."""
        state = self.state_of(p)
        if not state:
            return torch.zeros_like(p, dtype=torch.float32).detach()
        return (state["sensitivity"] * state["uncertainty"]).float()

    def scores(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """``score(p)`` of every parameter of ``params``."""
        return list(_unflatten_dense_tensors(self.flat_scores(params), params))

    def flat_scores(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The scores of ``params`` laid end to end (float32): one product over the packed EMAs when every parameter
        has them (empty ones aside), else the parameters' scores concatenated."""
        held = [p for p in params if p.numel()]  # as update() packs them: an empty parameter adds nothing
        if held and all(self.has_state(p) for p in held):
            ibar, ubar = self._pack(held)
            return (ibar * ubar).float()
        return _flatten_dense_tensors([self.score(p) for p in params])

    def set_state(self, p: nn.Parameter, sensitivity: torch.Tensor, uncertainty: torch.Tensor) -> None:
        """Overwrite the EMAs of ``p`` (tests and checkpoint restores)."""
        self.carrier.state[p] = {
            "sensitivity": sensitivity.detach().to(p).clone(),
            "uncertainty": uncertainty.detach().to(p).clone(),
        }

    def clear(self) -> None:
        """Drop every EMA (frees their memory once ranks are final)."""
        self.carrier.state.clear()
        self._packed = None

    def held_bytes(self) -> int:
        """Bytes of the EMAs held for the tracked parameters (the carrier's own states, and the buffers' share)."""
        total, packed = 0, self._packed
        for p in self.params:
            own = self.carrier.state.get(p)
            if own:
                total += sum(t.numel() * t.element_size() for t in own.values() if torch.is_tensor(t))
            elif packed is not None and packed.start_of(p) is not None:
                total += p.numel() * sum(b.element_size() for b in packed.buffers)
        return total


class _Packing:
    """Where one packing put every parameter's EMAs: the two flat buffers, and each parameter's first element in them
    (a weak reference to the parameter kept beside it, so that an id reused by a new tensor is not taken for it, and
    a parameter a resize replaced, with its gradient, is not kept alive by the packing)."""

    def __init__(self, params: list[nn.Parameter], buffers: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.buffers = buffers
        self._refs = list(map(weakref.ref, params))
        starts = itertools.accumulate((p.numel() for p in params[:-1]), initial=0)
        self._where = {id(p): (ref, start) for p, ref, start in zip(params, self._refs, starts)}

    def holds(self, params: list[nn.Parameter]) -> bool:
        """Whether ``params`` are exactly the parameters packed, in order (compared in C, ``map``)."""
        return len(params) == len(self._refs) and all(map(operator.is_, map(weakref.ref.__call__, self._refs), params))

    def start_of(self, p: nn.Parameter) -> int | None:
        """``p``'s first element in the buffers (None: not packed)."""
        entry = self._where.get(id(p))
        return entry[1] if entry is not None and entry[0]() is p else None

    def views_of(self, p: nn.Parameter) -> dict[str, torch.Tensor] | None:
        """``p``'s EMAs as views of the buffers, shaped like it (None: not packed)."""
        start = self.start_of(p)
        if start is None:
            return None
        stop = start + p.numel()
        return {
            "sensitivity": self.buffers[0][start:stop].view(p.shape),
            "uncertainty": self.buffers[1][start:stop].view(p.shape),
        }


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
    """:func:`triplet_scores` of every module at once, from the element scores of every A, B and E laid end to end
    (``ImportanceEMA.flat_scores``), its gathers built once per layout.

    The row means of the shared sides are taken width by width, the column means of the group sides shape (d_g, T)
    by shape, each over a piece of one gather (one for the shared sides, one for the group sides, the modules
    ordered by width or shape): a piece lays the modules' scores out as a concatenation (or a stack) of them would,
    and a reduction over the rows of that sums each element in the same order as over each tensor alone, so every
    score is bitwise the one module-by-module code gives.
    """

    def __init__(self) -> None:
        # What the gathers were built for (see :meth:`scores`); the parameters as weak references, so that a plan
        # never keeps a tensor a resize replaced (nor its gradient) alive.
        self._key: tuple | None = None
        self.row_gather: torch.Tensor | None = None
        self.col_gather: torch.Tensor | None = None
        self.column_order: torch.Tensor | None = None
        self.row_of_column: torch.Tensor | None = None

    def held_bytes(self) -> int:
        """Bytes of the gathers the plan holds: an index entry per scored element of A and B (int32 while the
        positions fit), two int64 entries per rank."""
        tensors = (self.row_gather, self.col_gather, self.column_order, self.row_of_column)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _build(self, layers: list[ElasticLoRALinear], params: list[torch.Tensor], device) -> None:
        sizes = [p.numel() for p in params]
        starts = list(itertools.accumulate(sizes[:-1], initial=0))  # each parameter's first element in the vector
        shared, group = params[0:-1:2], params[1:-1:2]  # in the flat vector: A / B of module i at 2i / 2i + 1
        rows: dict[int, list[int]] = {}  # width -> modules
        for i, t in enumerate(shared):
            rows.setdefault(t.shape[1], []).append(i)
        row_offset, offset = [0] * len(layers), 0
        self.row_batches = []  # (width, number of rows): consecutive pieces of the row gather, width by width
        by_width = []
        for width, members in rows.items():
            start = offset
            for i in members:
                row_offset[i] = offset
                offset += shared[i].shape[0]
            self.row_batches.append((width, offset - start))
            by_width.extend(members)
        self.row_split = [width * n for width, n in self.row_batches]
        # every shared side's scores, the modules ordered by width: one index for all widths
        # int32 where every position fits (index_select reads it as it is; advanced indexing would widen it to int64
        # at every step): half the bytes of the two gathers, which have an entry per scored element of A and B
        dtype = torch.int32 if sum(sizes) <= torch.iinfo(torch.int32).max else torch.long
        self.row_gather = _segments([starts[2 * i] for i in by_width], [sizes[2 * i] for i in by_width], device, dtype)
        cols: dict[tuple, list[int]] = {}  # (d_g, T) -> modules
        for i, t in enumerate(group):
            if t.shape[1]:
                cols.setdefault(tuple(t.shape), []).append(i)
        piece_start, offset = [0] * len(layers), 0
        self.col_batches = []  # (modules, d_g, T): consecutive pieces of the column gather, shape by shape
        by_shape = []
        for shape, members in cols.items():
            self.col_batches.append((len(members), *shape))
            by_shape.extend(members)
            for i in members:
                piece_start[i] = offset
                offset += group[i].shape[1]
        self.col_split = [n * d * t for n, d, t in self.col_batches]
        self.col_gather = _segments(
            [starts[2 * i + 1] for i in by_shape], [sizes[2 * i + 1] for i in by_shape], device, dtype
        )
        self.values_start = starts[-1]
        layouts = [layer.slot_tuple for layer in layers]
        column_order = [c for i, t in enumerate(group) for c in range(piece_start[i], piece_start[i] + t.shape[1])]
        row_of_column = [row_offset[i] + s for i, layout in enumerate(layouts) for g in layout for s in g]
        self.ranks = [len(g) for layout in layouts for g in layout]
        self.n_groups = [len(layout) for layout in layouts]
        self.column_order = torch.tensor(column_order, dtype=torch.long, device=device)
        self.row_of_column = torch.tensor(row_of_column, dtype=torch.long, device=device)

    def scores(
        self, layers: dict[str, ElasticLoRALinear], params: list[torch.Tensor], flat: torch.Tensor
    ) -> dict[str, list[torch.Tensor]]:
        """{module: [S_g (r_g,) per group]} from ``flat``, the element scores of ``params`` (every module's shared
        and group side in ``layers``' order, then E) laid end to end."""
        modules = list(layers.values())
        # What the gathers depend on: the layers (identity and layout version), the parameters (identity and
        # shape) and the device. Compared element by element in C (``map``): a step that changed nothing costs
        # no Python loop over the modules. The parameters are kept as weak references: a dead one reads None, never
        # the tensor that took its id.
        versions, shapes = [layer.layout_version for layer in modules], [p.shape for p in params]
        if self._key is None or not _same_key(self._key, modules, versions, params, shapes, flat.device):
            self._build(modules, params, flat.device)
            self._key = (modules, versions, list(map(weakref.ref, params)), shapes, flat.device)
        values = flat[self.values_start :]
        row_means = [
            piece.view(n_rows, width).mean(dim=1) if width else values.new_zeros(n_rows)
            for (width, n_rows), piece in zip(
                self.row_batches, flat.index_select(0, self.row_gather).split(self.row_split)
            )
        ]
        col_means = [
            piece.view(shape).mean(dim=1).flatten()
            for shape, piece in zip(self.col_batches, flat.index_select(0, self.col_gather).split(self.col_split))
        ]
        column = values + (torch.cat(col_means)[self.column_order] if col_means else values.new_zeros(0))
        scores = (column + torch.cat(row_means)[self.row_of_column]).split(self.ranks)
        out, k = {}, 0
        for name, n in zip(layers, self.n_groups):
            out[name] = list(scores[k : k + n])
            k += n
        return out


def _same_key(key: tuple, modules: list, versions: list[int], params: list, shapes: list, device) -> bool:
    """Whether :meth:`TripletPlan.scores`' ``key`` was made for these layers (the same objects, ``is``), layout
    versions, parameters (the weak references' referents, ``is``: a freed parameter's reference reads None),
    shapes and device."""
    layers, versions_then, refs, shapes_then, device_then = key
    return (
        len(layers) == len(modules)
        and len(refs) == len(params)
        and all(map(operator.is_, layers, modules))
        and all(map(operator.is_, map(weakref.ref.__call__, refs), params))
        and versions_then == versions
        and shapes_then == shapes
        and device_then == device
    )


def _segments(starts: list[int], lengths: list[int], device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """The positions of the segments [start, start + length) one after another, as one index of ``dtype`` (no loop
    per segment)."""
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    shift = torch.tensor(starts, dtype=torch.long) - (lengths_t.cumsum(0) - lengths_t)
    return (torch.arange(int(lengths_t.sum())) + shift.repeat_interleave(lengths_t)).to(device, dtype)
