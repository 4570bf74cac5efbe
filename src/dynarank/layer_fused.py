"""A layer's update as one autograd node: gathers, products, gate, scaling and the base's output, with a hand-written
backward.

With the gate folded in (m = gate, (G*R,)) and every group padded to R ranks (a dense layout: R = r, nothing padded,
every gather a view), the layer computes

    split="rows":  z = x A^T (N, S);  zp = z[:, slots];             out = base + scaling * [(zp m)_g B_g^T]_g
    split="cols":  zp_g = x_g A_g^T;  z = scatter_slots(zp m);       out = base + scaling * z B^T

(A / B^T the shared side (S, other), B / A^T the group side (d_g, T) read through ``columns``; the layer's
``slot_index`` / ``column_index``, where S and T read a zero). As plain autograd that is five to a dozen nodes per
module (pads, gathers, products, views, the gate's multiply, the scaling, the residual add); each node's backward costs
the autograd engine a few microseconds whatever the tensor size, which on a model of hundreds of adapted modules and a
small batch is a tenth of the step. Here the update is one node: the forward runs the same products, the backward the
closed-form gradients (the adjoint of a gather is an index_add, repeated slots summed in index order, as the autograd
path's index_select backward does), and only those the inputs need (``ctx.needs_input_grad``). The scaling rides on
the products (addmm's alpha) and the base's output is added by the last product, so neither costs a pass of its own.
It saves x, zp and zm (rows) / z (cols), no more than the autograd path keeps.

Measured (benchmarks/method_overhead.py, docs/benchmarks.md's step-time section, before -> with the node): ElaLoRA's
step over stock LoRA's 1.173 -> 1.051 at MiniLM 16 x 16 and 1.135 -> 1.092 on the 224-module decoder over 240 steps;
the engine at a fixed rank 1.004 -> 0.974 and 1.036 -> 0.987.

Not used (``fused_update_applies``; the autograd path of ``ElasticLoRALinear`` then runs): under autocast (the
products' dtypes are autocast's choice there), when the factors, the input and the gate differ in dtype, and for rank
buckets (layer_buckets.py). Double backward is not supported (``once_differentiable``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .layer_buckets import take_columns


def fused_update_applies(x: torch.Tensor, shared: torch.Tensor, group: torch.Tensor, gate: torch.Tensor | None) -> bool:
    """Whether the update may run as one node: one dtype everywhere and no autocast on x's device."""
    dtype = shared.dtype
    if x.dtype != dtype or group.dtype != dtype or (gate is not None and gate.dtype != dtype):
        return False
    return not torch.is_autocast_enabled(x.device.type)


_ZEROS: dict[tuple, torch.Tensor] = {}  # (dtype, device) -> a zero scalar: addmm's ignored input when beta=0


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float, add: torch.Tensor | None = None) -> torch.Tensor:
    """``add + scale * a @ b`` (add: None for zero) as one addmm: the scale costs no pass of its own."""
    if add is None:
        key = (a.dtype, a.device)
        add = _ZEROS.get(key)
        if add is None:
            add = _ZEROS[key] = torch.zeros((), dtype=a.dtype, device=a.device)
        return torch.addmm(add, a, b, beta=0, alpha=scale)
    return torch.addmm(add, a, b, alpha=scale)


