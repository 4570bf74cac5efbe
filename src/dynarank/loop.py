"""One training loop for every method: dynarank ARD / fixed-rank, and stock PEFT / full baselines.

Used by the CLI and the benchmarks, so every method gets the same data order, schedule and
evaluation. Dynarank methods are driven through the optimizer's step hooks (no per-method code
in the loop); stock PEFT AdaLoRA needs its documented ``update_and_allocate`` call, done here.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint
from .attach import adapter_parameter_count, attach, count_trainable
from .config import DynaRankConfig
from .controllers import RankController, build_controller
from .data import Examples

logger = logging.getLogger(__name__)

DYNARANK_METHODS = ("ard", "dynarank-lora")
PEFT_METHODS = ("lora", "dora", "adalora")
ALL_METHODS = DYNARANK_METHODS + PEFT_METHODS + ("full",)
# Every attention and MLP Linear of a BERT-style encoder (not the pooler, not the classifier).
BERT_ENCODER_LINEAR = r".*layer\.\d+\..*(query|key|value|dense)"


@dataclass
class TrainSpec:
    """What to train and how; the same fields for every method."""

    method: str = "ard"
    r: int = 8
    target_modules: list[str] | str = BERT_ENCODER_LINEAR
    lr: float = 1e-3
    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    dynarank: dict[str, Any] = field(default_factory=dict)  # extra DynaRankConfig fields

    def __post_init__(self) -> None:
        if self.method not in ALL_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(ALL_METHODS)}.")
        if self.batch_size < 1 or self.lr <= 0 or self.r < 1:
            raise ValueError("batch_size and r must be positive integers and lr a positive number.")

    def total_steps(self, n_examples: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * math.ceil(n_examples / self.batch_size)))


def prepare_model(model: nn.Module, spec: TrainSpec, total_steps: int) -> tuple[nn.Module, RankController | None]:
    """Adapt ``model`` for ``spec.method``; returns (model to train, dynarank controller or None)."""
    if spec.method in DYNARANK_METHODS:
        config = DynaRankConfig(
            method="ard" if spec.method == "ard" else "lora",
            r=spec.r,
            target_modules=spec.target_modules,
            seed=spec.seed,
            **spec.dynarank,
        )
        attach(model, config)
        return model, build_controller(model, total_steps)
    if spec.method == "full":
        return model, None
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    heads = [n for n in ("classifier", "score") if hasattr(model, n)]
    if spec.method == "adalora":
        # AdaLoRA's own schedule: prune from 1.5 r to r between 10% and 80% of the run.
        peft_config = AdaLoraConfig(
            init_r=max(spec.r + 1, round(1.5 * spec.r)),
            target_r=spec.r,
            lora_alpha=spec.r,
            target_modules=spec.target_modules,
            total_step=total_steps,
            tinit=max(1, total_steps // 10),
            tfinal=max(1, total_steps // 5),
            deltaT=max(1, total_steps // 40),
            modules_to_save=heads or None,
        )
    else:
        peft_config = LoraConfig(
            r=spec.r,
            lora_alpha=spec.r,
            target_modules=spec.target_modules,
            use_dora=spec.method == "dora",
            modules_to_save=heads or None,
        )
    return get_peft_model(model, peft_config), None


def _batches(enc: dict, order: list[int], batch_size: int, pad_id: int):
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [enc["input_ids"][i] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        yield ids, mask, idx


def evaluate_classifier(
    model: nn.Module, tokenizer, examples: Examples, max_length: int = 64, batch_size: int = 64
) -> dict[str, float]:
    """Accuracy and macro-F1."""
    enc = tokenizer(examples.texts, truncation=True, max_length=max_length)
    device = next(model.parameters()).device
    preds: list[int] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for ids, mask, _ in _batches(enc, list(range(len(examples.texts))), batch_size, tokenizer.pad_token_id or 0):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            preds.extend(logits.argmax(-1).tolist())
    model.train(was_training)
    return classification_metrics(preds, examples.labels, len(examples.label_names))


def classification_metrics(preds: list[int], labels: list[int], n_labels: int) -> dict[str, float]:
    correct = sum(p == y for p, y in zip(preds, labels))
    f1s = []
    for c in range(n_labels):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": correct / max(1, len(labels)), "macro_f1": sum(f1s) / n_labels}


class NonFiniteError(RuntimeError):
    """Training stopped on a NaN/inf loss or gradient (policy 'stop'); the last checkpoint is kept."""


def nonfinite_gradients(model: nn.Module) -> list[str]:
    """Names of the modules whose parameter gradients hold NaN or inf."""
    bad = []
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            bad.append(name.rsplit(".", 1)[0])
    return sorted(set(bad))


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


def _any_worker(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` holds on any worker (all workers must then take the same branch)."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _check_same_ranks(controller: RankController) -> None:
    """After a resize every worker must hold the same rank pattern; a difference is a bug worth stopping on."""
    gathered: list = [None] * world()[1]
    dist.all_gather_object(gathered, controller.ranks())
    if any(g != gathered[0] for g in gathered):
        raise RuntimeError(
            f"workers disagree on the ranks at step {controller.step}: the rank decision is not "
            "deterministic across processes."
        )


def _wrap(model: nn.Module) -> nn.Module:
    """DDP around ``model`` in a distributed run (rebuilt after every resize: the parameters changed)."""
    if world()[1] == 1:
        return model
    # Gated slots and frozen alphas take no part in some steps: let DDP tolerate unused parameters.
    return DistributedDataParallel(model, find_unused_parameters=True)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    # Each epoch's order follows from (seed, epoch) alone, so a resumed run finds its place by step.
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def _build_optimizer(model: nn.Module, controller: RankController | None, spec: TrainSpec):
    if controller is not None:
        optimizer = controller.build_optimizer(lr=spec.lr, weight_decay=spec.weight_decay)
    else:
        if spec.method == "full":
            for p in model.parameters():
                p.requires_grad_(True)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=spec.lr, weight_decay=spec.weight_decay
        )
    return optimizer


def _linear_schedule(optimizer, total: int, warmup_ratio: float):
    warm = max(1, round(warmup_ratio * total))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: min((t + 1) / warm, max(0.0, (total - t) / max(1, total - warm)))
    )


def train_classifier(
    model: nn.Module,
    tokenizer,
    train: Examples,
    spec: TrainSpec,
    eval_set: Examples | None = None,
    on_step: Callable[[dict], None] | None = None,
    run_dir: str | Path | None = None,
    save_every: int | None = None,
    resume: bool = False,
    on_nonfinite: str = "skip",
) -> dict:
    """Train ``model`` (a fresh sequence classifier) on ``train`` with ``spec``; returns a result record.

    With ``run_dir`` and ``save_every``, the whole training state is checkpointed every
    ``save_every`` optimizer steps; ``resume=True`` continues from the newest complete
    checkpoint and ends bitwise equal (CPU) to an uninterrupted run. ``on_nonfinite``: 'skip'
    drops a step whose loss or gradient is NaN/inf (naming the modules), 'stop' raises
    :class:`NonFiniteError` and leaves the last checkpoint in place.
    """
    if on_nonfinite not in ("skip", "stop"):
        raise ValueError(f"on_nonfinite must be 'skip' or 'stop', got {on_nonfinite!r}.")
    if (save_every or resume) and run_dir is None:
        raise ValueError("checkpointing needs a run directory.")
    torch.manual_seed(spec.seed)
    total = spec.total_steps(len(train.texts))
    rank, n_workers = world()
    model.to(default_device())
    model, controller = prepare_model(model, spec, total)
    state = tensors = None
    if resume:
        _, state, tensors = checkpoint.latest(run_dir)
        checkpoint.restore_model(model, state, tensors)
    model.train()
    device = next(model.parameters()).device
    optimizer = _build_optimizer(model, controller, spec)
    scheduler = _linear_schedule(optimizer, total, spec.warmup_ratio)
    step = 0
    if resume:
        checkpoint.restore_training(optimizer, scheduler, controller, state, tensors)
        step = state["step"]
    enc = tokenizer(train.texts, truncation=True, max_length=spec.max_length)
    labels = torch.tensor(train.labels)
    start_params = count_trainable(model) if not resume else state["extra"].get("start_params", 0)
    per_epoch = math.ceil(len(train.texts) / spec.batch_size)
    skipped, t0 = 0, time.perf_counter()
    train_model = _wrap(model)
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        order = _epoch_order(len(train.texts), spec.seed, epoch)[offset * spec.batch_size :]
        for ids, mask, idx in _batches(enc, order, spec.batch_size, tokenizer.pad_token_id or 0):
            # A distributed worker takes its shard of the global batch; DDP averages the gradients.
            share = len(idx[rank::n_workers]) * n_workers / len(idx)  # DDP's mean of shard means = batch mean
            ids, mask, idx = ids[rank::n_workers], mask[rank::n_workers], idx[rank::n_workers]
            out = train_model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels[idx].to(device))
            bad = ["loss"] if _any_worker(not torch.isfinite(out.loss), device) else []
            if not bad:
                (out.loss * share if n_workers > 1 else out.loss).backward()
                bad = nonfinite_gradients(model)
            if bad:
                message = f"non-finite values at step {step + 1} in: {', '.join(bad[:5])}"
                if on_nonfinite == "stop":
                    raise NonFiniteError(f"{message}; training stopped, the last checkpoint is kept.")
                logger.warning("dynarank: %s; step skipped", message)
                skipped += 1
            else:
                optimizer.step()
                scheduler.step()
                if n_workers > 1 and controller is not None and controller.records[-1].resized:
                    _check_same_ranks(controller)
                    train_model = _wrap(model)
                if spec.method == "adalora":
                    model.base_model.update_and_allocate(step)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if on_step is not None:
                on_step(
                    {
                        "step": step,
                        "loss": float(out.loss.detach()),
                        "lr": scheduler.get_last_lr()[0],
                        "trainable_parameters": count_trainable(model),
                        "total_rank": controller.total_rank() if controller is not None else None,
                    }
                )
            if save_every and step % save_every == 0 and rank == 0:
                checkpoint.save(
                    run_dir, model, optimizer, scheduler, controller, step, extra={"start_params": start_params}
                )
            if step >= total:
                break
    seconds = time.perf_counter() - t0
    result = {
        "method": spec.method,
        "r": spec.r,
        "seed": spec.seed,
        "steps": total,
        "skipped_steps": skipped,
        "seconds": seconds,
        "seconds_per_step": seconds / max(1, total - (state["step"] if resume else 0)),
        "trainable_parameters_start": start_params,
        "trainable_parameters": count_trainable(model),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if controller is not None:
        result["adapter_parameters"] = adapter_parameter_count(model)
        result["ranks"] = controller.ranks()
        result["warnings"] = [w for rec in controller.records for w in rec.warnings]
    result["model"], result["controller"] = model, controller
    if eval_set is not None:
        result["eval"] = evaluate_classifier(model, tokenizer, eval_set, spec.max_length)
    return result
