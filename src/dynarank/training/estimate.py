"""How much memory an adapter will take, known before anything is allocated: a rank that cannot fit is refused in
one line instead of a process that tries to allocate tens of gigabytes."""

from __future__ import annotations

import os

from torch import nn

from ..attach import layer_plan, plan_costs, select_targets, target_geometries
from ..config import ConfigError, DynaRankConfig
from .methods import DYNARANK_METHODS, stock_adalora_schedule

BYTES_PER_TRAINED_VALUE = 16  # fp32 value, its gradient, and AdamW's two moments


class TooLargeError(ConfigError):
    """The adapter (with gradients and optimizer state) would not fit in this machine's memory (``fields``: the rank,
    or the method for full fine-tuning)."""


def memory_limit_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _targets(model: nn.Module, target_modules) -> dict[str, nn.Linear] | None:
    """The Linear modules the spec selects (dynarank's matching, which is PEFT's for Linear layers); None when it
    selects none (the method's own code then says so)."""
    try:
        names = select_targets(model, DynaRankConfig(target_modules=target_modules))
    except ValueError:
        return None
    return {name: model.get_submodule(name) for name in names}


def linear_targets(model: nn.Module, target_modules) -> dict[str, nn.Linear]:
    """The Linear modules ``target_modules`` selects in ``model`` (none: an empty dict)."""
    return _targets(model, target_modules) or {}


def lora_parameters(model: nn.Module, target_modules, r: int) -> int:
    """Adapter parameters of plain LoRA at rank ``r`` on the Linear modules ``target_modules`` selects: r (d_in +
    d_out) per matrix. The budget the demo and the benchmarks hold every method to."""
    targets = _targets(model, target_modules) or {}
    return sum(r * (m.in_features + m.out_features) for m in targets.values())


def adapter_parameter_estimate(model: nn.Module, spec) -> int | None:
    """Adapter parameters that ``spec`` (a ``TrainSpec``) would create on ``model``, from the targets' shapes alone.

    Stock LoRA: r (d_in + d_out) per matrix; DoRA adds d_out; stock AdaLoRA starts at its initial rank 1.5 r (and
    a singular value per rank). Dynarank methods: a per-head matrix in the own layout costs r (G d_in + d_out)
    (each of its G heads has its own A rows), any other r (d_in + d_out); ARD adds an alpha per group, ElaLoRA and
    AdaLoRA a singular value per rank. 'full': every parameter of the model.
    """
    if spec.method == "full":
        return sum(p.numel() for p in model.parameters())
    targets = _targets(model, spec.target_modules)
    if targets is None:
        return None
    if spec.method not in DYNARANK_METHODS:
        rank = stock_adalora_schedule(spec.r, 1)["init_r"] if spec.method == "adalora" else spec.r
        extra = {"dora": lambda m: m.out_features, "adalora": lambda m: rank}.get(spec.method, lambda m: 0)
        return sum(rank * (m.in_features + m.out_features) + extra(m) for m in targets.values())
    return _dynarank_estimate(model, spec, targets, spec.method)


def _dynarank_estimate(model: nn.Module, spec, targets: dict[str, nn.Linear], method: str) -> int | None:
    knobs = {k: v for k, v in spec.dynarank.items() if k in ("granularity", "head_layout", "r")}
    rank = knobs.pop("r", spec.r)
    try:
        config = DynaRankConfig(method=method, target_modules=spec.target_modules, **knobs)
        geometries = target_geometries(model, list(targets), config)
        total = 0
        for name, m in targets.items():
            plan = layer_plan(name, m, config, geometries[name])
            total += plan_costs(m, plan, config.head_layout).size_of_ranks([rank] * plan["n_groups"])
            total += {"ard": 1, "elalora": rank, "adalora-physical": rank}.get(method, 0) * plan["n_groups"]  # alpha, E
    except ValueError:
        return None  # the method's own validation says what is wrong
    return total


def check_adapter_fits(model: nn.Module, spec, limit: int | None = None) -> None:
    """Refuse (TooLargeError) an adapter whose values, gradients and optimizer state would exceed the machine's
    memory (``limit`` bytes; default :func:`memory_limit_bytes`)."""
    limit = memory_limit_bytes() if limit is None else limit
    params = adapter_parameter_estimate(model, spec)
    if limit is None or params is None:
        return
    needed = params * BYTES_PER_TRAINED_VALUE
    if needed <= limit:
        return
    cost = (
        f"needs about {_size(needed)} for the {'model' if spec.method == 'full' else 'adapter'} alone ({params:,} "
        f"parameters, with their gradients and optimizer state), more than this machine's {_size(limit)} of memory"
    )
    if spec.method == "full":
        raise TooLargeError("method", f"'full' fine-tuning {cost}: train an adapter instead.")
    raise TooLargeError("r", f"{spec.r} with method {spec.method!r} {cost}: lower it, or adapt fewer modules.")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:,.1f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:,.1f} MB"
