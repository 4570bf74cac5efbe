"""Save and restore the whole training state: safetensors + JSON, atomic, checksummed, never pickled.

RUN_DIR/checkpoints/step-<N>/
  state.json          step, controller state, optimizer hyper-parameters and scalar state,
                      scheduler state, Python RNG, the adapter layout, sha256 of the tensors
                      and of this file's own content (so an edit to either is detected)
  tensors.safetensors trainable parameters (current shapes), optimizer state tensors, torch RNG

A checkpoint is written to a temporary sibling and renamed, so a crash during a save leaves
the previous checkpoints intact; the newest *complete* one (with a matching checksum) is the
one resumed.
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
from safetensors.torch import load_file
from torch import nn

from .attach import elastic_layers
from .io import write_atomically

STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")

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
    layout = {name: layer.slots for name, layer in elastic_layers(model).items()}
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "layout": layout,
        "optimizer_groups": groups,
        "optimizer_scalars": scalars,
        "scheduler": _json_safe(scheduler.state_dict()) if scheduler is not None else None,
        "controller": controller.state_dict() if controller is not None else None,
        "rng_python": _json_safe(random.getstate()),
        "extra": extra or {},
    }
    return state, {k: v.to("cpu").contiguous().clone() for k, v in tensors.items()}


def save(
    run_dir: str | Path, model, optimizer, scheduler, controller, step: int, keep: int = 3, extra: dict | None = None
) -> Path:
    """Write ``checkpoints/step-<step>`` atomically and keep the newest ``keep`` checkpoints."""
    from safetensors.torch import save

    state, tensors = capture(model, optimizer, scheduler, controller, step, extra)
    blob = save(tensors)
    state["sha256"] = hashlib.sha256(blob).hexdigest()
    state["state_sha256"] = _state_digest(state)
    root = Path(run_dir) / "checkpoints"
    out = write_atomically(
        root / f"step-{step}", {TENSORS_FILE: blob, STATE_FILE: json.dumps(state).encode()}, marker=STATE_FILE
    )
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first (temporary, unfinished ones are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and verify one checkpoint; a damaged one raises CheckpointError naming the problem."""
    path = Path(path)
    state_file, tensors_file = path / STATE_FILE, path / TENSORS_FILE
    if not state_file.is_file() or not tensors_file.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (expected {STATE_FILE} and {TENSORS_FILE}).")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{state_file} is damaged ({exc}).") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{state_file}: unsupported checkpoint format {state.get('format_version')!r}.")
    if state.get("state_sha256") != _state_digest(state):
        raise CheckpointError(f"{state_file} does not match its checksum: the file was modified.")
    blob = tensors_file.read_bytes()
    if hashlib.sha256(blob).hexdigest() != state.get("sha256"):
        raise CheckpointError(f"{tensors_file} does not match its checksum: the file is truncated or was modified.")
    try:
        tensors = load_file(str(tensors_file))
    except (SafetensorError, OSError) as exc:
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


def restore_model(model: nn.Module, state: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Give ``model`` (attached with the same config) the saved layout and parameter values."""
    layers = elastic_layers(model)
    if set(state["layout"]) != set(layers):
        missing = sorted(set(state["layout"]) ^ set(layers))[:3]
        raise CheckpointError(f"checkpoint does not fit this model: adapted modules differ ({missing}).")
    for name, slots in state["layout"].items():
        layers[name].set_slots(slots)
    if hasattr(model, "dynarank_svd"):  # ElaLoRA / AdaLoRA singular values follow the restored layout
        model.dynarank_svd.match_layout(layers)
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
        controller.load_state_dict(state["controller"])
        prefix = "controller."
        controller.load_state_tensors({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
