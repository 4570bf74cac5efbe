"""Loading folders a user hands dynarank: safetensors only, and exactly the file that was checked.

``require_safetensors`` refuses a model or adapter folder that holds any pickle file (or lacks its safetensors
weights) before anything in it is opened.

``load_peft_adapter`` is stock PEFT's ``PeftModel.from_pretrained`` without
its weight loader, which falls back to ``torch.load`` (a pickle) on ``adapter_model.bin``: the folder is refused if
it holds any pickle, the configuration is read as JSON, and the weights from ``adapter_model.safetensors`` alone
(``files.read_safetensors``: one read, checksummed and loaded from the same bytes).
"""

from __future__ import annotations

import re
from pathlib import Path

from .files import RunFileError, read_json, read_safetensors
from .storage import AdapterFormatError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"


class UnsafeFolderError(ValueError):
    """A model or adapter folder that holds a pickle file, or lacks its safetensors weights: never loaded."""


# Files that only a pickle loader (torch.load) reads: never opened here, whoever wrote them, and a folder that holds
# one is refused whole (a loader that falls back to it, or a file renamed over it, would run its code).
PICKLE_FILES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
# The weights file of each kind of folder: the only one read (a sharded model is read through its index).
SAFETENSORS_WEIGHTS = {
    "model": ("model.safetensors", "model.safetensors.index.json"),
    "adapter": (ADAPTER_WEIGHTS,),
}


def pickle_files(folder: str | Path) -> list[str]:
    """Names of the pickle files in ``folder`` (not in its subfolders), sorted."""
    folder = Path(folder)
    return sorted({p.name for pattern in PICKLE_FILES for p in folder.glob(pattern) if not p.is_dir()})


def require_safetensors(folder: str | Path, what: str = "model") -> None:
    """Refuse ``folder`` if it holds any pickle file (it can run code when loaded), or lacks its safetensors weights.

    ``what`` is 'model' (a Hugging Face model directory: ``model.safetensors`` or its shard index) or 'adapter' (a
    PEFT adapter directory: ``adapter_model.safetensors``)."""
    folder = Path(folder)
    names = SAFETENSORS_WEIGHTS[what]
    has_weights = any((folder / name).is_file() for name in names)
    pickled = pickle_files(folder)
    if pickled and has_weights:
        raise UnsafeFolderError(
            f"{folder} holds {pickled[0]}, a pickle, beside its {names[0]}: dynarank never reads a folder with a "
            "pickle in it (a loader that picks the pickle runs its code); delete it, or copy the safetensors files "
            "to a folder of their own."
        )
    if pickled:
        if what == "adapter":
            how = "PeftModel.from_pretrained, then save_pretrained(dir), which writes adapter_model.safetensors"
        else:
            how = "from_pretrained, then save_pretrained(dir), which writes model.safetensors"
        raise UnsafeFolderError(
            f"{folder} holds its {what} weights as {pickled[0]}, a pickle, which dynarank never loads (it can run "
            f"code): convert it to safetensors where you trust the file ({how}) and pass that folder."
        )
    if not has_weights:
        raise UnsafeFolderError(f"{folder} holds no {names[0]}: dynarank reads {what} weights from safetensors only.")


def peft_config(path: Path):
    """The PEFT configuration of adapter directory ``path``, from its adapter_config.json (errors name the file)."""
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise AdapterFormatError(f"{path} is not a PEFT adapter directory (no {ADAPTER_CONFIG}).")
    try:
        data = read_json(config_file)
    except RunFileError as exc:
        raise AdapterFormatError(str(exc)) from None
    data.pop("runtime_config", None)  # as PEFT does: runtime settings are not part of a saved adapter
    try:
        config_class = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(data.get("peft_type"))]
        return config_class.from_peft_type(**config_class.check_kwargs(**data))
    except (ValueError, TypeError, KeyError) as exc:
        raise AdapterFormatError(f"{config_file} is not a PEFT adapter configuration ({exc}).") from None


def load_peft_adapter(model, path: str | Path, label_names: list[str] | None = None, sha256: str | None = None):
    """``model`` wrapped as stock PEFT wraps it, with the adapter of directory ``path`` loaded for inference.

    Refuses a folder holding any pickle file and reads only ``adapter_model.safetensors``; ``sha256`` (recorded by
    dynarank beside the adapters it writes) must then match the file. An adapter that does not fit ``model`` is
    named in one line: a task head for another number of labels, or an adapter trained on another base.
    """
    from peft import PeftModel, set_peft_model_state_dict
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    path = Path(path)
    require_safetensors(path, "adapter")
    config = peft_config(path)
    weights = read_safetensors(path / ADAPTER_WEIGHTS, AdapterFormatError, sha256)
    config.inference_mode = True
    wrapper = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)
    peft_model = wrapper(model, config, ADAPTER_NAME)
    try:
        result = set_peft_model_state_dict(peft_model, weights, adapter_name=ADAPTER_NAME)
    except RuntimeError as exc:
        _raise_misfit(exc, path, model, label_names)
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(config.peft_type, "")
    missing = [k for k in result.missing_keys if prefix in k and ADAPTER_NAME in k]
    if missing:
        raise AdapterFormatError(
            f"{path / ADAPTER_WEIGHTS} lacks {len(missing)} adapter weights its {ADAPTER_CONFIG} calls for "
            f"({missing[0]}): the two files do not belong together."
        )
    if hasattr(peft_model.base_model, "_cast_adapter_dtype"):
        peft_model.base_model._cast_adapter_dtype(adapter_name=ADAPTER_NAME, autocast_adapter_dtype=True)
    return peft_model.eval()


_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, "
    r"the shape in current model is torch\.Size\(\[([\d, ]*)\]\)"
)
_HEAD_KEY = re.compile(r"(^|\.)(classifier|score|modules_to_save)(\.|$)")  # the task head PEFT saves in full


def _shape(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n.strip()]


def _raise_misfit(exc: RuntimeError, path: Path, model, label_names: list[str] | None) -> None:
    """Turn torch's size-mismatch report into one line; re-raise anything else."""
    mismatches = [
        (key.removeprefix("base_model.model."), _shape(saved), _shape(wanted))
        for key, saved, wanted in _MISMATCH.findall(str(exc))
    ]
    if not mismatches:
        raise exc
    outputs_only = all(_HEAD_KEY.search(key) and saved[1:] == wanted[1:] for key, saved, wanted in mismatches)
    if outputs_only and label_names is not None:
        raise ValueError(
            f"{path}: the adapter's task head has {mismatches[0][1][0]} outputs, but {len(label_names)} labels "
            f"are named ({','.join(label_names)}): give --labels one name per output, in order."
        ) from None
    key, saved, wanted = next((m for m in mismatches if not _HEAD_KEY.search(m[0])), mismatches[0])
    raise ValueError(
        f"{path} was trained on a different base model: its {key} is {saved}, but {wanted} in "
        f"{getattr(model, 'name_or_path', None) or 'the model'}: pass the --model it was trained on."
    ) from None