def _grouped_in(x: torch.Tensor, w: torch.Tensor, groups: int, scale: float = 1.0) -> torch.Tensor:
    """(N, G*d_g) x (d_g, G*r) -> (N, G*r), times ``scale``: group g's inputs times its own r columns."""
    if groups == 1:
        return x @ w if scale == 1.0 else _scaled_mm(x, w, scale)
    n, (d_g, t) = x.shape[0], w.shape
    out = torch.einsum("ngd,dgr->ngr", x.reshape(n, groups, d_g), w.view(d_g, groups, t // groups)).reshape(n, t)
    return out if scale == 1.0 else out.mul_(scale)


def _grouped_out(z: torch.Tensor, w: torch.Tensor, groups: int, scale: float = 1.0, add=None) -> torch.Tensor:
    """``add + scale * out``, out = (N, G*r) x (d_g, G*r) -> (N, G*d_g): group g's r values times its own columns,
    as its block of features."""
    if groups == 1:
        return _scaled_mm(z, w.t(), scale, add)
    n, (d_g, t) = z.shape[0], w.shape
    out = torch.einsum("ngr,dgr->ngd", z.reshape(n, groups, t // groups), w.view(d_g, groups, t // groups))
    out = out.reshape(n, groups * d_g)
    if add is None:
        return out if scale == 1.0 else out.mul_(scale)
    return torch.add(add, out, alpha=scale)


def _grouped_outer(a: torch.Tensor, b: torch.Tensor, groups: int, scale: float = 1.0) -> torch.Tensor:
    """(N, G*d_g), (N, G*r) -> (d_g, G*r), times ``scale``: sum over n of group g's a^T b, packed as the group
    side."""
    if groups == 1:
        return _scaled_mm(a.t(), b, scale)
    n, t = b.shape
    d_g = a.shape[1] // groups
    out = torch.einsum("ngd,ngr->dgr", a.reshape(n, groups, d_g), b.reshape(n, groups, t // groups))
    out = out.reshape(d_g, t)
    return out if scale == 1.0 else out.mul_(scale)


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(rows, C) -> (rows, len(index)): the columns ``index`` of t, where index C reads a zero (the padding), as the
    autograd path gathers them."""
    return take_columns(F.pad(t, (0, 1)), index)


def _scatter(t: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """The adjoint of :func:`_gather`: (rows, len(index)) -> (rows, width), column k of t added into column
    ``index[k]`` (index_add: repeated indices summed in index order, the same on every run), the padding's dropped."""
    return t.new_zeros(t.shape[0], width + 1).index_add_(1, index, t)[:, :width]


class LowRankUpdate(torch.autograd.Function):
    """``base_out + scaling * update(x)`` (base_out None: zero): (..., d_in) -> (N, d_out). Arguments: x, shared
    (S, other), group (d_g, T), gate or None, scaling, split, groups, base_out (the base layer's output, x's
    leading shape), index: None for a dense layout, else (slots, columns), the layer's padded gather indices
    flattened (G*R,) each (``slot_index`` / ``column_index``: S and T read the zero padding), gate_index: None (the
    gate is (G, R), or its G*R values laid flat), else (G*R,) positions in the flat gate (its length reads a zero):
    a gate read from a controller's vector (layer.GateGather), its gather and the gather's adjoint done here."""

    @staticmethod
    def forward(ctx, x, shared, group, gate, scaling: float, split: str, groups: int, base_out, index, gate_index):  # noqa: D102
        ctx.x_shape = x.shape
        x = x.reshape(-1, x.shape[-1])  # (N, d_in)
        d_out = shared.shape[1] if split == "cols" else group.shape[0] * groups
        ctx.base_shape = None if base_out is None else base_out.shape
        if base_out is not None:
            base_out = base_out.reshape(-1, d_out)
        slots, columns = index if index is not None else (None, None)
        m = None  # (G*R,): the gate of every group's padded ranks
        if gate is not None:
            m = gate.reshape(-1) if gate_index is None else F.pad(gate, (0, 1))[gate_index]
        wp = group if index is None else _gather(group, columns)  # (d_g, G*R): every group padded to R
        if split == "rows":
            z = x @ shared.t()  # (N, S)
            zp = z if index is None else _gather(z, slots)  # (N, G*R)
            zm = zp * m if m is not None else zp
            out = _grouped_out(zm, wp, groups, scaling, base_out)
            kept = zm  # what the factors' gradients read
        else:
            zp = _grouped_in(x, wp, groups)  # (N, G*R)
            zm = zp * m if m is not None else zp
            z = zm if index is None else _scatter(zm, slots, shared.shape[0])  # (N, S)
            out = _scaled_mm(z, shared, scaling, base_out)
            kept = z
        # zp only for the gate's gradient; zm (rows) / z (cols) kept rather than made again in the backward pass
        ctx.save_for_backward(x, shared, wp, zp if m is not None else None, kept, m, slots, columns, gate_index)
        ctx.scaling, ctx.split, ctx.groups, ctx.widths = scaling, split, groups, (shared.shape[0], group.shape[1])
        ctx.gate_shape = None if gate is None else gate.shape
        # (N, d_out), not a view: a view made inside a Function cannot be modified in place by the caller
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        x, shared, wp, zp, kept, m, slots, columns, gate_index = ctx.saved_tensors
        scaling, groups, (n_slots, n_columns) = ctx.scaling, ctx.groups, ctx.widths
        need_x, need_shared, need_group, need_gate, *_, need_base, _, _ = ctx.needs_input_grad
        grad_out = grad_out.contiguous()  # (N, d_out)
        grad_base = grad_out.view(ctx.base_shape) if need_base else None
        grad_x = grad_shared = grad_group = grad_gate = grad_wp = None
        if ctx.split == "rows":
            grad_zm = _grouped_in(grad_out, wp, groups, scaling)  # (N, G*R), the scaling folded in
            if need_group:
                grad_wp = _grouped_outer(grad_out, kept, groups, scaling)  # (d_g, G*R)
        else:
            grad_z = _scaled_mm(grad_out, shared.t(), scaling)  # (N, S)
            if need_shared:
                grad_shared = _scaled_mm(kept.t(), grad_out, scaling)  # (S, d_out)
            grad_zm = grad_z if slots is None else _gather(grad_z, slots)  # (N, G*R)
        if need_gate:  # d/dm = sum_n d(zm) zp, then back to where m was read from
            grad_m = torch.linalg.vecdot(grad_zm, zp, dim=0)  # (G*R,)
            if gate_index is None:
                grad_gate = grad_m.reshape(ctx.gate_shape)
            else:  # the gather's adjoint; the padding's position dropped
                grad_gate = grad_m.new_zeros(ctx.gate_shape[0] + 1).index_add_(0, gate_index, grad_m)[:-1]
        grad_zp = grad_zm * m if m is not None else grad_zm
        if ctx.split == "rows":
            grad_z = grad_zp if slots is None else _scatter(grad_zp, slots, n_slots)  # (N, S)
            if need_shared:
                grad_shared = grad_z.t() @ x  # (S, d_in)
            if need_x:
                grad_x = (grad_z @ shared).view(ctx.x_shape)  # (..., d_in)
        else:
            if need_group:
                grad_wp = _grouped_outer(x, grad_zp, groups)  # (d_g, G*R)
            if need_x:
                grad_x = _grouped_out(grad_zp, wp, groups).view(ctx.x_shape)  # (..., d_in)
        if grad_wp is not None:
            grad_group = grad_wp if columns is None else _scatter(grad_wp, columns, n_columns)  # (d_g, T)
        return grad_x, grad_shared, grad_group, grad_gate, None, None, None, grad_base, None, None


def low_rank_update(
    x: torch.Tensor,
    shared: torch.Tensor,
    group: torch.Tensor,
    gate: torch.Tensor | None,
    scaling: float,
    split: str,
    groups: int,
    base_out: torch.Tensor | None = None,
    index: tuple[torch.Tensor, torch.Tensor] | None = None,
    gate_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base_out + scaling * update(x)`` as one autograd node, shaped (..., d_out) like x (base_out None: the update
    alone; index None: a dense layout, else the padded gather indices flattened; gate_index None: the gate is (G, R)
    or laid flat, else where each of its G*R values is read from the flat gate; see LowRankUpdate)."""
    out = LowRankUpdate.apply(x, shared, group, gate, scaling, split, groups, base_out, index, gate_index)
    return out.view(*x.shape[:-1], out.shape[-1])  # a view outside the Function: the caller may write to it
