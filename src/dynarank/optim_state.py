"""Resize a parameter in place and carry its optimizer state along.

A resize is a *re-index*: the new tensor is ``cat([old, appended], dim)[source]`` along one
dimension. Kept entries keep their optimizer moments bit for bit, appended entries start
with zero momentum and (Adam) a second moment that makes their first update the learning rate
(zero early in a run), scalar state (Adam's ``step``) is left alone.

The resized tensor goes into a NEW Parameter, and every optimizer given is rebound to it
(its param group entry and its state). Swapping ``param.data`` to a new shape in place would
break the next backward whenever the previous autograd graph is still referenced (a
caller's ``loss`` variable keeps the old gradient accumulator, which remembers the old
shape). The learning-rate scheduler holds the optimizer, not the parameters, so it stays
valid.
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
) -> torch.nn.Parameter:
    """Return a new Parameter ``cat([param, appended], dim).index_select(dim, source)``.

    Args:
        param: the parameter to resize (left unchanged).
        dim: the dimension along which slots are kept, dropped, reordered or appended.
        source: 1-D long tensor; entry i names the old index (or ``len + k`` for the k-th
            appended slice) that becomes index i.
        appended: new slices (same shape as ``param`` except along ``dim``), or None.
        optimizer: optimizer(s) to rebind: the new parameter replaces ``param`` in its group,
            and every state tensor shaped like ``param`` follows the same re-index.
    """
    n_appended = 0 if appended is None else appended.shape[dim]
    new_param = torch.nn.Parameter(
        _reindex(param.detach(), dim, source, n_appended, fill=appended), requires_grad=param.requires_grad
    )
    for opt in _as_optimizers(optimizer):
        replace_in_optimizer(opt, param, new_param, dim, source, n_appended)
    return new_param


def _position(opt: torch.optim.Optimizer, param: torch.nn.Parameter) -> tuple[int, int] | None:
    """(group, index) of ``param`` in ``opt``, from a table kept on the optimizer and rebuilt when stale: a resize
    replaces hundreds of parameters, and scanning every group for each would cost the square of their number."""
    table = getattr(opt, "_dynarank_positions", None)
    found = table.get(id(param)) if table is not None else None
    groups = opt.param_groups
    if found is not None and found[0] < len(groups) and found[1] < len(groups[found[0]]["params"]):
        if groups[found[0]]["params"][found[1]] is param:
            return found
    table = {id(p): (g, i) for g, group in enumerate(groups) for i, p in enumerate(group["params"])}
    opt._dynarank_positions = table
    found = table.get(id(param))
    return found if found is not None and groups[found[0]]["params"][found[1]] is param else None


def replace_in_optimizer(
    opt: torch.optim.Optimizer,
    old: torch.nn.Parameter,
    new: torch.nn.Parameter,
    dim: int,
    source: torch.Tensor,
    n_appended: int,
) -> None:
    """Put ``new`` in ``old``'s place in ``opt`` with its state re-indexed (see :func:`reindex_parameter`).

    Raises ValueError, naming the optimizer and the state, before anything changes, when a state tensor of ``old``
    is not element-wise state this can re-index (see :func:`_reindexable`)."""
    state = opt.state.get(old) or {}
    where = _position(opt, old)
    group = opt.param_groups[where[0]] if where is not None else {}
    resized = {}
    for key, value in state.items():
        if not _reindexable(opt, old, key, value):
            continue
        fill = None
        if n_appended and "sq" in str(key):  # Adam's exp_avg_sq / max_exp_avg_sq
            fill = _fresh_second_moment(value, state.get("step"), group.get("betas"), dim, n_appended)
        try:
            resized[key] = _reindex(value, dim, source, n_appended, fill=fill)
        except (RuntimeError, NotImplementedError, TypeError) as exc:  # a tensor subclass of quantized state
            raise _cannot_follow(opt, old, key, value, f"could not be re-indexed ({exc})") from exc
    if where is not None:
        _put_in_place(opt, where, new)
    if state:
        state.update(resized)  # the same dict, now the new parameter's
        opt.state[new] = opt.state.pop(old)


def swap_parameter(opt: torch.optim.Optimizer, old: torch.nn.Parameter, new: torch.nn.Parameter) -> bool:
    """Put ``new`` in ``old``'s place in ``opt``'s groups (a load replaced ``old`` with a tensor of another shape),
    dropping ``old``'s state, which cannot fit ``new``. Returns whether there was state to drop; nothing happens when
    ``opt`` does not hold ``old``."""
    where = _position(opt, old)
    if where is None:
        return False
    _put_in_place(opt, where, new)
    return bool(opt.state.pop(old, None))


def drop_parameter(opt: torch.optim.Optimizer, param: torch.nn.Parameter) -> bool:
    """Take ``param`` out of ``opt``'s groups and state (a parameter the model no longer has: the SVD methods' E once
    folded). Its group stays, empty if ``param`` was all it held, so a scheduler's groups still match. Returns
    whether ``opt`` held it."""
    where = _position(opt, param)
    if where is None:
        return False
    del opt.param_groups[where[0]]["params"][where[1]]  # the position table is rebuilt when next read (stale)
    opt._dynarank_positions.pop(id(param), None)
    opt.state.pop(param, None)
    return True


def _put_in_place(opt: torch.optim.Optimizer, where: tuple[int, int], new: torch.nn.Parameter) -> None:
    """``new`` at (group, index) ``where`` of ``opt``'s groups, in the position table (:func:`_position`) in place of
    the parameter it replaces, so that the table keeps one entry per parameter the optimizer holds, however many
    resizes replace them."""
    g, i = where
    params, table = opt.param_groups[g]["params"], opt._dynarank_positions
    if table.get(id(params[i])) == where:
        del table[id(params[i])]
    params[i] = new
    table[id(new)] = where


def _reindexable(opt: torch.optim.Optimizer, param: torch.nn.Parameter, key, value) -> bool:
    """Whether the state ``value`` follows the parameter's re-index (True) or stays as it is (False: not a tensor, or
    a single number such as Adam's ``step``); ValueError for a tensor that should follow and cannot: one of another
    shape (Adafactor's factored moments, bitsandbytes' block scales) or quantized (8-bit states)."""
    if not torch.is_tensor(value):
        return False
    if value.shape == param.shape and value.dim() > 0:
        if value.is_floating_point() or value.is_complex():
            return True
        raise _cannot_follow(opt, param, key, value, f"quantized ({value.dtype})")
    if value.numel() <= 1:
        return False
    raise _cannot_follow(opt, param, key, value, f"of shape {tuple(value.shape)}, not the parameter's")


def _cannot_follow(opt: torch.optim.Optimizer, param: torch.nn.Parameter, key, value, what: str) -> ValueError:
    cls = type(opt)
    return ValueError(
        f"{cls.__module__}.{cls.__qualname__} keeps state that cannot follow a resize: its state {key!r} of a "
        f"parameter of shape {tuple(param.shape)} is {what}. dynarank re-indexes element-wise optimizer state (one "
        "entry per parameter entry, as AdamW, SGD, Adagrad, RMSprop, Lion and bitsandbytes' 32-bit optimizers keep)"
        "; train with one of those."
    )


def unresizable_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer``'s state could not follow a resize, known from its class before it holds any state (None: not
    a known case; :func:`replace_in_optimizer` still refuses, at the resize, state it cannot re-index). Recognised
    by name, without importing the packages: Adafactor (transformers', torch's), bitsandbytes' 8-bit optimizers and
    AdEMAMix, torchao's low-bit optimizers."""
    cls = type(optimizer)
    module, name = cls.__module__, cls.__name__
    if "adafactor" in name.lower():
        return "keeps a factored second moment (a row and a column vector per matrix)"
    if module.startswith("bitsandbytes"):
        if name.startswith(("AdEMAMix", "PagedAdEMAMix")):
            return "keeps its two first moments stacked in one tensor"
        if getattr(getattr(optimizer, "args", None), "optim_bits", 32) != 32 or "8bit" in name:
            return "keeps 8-bit state, quantized in blocks with a scale per block"
    if module.startswith("torchao") and any(tag in name for tag in ("4bit", "8bit", "Fp8")):
        return "keeps low-bit quantized state"
    return None


