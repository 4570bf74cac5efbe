"""Loading folders a user hands dynarank: safetensors only, and exactly the file that was checked.

``require_safetensors`` refuses a model or adapter folder that holds any pickle file (or lacks its safetensors
weights) before anything in it is opened.

``load_peft_adapter`` is stock PEFT's ``PeftModel.from_pretrained`` without
its weight loader, which falls back to ``torch.load`` (a pickle) on ``adapter_model.bin``: the folder is refused if
it holds any pickle, the configuration is read as JSON (a LoRA configuration's fields checked, naming the first that
PEFT could not build), and the weights from ``adapter_model.safetensors`` alone (``files.read_safetensors``: one
read, checksummed and loaded from the same bytes).
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import is_finite_number
from .files import RunFileError, read_json, read_safetensors
from .storage import WEIGHTS_FILE as NATIVE_WEIGHTS
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
    "native adapter": (NATIVE_WEIGHTS,),
}
# How to get a kind of folder's weights as safetensors, where they were found as a pickle.
_CONVERSIONS = {
    "model": "convert it to safetensors where you trust the file (from_pretrained, then save_pretrained(dir), which "
    "writes model.safetensors) and pass that folder",
    "adapter": "convert it to safetensors where you trust the file (PeftModel.from_pretrained, then "
    "save_pretrained(dir), which writes adapter_model.safetensors) and pass that folder",
    "native adapter": f"dynarank.save_adapter writes them as {NATIVE_WEIGHTS}, never as a pickle: save it again",
}


def pickle_files(folder: str | Path) -> list[str]:
    """Names of the pickle files in ``folder`` (not in its subfolders), sorted."""
    folder = Path(folder)
    return sorted({p.name for pattern in PICKLE_FILES for p in folder.glob(pattern) if not p.is_dir()})


def require_safetensors(folder: str | Path, what: str = "model") -> None:
    """Refuse ``folder`` if it holds any pickle file (it can run code when loaded), or lacks its safetensors weights.

    ``what`` is 'model' (a Hugging Face model directory: ``model.safetensors`` or its shard index), 'adapter' (a
    PEFT adapter directory: ``adapter_model.safetensors``) or 'native adapter' (what ``dynarank.save_adapter``
    writes: ``dynarank_adapter.safetensors``)."""
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
        raise UnsafeFolderError(
            f"{folder} holds its {what} weights as {pickled[0]}, a pickle, which dynarank never loads (it can run "
            f"code): {_CONVERSIONS[what]}."
        )
    if not has_weights:
        raise UnsafeFolderError(f"{folder} holds no {names[0]}: dynarank reads {what} weights from safetensors only.")


def peft_config(path: Path):
    """The PEFT configuration of adapter directory ``path``, from its adapter_config.json (errors name the file)."""
    from peft import LoraConfig, PeftType
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
    except (ValueError, TypeError, KeyError) as exc:
        raise AdapterFormatError(f"{config_file} is not a PEFT adapter configuration ({exc}).") from None
    if issubclass(config_class, LoraConfig):
        _check_lora_fields(data, config_file)
    try:
        return config_class.from_peft_type(**config_class.check_kwargs(**data))
    except (ValueError, TypeError, KeyError) as exc:
        raise AdapterFormatError(f"{config_file} is not a PEFT adapter configuration ({exc}).") from None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _names(value) -> bool:
    """A list of names (module names, patterns)."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _name_or_names(value) -> bool:
    return value is None or isinstance(value, str) or _names(value)


def _layer_indices(value) -> bool:
    def index(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    return value is None or index(value) or (isinstance(value, list) and all(index(v) for v in value))


def _flag(value) -> bool:
    return isinstance(value, bool)


# The fields of a LoRA adapter_config.json that PEFT reads only when it builds the layers, where a wrong type fails
# deep inside (a TypeError from a comparison, an AttributeError) or passes unnoticed: field -> (what it must be,
# check). None passes where None is PEFT's own default.
_LORA_FIELDS = {
    "r": ("a positive integer", _positive_int),
    "lora_alpha": ("a number", is_finite_number),
    "lora_dropout": ("a number from 0 to 1", lambda v: is_finite_number(v) and 0 <= v <= 1),
    "bias": ("'none', 'all' or 'lora_only'", lambda v: v in ("none", "all", "lora_only")),
    "target_modules": ("a pattern or a list of module names", _name_or_names),
    "exclude_modules": ("a pattern or a list of module names", _name_or_names),
    "modules_to_save": ("a list of module names", lambda v: v is None or _names(v)),
    "layers_pattern": ("a name or a list of names", _name_or_names),
    "layers_to_transform": ("a layer index or a list of them", _layer_indices),
    "fan_in_fan_out": ("true or false", _flag),
    "use_rslora": ("true or false", _flag),
    "use_dora": ("true or false", _flag),
}
# Per PEFT method: its own fields, and the {module name: value} patterns (None, or an object) with what each value
# must be. LoRA's rank_pattern gives a module its rank; AdaLoRA's the mask of the ranks it kept, built at init_r.
_METHOD_FIELDS = {
    "ADALORA": {"init_r": ("a positive integer", _positive_int), "target_r": ("a positive integer", _positive_int)},
}
_PATTERNS = {
    "LORA": {
        "rank_pattern": ("a positive integer", _positive_int),
        "alpha_pattern": ("a number", is_finite_number),
    },
    "ADALORA": {
        "rank_pattern": ("a list of true / false", lambda v: isinstance(v, list) and all(_flag(b) for b in v)),
        "alpha_pattern": ("a number", is_finite_number),
    },
}


def _check_lora_fields(data: dict, config_file: Path) -> None:
    """AdapterFormatError naming the first field of a LoRA-family configuration that PEFT could not build."""
    kind = data.get("peft_type")
    for field, (what, check) in {**_LORA_FIELDS, **_METHOD_FIELDS.get(kind, {})}.items():
        if field in data and not check(data[field]):
            raise AdapterFormatError(f"{config_file} is damaged: its {field} is {data[field]!r}, not {what}.")
    for field, (what, check) in _PATTERNS.get(kind, {}).items():
        pattern = data.get(field)
        if pattern is not None and not isinstance(pattern, dict):
            raise AdapterFormatError(
                f"{config_file} is damaged: its {field} is {pattern!r}, not an object of module name: {what}."
            )
        bad = next((name for name, value in (pattern or {}).items() if not check(value)), None)
        if bad is not None:
            raise AdapterFormatError(f"{config_file} is damaged: its {field}[{bad!r}] is {pattern[bad]!r}, not {what}.")


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
    try:
        peft_model = wrapper(model, config, ADAPTER_NAME)
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        # What peft_config's field checks do not cover (another PEFT method's fields, a configuration that does not
        # fit this model) fails here, often deep inside PEFT; the try holds nothing but PEFT building the user's
        # configuration, so that any such failure is the file's.
        raise AdapterFormatError(
            f"{path / ADAPTER_CONFIG}: PEFT cannot build this adapter on "
            f"{getattr(model, 'name_or_path', None) or type(model).__name__} ({type(exc).__name__}: {exc})"
        ) from exc
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
