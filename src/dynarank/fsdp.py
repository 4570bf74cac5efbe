"""FSDP2 over the frozen base while the elastic adapters stay replicated and resizable.

The frozen base is where the memory is; the adapters are small and change shape. :func:`shard_base` applies
torch's ``fully_shard`` to every transformer block and then to the root, with every parameter that trains in
``ignored_params``: the adapter layers' ``shared_weight`` / ``group_weight``, the task head (modules_to_save), ARD's
alphas (``model.dynarank_ard.alpha``) and the SVD methods' E (``model.dynarank_svd.values``). Each process then
holds 1/N of every frozen weight (a DTensor shard, all-gathered block by block for the forward and backward passes)
and a whole copy of everything that trains.

Why a resize needs nothing from FSDP: ``fully_shard`` reads ``ignored_params`` once, while it builds its parameter
groups (torch 2.13, ``_fsdp_init._get_managed_states``); afterwards FSDP touches only the parameters it manages,
by (module, name). A resize puts NEW Parameters into an adapter layer (``layer.py``); FSDP has never seen them, so
they are neither sharded nor reduced, exactly like the ones they replace. Nothing registered in FSDP has to be kept
current; what must be kept current is the list of replicated parameters whose gradients are averaged, and
:func:`replicated_parameters` reads it from the model (``ResizedGradientSync(known=())`` caches it per layout).

What FSDP does not do for the replicated parameters is reduce their gradients: the caller averages them once per
optimizer step, before anything reads them (the non-finite check, clipping, the controller's pre-step hook, AdamW).
The training loop does it with :class:`dynarank.distributed.ResizedGradientSync` (one flat all-reduce).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from .attach import elastic_layers
from .naming import ARD_ATTR, SVD_ATTR

logger = logging.getLogger(__name__)

SHARDED_ATTR = "dynarank_sharded"  # set on the model by shard_base: its ShardedBase record
CONTROLLER_MODULES = (ARD_ATTR, SVD_ATTR)  # ARD's alphas, the SVD methods' E: always replicated


@dataclass(frozen=True)
class ShardedBase:
    """What :func:`shard_base` did: the modules it sharded as their own FSDP units (the root is one more) and the
    number of processes the frozen base is spread over."""

    blocks: tuple[str, ...]
    world_size: int


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard_base` sharded ``model``'s frozen base."""
    return isinstance(getattr(model, SHARDED_ATTR, None), ShardedBase)


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters every process holds whole: everything that trains, and the controllers' own vectors (ARD's
    alphas, the SVD methods' E) whatever their ``requires_grad``. Read from the model: current after any resize."""
    found: dict[int, nn.Parameter] = {id(p): p for p in model.parameters() if p.requires_grad}
    for name in CONTROLLER_MODULES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            found.update({id(p): p for p in module.parameters()})
    return list(found.values())


def transformer_blocks(model: nn.Module) -> list[str]:
    """Names of the repeated blocks of ``model``: the entries of every ``nn.ModuleList`` of at least two modules of
    one class (a decoder's ``model.layers``, GPT-2's ``h``, BERT's ``encoder.layer``), outermost lists only.

    Found by structure rather than by ``_no_split_modules`` names, which also list modules that are not blocks
    (embeddings) and classes a checkpoint does not instantiate.
    """
    blocks: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(b + ".") for b in blocks):
            continue  # inside a block already chosen: FSDP units do not nest here
        if isinstance(module, nn.ModuleList) and len(module) >= 2 and len({type(m) for m in module}) == 1:
            blocks += [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return blocks


def _default_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device, (dist.get_world_size(),))


def _check_shardable(model: nn.Module, replicated: Iterable[nn.Parameter]) -> None:
    """ValueError naming what makes ``model`` unfit for :func:`shard_base` (already sharded, merged, no base)."""
    from torch.distributed.fsdp import FSDPModule

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shard_base() needs torch.distributed initialised (torchrun, or init_process_group).")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError("the model is already wrapped by FSDP: shard_base() shards an unwrapped model once.")
    if any(layer.merged for layer in elastic_layers(model).values()):
        raise ValueError("the adapters are merged into the base: unmerge() before sharding it.")
    kept = {id(p) for p in replicated}
    if not any(id(p) not in kept for p in model.parameters()):
        raise ValueError(
            "every parameter of the model trains, so there is no frozen base to shard (full fine-tuning): use plain "
            "data parallelism."
        )


def shard_base(model: nn.Module, mesh=None) -> nn.Module:
    """Shard ``model``'s frozen base over the processes with FSDP2; keep the adapters replicated (in place).

    ``fully_shard`` goes on every transformer block (:func:`transformer_blocks`), then on the root, with
    :func:`replicated_parameters` as ``ignored_params``. Call it after :func:`dynarank.attach` and after the
    controller's parameters exist (``build_controller`` or ``prepare_parameters``), before the training steps;
    the optimizer holds only replicated parameters, so it may be built before or after. ``mesh``: a 1-D
    ``DeviceMesh`` over the processes (default: all of them, on the CPU under gloo, on this process's GPU under
    NCCL; FSDP does not move ignored parameters, so put the model on its device first).

    Every process must then run the same forward passes (FSDP all-gathers each block's weights as it runs),
    and average the replicated parameters' gradients once per optimizer step
    (``ResizedGradientSync(model, known=())``). Returns ``model``, whose classes FSDP has subclassed.
    """
    from torch.distributed.fsdp import fully_shard

    replicated = replicated_parameters(model)
    _check_shardable(model, replicated)
    mesh = mesh if mesh is not None else _default_mesh()
    ignored = set(replicated)
    blocks = transformer_blocks(model)
    for name in blocks:  # bottom-up: each block is its own unit, gathered only while it runs
        fully_shard(model.get_submodule(name), mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)  # the rest (embeddings, final norm, heads' frozen parts)
    _ddp_ignores_sharded(model)
    setattr(model, SHARDED_ATTR, ShardedBase(tuple(blocks), mesh.size()))
    local, full = base_bytes(model)
    logger.info(
        "dynarank: frozen base sharded over %d processes (%d blocks + root): %.1f of %.1f MB held here",
        mesh.size(),
        len(blocks),
        local / 2**20,
        full / 2**20,
    )
    return model


def _ddp_ignores_sharded(model: nn.Module) -> None:
    """Tell a DistributedDataParallel wrapper built later (a transformers Trainer under torchrun wraps the model)
    to leave the sharded parameters alone: it then broadcasts and reduces only the replicated ones."""
    from torch.distributed.tensor import DTensor

    sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded)


def base_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes this process holds, bytes of the whole) of the frozen weights FSDP shards; (0, 0) if none are."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    for p in model.parameters():
        if isinstance(p, DTensor):
            local += p.to_local().numel() * p.element_size()
            full += p.numel() * p.element_size()
    return local, full


__all__ = [
    "ShardedBase",
    "base_bytes",
    "is_sharded",
    "replicated_parameters",
    "shard_base",
    "transformer_blocks",
]
