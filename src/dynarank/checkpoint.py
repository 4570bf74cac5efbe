"""Save and restore the whole training state: safetensors + JSON, atomic, checksummed, never pickled.

RUN_DIR/checkpoints/step-<N>/
  state.json          step, controller state, optimizer hyper-parameters and scalar state,
                      scheduler state, Python RNG, the adapter layout and output scales, sha256 of the tensors
                      and of this file's own content (so an edit to either is detected)
  tensors.safetensors trainable parameters (current shapes), optimizer state tensors, torch RNG

A checkpoint is written to a temporary sibling and renamed, so a crash during a save leaves
the previous checkpoints intact; the newest *complete* one (with a matching checksum) is the
one resumed. Temporary folders left by a killed save are removed by the next save that succeeds;
a checkpoint folder that a save killed between its two renames had moved aside is put back by the
next listing or read (io.write_atomically says what each kill leaves).

A transformers Trainer checkpoint keeps the Trainer's own files and gains

<checkpoint-N>/dynarank/
  state.json          step, total steps, the adapter layout and output scales, controller state, checksums
  tensors.safetensors the controller's tensor state (importance moving averages, generators)

(:func:`save_trainer_state`); the Trainer saves the weights and the optimizer itself.

Modules are named as in the model a ``torch.compile`` wrapper holds (``naming.uncompiled``), so a checkpoint written
from a compiled model resumes into an uncompiled one, and the other way round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load
from torch import nn

from .attach import elastic_layers
from .config import is_positive_number
from .naming import SVD_ATTR, uncompiled
from .storage import interrupted_replacements, restore_interrupted, write_atomically

STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")
TEMPORARY_DIR = re.compile(r"^\.step-\d+\.")  # io.write_atomically's temporary siblings of step-N
TRAINER_DIR = "dynarank"  # inside a transformers Trainer checkpoint
TRAINER_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR
TRAINER_KEYS = ("step", "total_steps", "method", "layout", "controller")  # what save_trainer_state writes
ALLOCATOR_EMAS = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # stock PEFT AdaLoRA's importance state, by parameter name

logger = logging.getLogger(__name__)


def _state_digest(state: dict) -> str:
    """sha256 of the state's content without its own digest (canonical JSON)."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not fit the model it is loaded into."""


def _json_safe(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    return None  # callables (lr lambdas) and other objects are rebuilt by the code, not stored


def capture(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, controller, step: int, extra: dict | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON state, tensors) of everything a resumed run needs."""
    model = uncompiled(model)
    tensors = {f"param.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
    groups, scalars, index = [], {}, 0
    for group in optimizer.param_groups:
        groups.append({k: _json_safe(v) for k, v in group.items() if k != "params"} | {"size": len(group["params"])})
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"optim.{index}.{key}"] = value.detach()
                else:
                    scalars[f"{index}.{key}"] = _json_safe(value)
            index += 1
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():  # dropout masks on a GPU come from its own generator
        tensors.update({f"rng.cuda.{i}": t for i, t in enumerate(torch.cuda.get_rng_state_all())})
    if controller is not None:
        tensors.update({f"controller.{k}": v.detach() for k, v in controller.state_tensors().items()})
    allocator = _peft_allocator(model)
    if allocator is not None:
        for kind in ALLOCATOR_EMAS:
            tensors.update({f"peft_adalora.{kind}.{n}": t for n, t in getattr(allocator, kind).items()})
    layout = {name: layer.slots for name, layer in elastic_layers(model).items()}
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "layout": layout,
        "output_scales": output_scales(model),
        "optimizer_groups": groups,
        "optimizer_scalars": scalars,
        "scheduler": _json_safe(scheduler.state_dict()) if scheduler is not None else None,
        "controller": controller.state_dict() if controller is not None else None,
        "rng_python": _json_safe(random.getstate()),
        "peft_adalora": {"rank_pattern": allocator.peft_config.rank_pattern} if allocator is not None else None,
        "extra": extra or {},
    }
    return state, {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}


def save(
    run_dir: str | Path, model, optimizer, scheduler, controller, step: int, keep: int = 3, extra: dict | None = None
) -> Path:
    """Write ``checkpoints/step-<step>`` atomically and keep the newest ``keep`` checkpoints."""
    state, tensors = capture(model, optimizer, scheduler, controller, step, extra)
    root = Path(run_dir) / "checkpoints"
    out = _write(root / f"step-{step}", state, tensors)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for orphan in root.iterdir():  # only worker 0 saves: any temporary folder left is from a killed save
        if orphan.is_dir() and TEMPORARY_DIR.match(orphan.name):
            shutil.rmtree(orphan, ignore_errors=True)
    return out


def _write(out: Path, state: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """``state.json`` + ``tensors.safetensors`` with both checksums, written atomically to ``out``."""
    from safetensors.torch import save

    blob = save(tensors)
    state["sha256"] = hashlib.sha256(blob).hexdigest()
    state["state_sha256"] = _state_digest(state)
    return write_atomically(out, {TENSORS_FILE: blob, STATE_FILE: json.dumps(state).encode()}, marker=STATE_FILE)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary, unfinished ones are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    for step_dir in interrupted_replacements(root):
        if STEP_DIR.match(step_dir.name):
            restore_interrupted(step_dir, STATE_FILE)  # a save killed between its renames: step-N comes back
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify one checkpoint; a damaged one raises CheckpointError naming the problem."""
    path = Path(path)
    restore_interrupted(path, STATE_FILE)
    state_file, tensors_file = path / STATE_FILE, path / TENSORS_FILE
    if not state_file.is_file() or not tensors_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (expected {STATE_FILE} and {TENSORS_FILE}).")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{state_file} is damaged ({exc}).") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file} is damaged (it holds JSON {type(state).__name__}, not an object).")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{state_file}: unsupported checkpoint format {state.get('format_version')!r}.")
    if state.get("state_sha256") != _state_digest(state):
        raise CheckpointError(f"{state_file} does not match its checksum: the file was modified.")
    blob = tensors_file.read_bytes()
    if hashlib.sha256(blob).hexdigest() != state.get("sha256"):
        raise CheckpointError(f"{tensors_file} does not match its checksum: the file is truncated or was modified.")
    try:
        tensors = load(blob)  # the bytes that were verified, not a second read of the file
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{tensors_file} is not readable ({exc}).") from None
    return state, tensors


