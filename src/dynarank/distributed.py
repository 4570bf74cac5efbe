"""torch.distributed helpers of the training loop and the Trainer callback (no-ops in a single process)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .controllers import RankController
from .fsdp import is_sharded


def world() -> tuple[int, int]:
    """(rank, world size) of this worker; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    """The GPU of this worker (LOCAL_RANK) if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def any_worker(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` holds on any worker (all workers must then take the same branch)."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def check_same_ranks(controller: RankController) -> None:
    """After a resize every worker must hold the same rank pattern; a difference is a bug worth stopping on."""
    gathered: list = [None] * world()[1]
    dist.all_gather_object(gathered, controller.ranks())
    if any(g != gathered[0] for g in gathered):
        raise RuntimeError(
            f"workers disagree on the ranks at step {controller.step}: the rank decision is not "
            "deterministic across processes."
        )


def wrap(model: nn.Module) -> nn.Module:
    """DDP around ``model`` in a distributed run (rebuilt after every resize: the parameters changed)."""
    if world()[1] == 1:
        return model
    # Gated slots and frozen alphas take no part in some steps: let DDP tolerate unused parameters.
    return DistributedDataParallel(model, find_unused_parameters=True)


SUPPORTED_SHARDING = (
    "shard only the frozen base with FSDP2: `dynarank train --fsdp` under torchrun, or dynarank.shard_base(model) "
    "before the Trainer is built (docs/distributed.md); or train with plain data parallelism (DDP)"
)


def _launch_setting(name: str) -> list[str]:
    """``["NAME=value"]`` if the launch variable ``name`` is set to a true value, else ``[]``."""
    value = os.environ.get(name, "")
    return [f"{name}={value}"] if value.lower() in ("1", "true", "yes") else []


def _fsdp_version(args, trainer) -> int:
    """The FSDP version a Trainer / accelerate launch asks for: the Trainer's plugin, ``args.fsdp_config`` (whose
    default is 2) or accelerate's FSDP_VERSION launch variable (whose default is 1)."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    if plugin is not None:
        return int(getattr(plugin, "fsdp_version", 1))
    if getattr(args, "fsdp", None):
        config = getattr(args, "fsdp_config", None) or {}
        return int(config.get("version", config.get("fsdp_version", 2)))
    return int(os.environ.get("FSDP_VERSION", "1"))


def refuse_sharding(args, trainer=None, model: nn.Module | None = None) -> None:
    """ValueError if the run shards the adapters (FSDP1, FSDP2 over the whole model, DeepSpeed ZeRO), by any of the
    ways it can be asked for. FSDP2 is accepted for a model whose frozen base :func:`dynarank.fsdp.shard_base`
    sharded: accelerate's FSDP2 preparation leaves a model that is already an FSDP module as it is."""
    base_only = model is not None and is_sharded(model)
    found = [f"args.{a}" for a in ("deepspeed", "deepspeed_plugin") if getattr(args, a, None)]
    found += _launch_setting("ACCELERATE_USE_DEEPSPEED")
    found += ["trainer.is_deepspeed_enabled"] * bool(getattr(trainer, "is_deepspeed_enabled", False))
    asked = ["args.fsdp"] * bool(getattr(args, "fsdp", None))
    asked += _launch_setting("ACCELERATE_USE_FSDP")
    asked += ["trainer.is_fsdp_enabled"] * bool(getattr(trainer, "is_fsdp_enabled", False))
    version = _fsdp_version(args, trainer)
    if asked and not (base_only and version == 2):
        found += [f"{a} (FSDP{version}{'' if base_only else ' of the whole model'})" for a in asked]
    if model is not None:
        from torch.distributed import fsdp

        if any(isinstance(m, fsdp.FullyShardedDataParallel) for m in model.modules()):
            found.append("the model is wrapped by FSDP1 (FullyShardedDataParallel)")
        elif not base_only and any(isinstance(m, fsdp.FSDPModule) for m in model.modules()):
            found.append("the model is sharded by FSDP2, adapters included")
    if found:
        raise ValueError(
            f"dynarank resizes adapter tensors while training; FSDP1, FSDP2 over the adapters and DeepSpeed ZeRO shard "
            f"them into buffers that a resize cannot edit ({', '.join(found)}). Instead, {SUPPORTED_SHARDING}."
        )


class ResizedGradientSync:
    """Average across workers the gradients of parameters a distributed wrapper does not know
    (those created by resizes after it was built).

    The wrapper's parameters are remembered by weak reference, never by ``id()`` alone: a tensor a
    resize creates may take the memory (and the id) of one the resize freed, and must still count as
    unknown. ``layout_version`` (called every step) returns a value that changes whenever parameters
    were replaced (a resize); the list of unknown parameters is rebuilt only then. Without it the
    model's parameters are walked at every call.

    ``known``: the parameters the wrapper reduces itself (default: every trainable parameter of the model now, which
    a DDP wrapper built now holds). Under :func:`dynarank.fsdp.shard_base` no wrapper reduces the replicated
    parameters: pass ``known=()`` and every trainable parameter's gradient is averaged here.
    """

    def __init__(
        self,
        model: nn.Module,
        layout_version: Callable[[], object] | None = None,
        known: Iterable[nn.Parameter] | None = None,
    ) -> None:
        self.model = model
        self.layout_version = layout_version
        known = [p for p in model.parameters() if p.requires_grad] if known is None else known
        self.known = {id(p): weakref.ref(p) for p in known}
        self._unknown: list[nn.Parameter] | None = None
        self._version: object = None

    def _is_known(self, p: nn.Parameter) -> bool:
        ref = self.known.get(id(p))
        return ref is not None and ref() is p

    def unknown(self) -> list[nn.Parameter]:
        """Trainable parameters the wrapper was not built with."""
        version = self.layout_version() if self.layout_version is not None else None
        if self._unknown is None or self.layout_version is None or version != self._version:
            self._unknown = [p for p in self.model.parameters() if p.requires_grad and not self._is_known(p)]
            self._version = version
        return self._unknown

    @torch.no_grad()
    def __call__(self) -> None:
        params = self.unknown()
        if not params:
            return
        device = params[0].device
        present = torch.tensor([float(p.grad is not None) for p in params], device=device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)  # a gradient on any worker: sync it everywhere
        synced = [p for p, flag in zip(params, present.tolist()) if flag]
        if not synced:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in synced])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for p in synced:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