def _fresh_second_moment(
    second: torch.Tensor, step, betas: tuple[float, float] | None, dim: int, n_appended: int
) -> torch.Tensor | None:
    """The second moment appended entries start with, so that their first update is the learning rate, as a fresh
    Adam parameter's is, however long the run has been going (None: zeros).

    Appended entries share the tensor's step count t but start with zero moments. Their next update is then
    (1 - b1) g / bc1 over sqrt((b2 v0 + (1 - b2) g^2) / bc2) (bc_i = 1 - b_i^(t+1)): with v0 = 0 that is at most the
    learning rate while t < ~100 (for b2 = 0.999) and grows to 2.5x after 1,000 steps, 3.2x in the limit. v0 is set
    so that it is the rate, v0 = g^2 ((1 - b1)^2 bc2 / bc1^2 - (1 - b2)) / b2 (clamped at 0: early in a run zeros
    already give no more than the rate), g^2 estimated by the existing entries' mean bias-corrected second moment."""
    if betas is None or step is None or second.numel() == 0:
        return None
    t = float(step)
    b1, b2 = float(betas[0]), float(betas[1])
    if t < 1 or not (0 < b1 < 1 and 0 < b2 < 1):
        return None
    bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
    share = ((1 - b1) ** 2 * bc2 / bc1**2 - (1 - b2)) / b2
    if share <= 0:
        return None
    g2 = second.float().mean() / (1 - b2**t)  # the existing entries' mean bias-corrected second moment
    shape = list(second.shape)
    shape[dim] = n_appended
    return torch.full(shape, float(share * g2), dtype=second.dtype, device=second.device)


def state_bytes(optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter]) -> int:
    """Bytes held by ``optimizer`` state for ``params`` (tensors only)."""
    total = 0
    for p in params:
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total
