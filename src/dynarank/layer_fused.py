"""The update of a dense layer as one autograd node: products, gate and scaling, with a hand-written backward.

A dense layer (own layout, every group at the same rank r, slots in order; ``slot_layout.is_dense``) computes, with
S = T = G * r and the gate folded with the scaling into c = scaling * gate (S,):

    split="rows":  z = x A^T (N, S);              out[:, g] = (z c)[:, g] B_g^T      B packed as (d_g, T)
    split="cols":  z[:, g] = x[:, g] A_g^T (N, S); out = (z c) B                     B^T shared as (S, d_out)

As plain autograd this is five to eight nodes per module (products, views, the gate's multiply, the scaling); each
node's backward costs the autograd engine a few microseconds whatever the tensor size, which on a model of hundreds
of adapted modules and a small batch is a tenth of the step (the SVD methods' gate alone cost their forward and
backward 5-6 ms a step on the 224-module decoder of benchmarks/method_overhead.py). Here the whole update is one
node: the forward runs the same products, the backward the closed-form gradients

    d(zc) = dout B (rows) | dout B^T... per side,   dz = d(zc) c,   dc_gate = scaling * sum_n d(zc) z,

and only the gradients the inputs need (``ctx.needs_input_grad``). It saves x and z (N, S), less than the autograd
path keeps (which also holds z c).

Not used (``fused_update_applies``): under autocast (the products' dtypes are autocast's choice there), when the
factors, the input and the gate differ in dtype, and on non-dense layouts (gathers and rank buckets: the autograd
path of ``ElasticLoRALinear._low_rank_update``). Double backward is not supported (``once_differentiable``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def fused_update_applies(x: torch.Tensor, shared: torch.Tensor, group: torch.Tensor, gate: torch.Tensor | None) -> bool:
    """Whether the dense update may run as one node: one dtype everywhere and no autocast on x's device."""
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


class DenseLowRankUpdate(torch.autograd.Function):
    """``base_out + scaling * update(x)`` of a dense layer (base_out None: zero): (..., d_in) -> (..., d_out).
    Arguments: x, shared (S, other), group (d_g, T), gate (G, r) or None, scaling, split, groups, base_out (the
    base layer's output, x's leading shape)."""

    @staticmethod
    def forward(ctx, x, shared, group, gate, scaling: float, split: str, groups: int, base_out):  # noqa: D102
        ctx.x_shape = x.shape
        x = x.reshape(-1, x.shape[-1])  # (N, d_in)
        d_out = shared.shape[1] if split == "cols" else group.shape[0] * groups
        if base_out is not None:
            base_out = base_out.reshape(-1, d_out)
        m = gate.reshape(-1) if gate is not None else None  # (S,)
        z = x @ shared.t() if split == "rows" else _grouped_in(x, group, groups)  # (N, S)
        zm = z * m if m is not None else z
        if split == "rows":
            out = _grouped_out(zm, group, groups, scaling, base_out)
        else:
            out = _scaled_mm(zm, shared, scaling, base_out)
        # z only for the gate's gradient; zm (N, S) kept rather than made again in the backward pass
        ctx.save_for_backward(x, shared, group, z if m is not None else None, zm, m)
        ctx.scaling, ctx.split, ctx.groups = scaling, split, groups
        ctx.gate_shape = None if gate is None else gate.shape
        return out.view(*ctx.x_shape[:-1], d_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # noqa: D102
        x, shared, group, z, zm, m = ctx.saved_tensors
        scaling, groups = ctx.scaling, ctx.groups
        need_x, need_shared, need_group, need_gate, *_, need_base = ctx.needs_input_grad
        grad_base = grad_out if need_base else None
        grad_out = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()  # (N, d_out)
        grad_x = grad_shared = grad_group = grad_gate = None
        if ctx.split == "rows":
            grad_zm = _grouped_in(grad_out, group, groups, scaling)  # (N, S), the scaling folded in
            if need_group:
                grad_group = _grouped_outer(grad_out, zm, groups, scaling)  # (d_g, T)
        else:
            grad_zm = _scaled_mm(grad_out, shared.t(), scaling)  # (N, S)
            if need_shared:
                grad_shared = _scaled_mm(zm.t(), grad_out, scaling)  # (S, d_out)
        if need_gate:  # d/dgate = sum_n d(zm) z
            grad_gate = torch.linalg.vecdot(grad_zm, z, dim=0).reshape(ctx.gate_shape)
        grad_z = grad_zm * m if m is not None else grad_zm
        if ctx.split == "rows":
            if need_shared:
                grad_shared = grad_z.t() @ x  # (S, d_in)
            if need_x:
                grad_x = (grad_z @ shared).view(ctx.x_shape)  # (..., d_in)
        else:
            if need_group:
                grad_group = _grouped_outer(x, grad_z, groups)  # (d_g, T)
            if need_x:
                grad_x = _grouped_out(grad_z, group, groups).view(ctx.x_shape)  # (..., d_in)
        return grad_x, grad_shared, grad_group, grad_gate, None, None, None, grad_base


def dense_update(
    x: torch.Tensor,
    shared: torch.Tensor,
    group: torch.Tensor,
    gate: torch.Tensor | None,
    scaling: float,
    split: str,
    groups: int,
    base_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``base_out + scaling * update(x)`` of a dense layer as one autograd node (base_out None: the update alone;
    see the module's docstring)."""
    return DenseLowRankUpdate.apply(x, shared, group, gate, scaling, split, groups, base_out)