def latest(run_dir: str | Path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """The newest checkpoint that reads and verifies; older ones are tried when the newest is damaged."""
    errors = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return (path, *read(path))
        except CheckpointError as exc:
            errors.append(str(exc))
            logger.warning("dynarank: skipping a damaged checkpoint: %s", exc)
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise CheckpointError(f"{run_dir} has no complete checkpoint to resume from{detail}.")


def check_layout(model: nn.Module, layout) -> None:
    """CheckpointError unless every elastic layer of ``model`` can take its slot lists from ``layout`` (same modules,
    same number of rank groups, non-negative integer slots, not merged). Changes nothing."""
    model = uncompiled(model)
    layers = elastic_layers(model)
    if not isinstance(layout, dict) or set(layout) != set(layers):
        differ = sorted(set(layout) ^ set(layers))[:3] if isinstance(layout, dict) else "not a mapping"
        raise CheckpointError(f"checkpoint does not fit this model: adapted modules differ ({differ}).")
    for name, layer in layers.items():
        slots = layout[name]
        if not isinstance(slots, list) or not all(
            isinstance(g, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in g)
            for g in slots
        ):
            raise CheckpointError(
                f"checkpoint does not fit this model: {name}: the checkpoint's slot lists are not lists of "
                "non-negative integers."
            )
        if len(slots) != layer.n_groups:
            raise CheckpointError(
                f"checkpoint does not fit this model: {name} has {len(slots)} rank groups in the checkpoint, "
                f"{layer.n_groups} in the model (another granularity, head layout or model)."
            )
        if layer.merged and layer.slots != slots:
            raise CheckpointError(f"{name} is merged into its base weight: unmerge() the model before restoring.")


def restore_layout(model: nn.Module, layout: dict[str, list[list[int]]]) -> None:
    """Give every elastic layer of ``model`` its saved slot lists (values uninitialised: a restore fills them).

    The whole layout is checked first (:func:`check_layout`): a layout that does not fit raises CheckpointError
    with every layer as it was.
    """
    model = uncompiled(model)
    check_layout(model, layout)
    layers = elastic_layers(model)
    for name, slots in layout.items():
        if layers[name].slots != slots:
            layers[name].set_slots(slots)
    values = getattr(model, SVD_ATTR, None)
    if values is not None:  # ElaLoRA / AdaLoRA singular values follow the restored layout
        values.match_layout(layers)


def output_scales(model: nn.Module) -> dict[str, float]:
    """Every elastic layer's output scale (lora_alpha / r as attached), by module: part of what a checkpoint holds."""
    model = uncompiled(model)
    return {name: layer.scaling for name, layer in elastic_layers(model).items()}


def restore_output_scales(model: nn.Module, scales) -> None:
    """Give every elastic layer the output scale its checkpoint trained with, whatever the config's defaults resolve
    to now (a checkpoint written before scales were recorded has none: the attached ones stay)."""
    if scales is None:
        return
    layers = elastic_layers(uncompiled(model))
    fits = isinstance(scales, dict) and set(scales) == set(layers)
    if not fits or not all(is_positive_number(v) for v in scales.values()):
        raise CheckpointError(
            "checkpoint does not fit this model: its output scales are not one positive number per adapted module."
        )
    for name, value in scales.items():
        layers[name].scaling = float(value)


def restore_model(model: nn.Module, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Give ``model`` (attached with the same config) the saved layout, output scales and parameter values."""
    model = uncompiled(model)
    restore_layout(model, state["layout"])
    restore_output_scales(model, state.get("output_scales"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    if set(saved) != set(params):
        diff = sorted(set(saved) ^ set(params))[:3]
        raise CheckpointError(f"checkpoint does not fit this model: trainable parameters differ ({diff}).")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise CheckpointError(
                    f"checkpoint does not fit this model: {name} was saved with shape "
                    f"{tuple(saved[name].shape)}, the model has {tuple(p.shape)}."
                )
            p.copy_(saved[name].to(p.dtype))
    allocator = _peft_allocator(model)
    if allocator is not None and state.get("peft_adalora") is not None:
        _restore_allocator(model.base_model.model, allocator, state["peft_adalora"], tensors)


def restore_training(optimizer, scheduler, controller, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Optimizer moments, scheduler position, controller state and RNG streams."""
    groups = state["optimizer_groups"]
    if [g["size"] for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError("checkpoint optimizer groups do not match this run's optimizer.")
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    for key, value in state["optimizer_scalars"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    saved_groups, start = [], 0
    for group in groups:
        size = group["size"]
        saved_groups.append(
            {k: v for k, v in group.items() if k != "size"} | {"params": list(range(start, start + size))}
        )
        start += size
    optimizer.load_state_dict({"state": per_param, "param_groups": saved_groups})
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict({k: v for k, v in state["scheduler"].items() if v is not None})
    if controller is not None and state["controller"] is not None:
        restore_controller(controller, state, tensors)
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))


def restore_controller(controller, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The controller's JSON state, then its tensor state (after the layers took the saved layout)."""
    controller.load_state_dict(state["controller"])
    prefix = "controller."
    controller.load_state_tensors({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})


# ---------------------------------------------------------------- stock PEFT AdaLoRA


def _peft_allocator(model: nn.Module):
    """Stock PEFT AdaLoRA's RankAllocator (its importance EMAs and rank pattern are training state), or None."""
    base = getattr(model, "base_model", None)
    return getattr(base, "rankallocator", None) if base is not None else None


def _restore_allocator(scored: nn.Module, allocator, saved: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Put back the allocator's importance EMAs (keyed by the names of ``scored``, the model PEFT wraps, as
    the allocator keys them) and the rank pattern E is masked to."""
    params = dict(scored.named_parameters())
    for kind in ALLOCATOR_EMAS:
        prefix = f"peft_adalora.{kind}."
        ema = {}
        for key, value in tensors.items():
            if key.startswith(prefix):
                name = key[len(prefix) :]
                if name not in params or params[name].shape != value.shape:
                    raise CheckpointError(f"checkpoint does not fit this model: AdaLoRA importance of {name}.")
                ema[name] = value.to(params[name].device, params[name].dtype)
        setattr(allocator, kind, ema)
    allocator.peft_config.rank_pattern = saved["rank_pattern"]


# ---------------------------------------------------------------- transformers Trainer checkpoints


def save_trainer_state(checkpoint_dir: str | Path, model: nn.Module, controller) -> Path:
    """Write ``<checkpoint_dir>/dynarank/`` atomically: what a Trainer checkpoint lacks to resume a rank-changing
    run (the slot layout the saved weights have, and the controller's state). The Trainer saves the rest."""
    model = uncompiled(model)
    state = {
        "format_version": FORMAT_VERSION,
        "step": controller.step,
        "total_steps": controller.total_steps,
        "method": controller.config.method,
        "layout": {name: layer.slots for name, layer in elastic_layers(model).items()},
        "output_scales": output_scales(model),
        "controller": controller.state_dict(),
    }
    tensors = {
        f"controller.{k}": v.detach().to("cpu").contiguous().clone() for k, v in controller.state_tensors().items()
    }
    return _write(Path(checkpoint_dir) / TRAINER_DIR, state, tensors)


def read_trainer_state(checkpoint_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify ``<checkpoint_dir>/dynarank/``; CheckpointError says what to do when it is missing."""
    path = Path(checkpoint_dir) / TRAINER_DIR
    restore_interrupted(path, STATE_FILE)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"{checkpoint_dir} holds no dynarank state ({TRAINER_DIR}/{STATE_FILE}): it was saved without "
            "DynaRankCallback, or the run was killed before the callback saved. The rank controller cannot restart "
            "mid-run: resume from a checkpoint that has it, or start the run again."
        )
    state, tensors = read(path)
    missing = [k for k in TRAINER_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path / STATE_FILE} lacks {', '.join(missing)}: not a Trainer checkpoint's state.")
    return state, tensors


def latest_trainer_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` of ``output_dir`` whose dynarank state reads and verifies (None: none has).

    Newer checkpoints without it (a run killed between the Trainer's save and the callback's) are
    reported and passed over.
    """
    root = Path(output_dir)
    found = [(int(m.group(1)), p) for p in root.glob("checkpoint-*") if (m := TRAINER_STEP_DIR.match(p.name))]
    for _, path in sorted(found, reverse=True):
        try:
            read_trainer_state(path)
            return path
        except CheckpointError as exc:
            logger.warning("dynarank: passing over %s: %s", path.name, exc)
    return None
