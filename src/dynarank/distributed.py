"""torch.distributed helpers of the training loop and the Trainer callback (no-ops in a single process)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .controllers import RankController

SHARDING_ENV = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")  # set by accelerate launch --use_fsdp / ...


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


def refuse_sharding(args, trainer=None, model: nn.Module | None = None) -> None:
    """ValueError if the run shards parameters (FSDP, DeepSpeed ZeRO), by any of the ways it can be asked for."""
    found = [f"args.{a}" for a in ("fsdp", "deepspeed", "deepspeed_plugin") if getattr(args, a, None)]
    found += [f"{v}={os.environ[v]}" for v in SHARDING_ENV if os.environ.get(v, "").lower() in ("1", "true", "yes")]
    found += [f"trainer.{a}" for a in ("is_fsdp_enabled", "is_deepspeed_enabled") if getattr(trainer, a, False)]
    if model is not None:
        from torch.distributed import fsdp

        sharded = tuple(getattr(fsdp, n) for n in ("FullyShardedDataParallel", "FSDPModule") if hasattr(fsdp, n))
        if any(isinstance(m, sharded) for m in model.modules()):
            found.append("the model is wrapped by FSDP")
    if found:
        raise ValueError(
            f"dynarank resizes adapter tensors while training; FSDP and DeepSpeed ZeRO shard them into flat buffers "
            f"that cannot be resized ({', '.join(found)}). Use plain data parallelism (DDP: torchrun, or accelerate "
            "launch without FSDP / DeepSpeed)."
        )


class ResizedGradientSync:
    """Average across workers the gradients of parameters a distributed wrapper does not know
    (those created by resizes after it was built).

    The wrapper's parameters are remembered by weak reference, never by ``id()`` alone: a tensor a
    resize creates may take the memory (and the id) of one the resize freed, and must still count as
    unknown. ``layout_version`` (called every step) returns a value that changes whenever parameters
    were replaced (a resize); the list of unknown parameters is rebuilt only then. Without it the
    model's parameters are walked at every call.
    """

    def __init__(self, model: nn.Module, layout_version: Callable[[], object] | None = None) -> None:
        self.model = model
        self.layout_version = layout_version
        self.known = {id(p): weakref.ref(p) for p in model.parameters() if p.requires_grad}
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
