"""torch.distributed helpers of the training loop (no-ops in a single process)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .controllers import RankController


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
