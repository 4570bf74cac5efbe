"""Export an elastic adapter as a plain PEFT LoRA adapter that stock PEFT (and vLLM-style servers) load.

Every gate, mask and head layout is folded into ordinary ``lora_A`` (r x d_in) and ``lora_B``
(d_out x r) tensors: a stock loader never sees a tensor it would silently ignore.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .attach import ATTACHED_ATTR, elastic_layers
from .naming import uncompiled
from .storage import write_atomically

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _peft_tensors(
    model: nn.Module, server_safe: bool
) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float], list[str]]:
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    empty: list[str] = []
    with torch.no_grad():
        for name, layer in elastic_layers(model).items():
            if layer.n_slots == 0:
                empty.append(name)
                continue
            a, b = layer.lora_factors()
            rank = a.shape[0]
            if server_safe:
                b = b * layer.scaling
                alphas[name] = float(rank)  # PEFT scaling alpha / r = 1: the scale is in B
            else:
                alphas[name] = layer.scaling * rank
            ranks[name] = rank
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().to("cpu").contiguous().clone()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().to("cpu").contiguous().clone()
    return tensors, ranks, alphas, empty


# transformers class-name endings -> PEFT task types (what AutoPeftModelFor* classes read to pick a model class).
TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
)
# The task types whose PeftModelFor* class adds the task head to modules_to_save and expects its weights (PEFT's
# classifier / qa_outputs): a server-safe export, which holds LoRA matrices only, is written without them.
HEAD_TASK_TYPES = frozenset({"SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"})


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task type for ``model``'s class (None when it is none of the common heads).

    An encoder-decoder is SEQ_2_SEQ_LM only when it reads text ids (T5, BART): PEFT's seq2seq wrapper passes
    ``input_ids`` on to the decoder, which a speech or vision encoder-decoder (Whisper's input_features, a
    VisionEncoderDecoder's pixel_values) then receives twice. Those load as a plain PeftModel, as PEFT's own recipes
    for them do.
    """
    name = type(model).__name__
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and name.endswith(("ForConditionalGeneration", "Seq2SeqLM")):
        return "SEQ_2_SEQ_LM" if getattr(model, "main_input_name", "input_ids") == "input_ids" else None
    return next((task for suffix, task in TASK_TYPES if name.endswith(suffix)), None)


def _pattern_key_matches(names: list[str]) -> dict[str, list[str]]:
    """For each of ``names``: the others that stock PEFT would also give its rank_pattern / alpha_pattern value.

    PEFT reads a pattern key as a regular expression that ends the module name, whole or after a dot
    (``peft.utils.other.get_pattern_key``: ``(.*\\.)?(key)$``), and takes the first key that matches: the key
    ``fc`` matches ``head.fc`` too, and the ``.`` of ``layer.fc`` matches the ``_`` of ``layer_fc``.
    """
    by_last: dict[str, list[str]] = {}
    for name in names:
        by_last.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    matches = {}
    for key in names:
        last = key.rsplit(".", 1)[-1]  # literal (module names hold no other regex syntax): the name ends with it
        try:
            pattern = re.compile(rf"(.*\.)?({key})$")
        except re.error:  # a name PEFT cannot read as a pattern either
            matches[key] = []
            continue
        candidates = [n for group, members in by_last.items() if group.endswith(last) for n in members]
        matches[key] = sorted(n for n in candidates if n != key and pattern.match(n))
    return matches


def pattern_order(names) -> list[str]:
    """``names`` in the order to write them as rank_pattern / alpha_pattern keys: sorted, except that a name comes
    after every other name its key also matches (``head.fc`` before ``fc``), so that PEFT, taking the first match,
    gives each module its own value. Without such names: plain sorted order."""
    names = sorted(names)
    matches = _pattern_key_matches(names)
    order: list[str] = []
    seen: set[str] = set()

    def place(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for other in matches[name]:
            place(other)
        order.append(name)

    for name in names:
        place(name)
    return order


def exclusions(empty: list[str], targets: list[str]) -> list[str] | str | None:
    """exclude_modules for the modules at rank 0: their sorted names, which PEFT matches as suffixes too; when one
    of them ends another adapted module's name (``fc`` and ``head.fc``), that would leave the other module out:
    then a pattern, which PEFT matches against the whole name, of exactly these names."""
    if not empty:
        return None
    suffixes = {".".join(parts[i:]) for parts in (t.split(".") for t in targets) for i in range(1, len(parts))}
    if suffixes.isdisjoint(empty):
        return sorted(empty)
    return "^(" + "|".join(re.escape(name) for name in sorted(empty)) + ")$"


def peft_config_dict(
    model: nn.Module,
    ranks: dict[str, int],
    alphas: dict[str, float],
    empty: list[str],
    modules_to_save: list[str],
    server_safe: bool,
) -> dict:
    """A LoraConfig (as a dict) that reproduces the per-module ranks and scales exactly."""
    from peft import LoraConfig

    task_type = peft_task_type(model)
    top_name = max(ranks, key=ranks.get)
    top_rank = ranks[top_name]
    order = pattern_order(ranks)
    config = LoraConfig(
        # Top level = the largest module, at its own scale; every module is also in the patterns.
        r=top_rank,
        lora_alpha=alphas[top_name],
        target_modules=sorted(ranks),
        exclude_modules=exclusions(empty, list(ranks)),
        # Full module names only. PEFT matches pattern keys as name endings, the first match wins: a name that ends
        # another comes after it (pattern_order), and the file keeps this order (_sort_keys).
        rank_pattern={name: ranks[name] for name in order},
        alpha_pattern={name: alphas[name] for name in order},
        modules_to_save=list(modules_to_save) or None,
        lora_dropout=0.0,
        bias="none",
        # AutoPeftModelFor* needs the task type to pick the model class. A classifier's task type makes stock PEFT
        # wrap the task head as modules_to_save and expect its weights, which a server-safe export leaves out; a causal
        # or seq2seq LM's wraps no head, and vLLM's loader reads no task type (only r, lora_alpha, use_rslora).
        task_type=None if server_safe and task_type in HEAD_TASK_TYPES else task_type,
        base_model_name_or_path=getattr(getattr(model, "config", None), "_name_or_path", None) or None,
    )
    data = config.to_dict()
    for key, value in list(data.items()):
        if isinstance(value, set):
            data[key] = sorted(value)
    return data


# Dicts of adapter_config.json whose order is part of their meaning (PEFT takes the first key that matches a module);
# stock PEFT (peft.config._sort_keys) keeps them in order the same way when it saves a config.
ORDERED_KEYS = frozenset({"rank_pattern", "alpha_pattern"})


def _sort_keys(value):
    """``value`` with the keys of every dict sorted, as ``json.dumps(sort_keys=True)`` writes them, except for the
    dicts under ORDERED_KEYS."""
    if isinstance(value, dict):
        return {k: v if k in ORDERED_KEYS else _sort_keys(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_sort_keys(v) for v in value]
    return value


def tied_partners(model: nn.Module, save_names: list[str]) -> list[str]:
    """Modules not in ``save_names`` that share a trained weight with one of them (the output embeddings tied to a
    trained input embedding). A PEFT adapter saves each module of modules_to_save as a copy of its own, untied: the
    partner is saved too (the same values twice), so that the loaded model computes with the trained weight at both
    ends."""
    trained = {id(p) for name in save_names for p in model.get_submodule(name).parameters()}
    partners = []
    for name, module in model.named_modules():
        if not name or name in save_names or any(name.startswith(s + ".") for s in save_names):
            continue
        own = list(module.parameters(recurse=False))
        if any(id(p) in trained for p in own):
            partners.append(name)
    return partners


def export_peft(
    model: nn.Module, out_dir: str | os.PathLike, server_safe: bool = False, companions: tuple[str, ...] = ()
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for plain PEFT LoRA.

    Args:
        model: a model returned by :func:`dynarank.attach` (adapters unmerged).
        out_dir: target directory; written to a temporary sibling and renamed into place.
        server_safe: bake each module's scale into B, set alpha = r everywhere, write only
            lora_A / lora_B tensors (no modules_to_save): what vLLM-style servers read. A language model's task
            type stays (it wraps no head; AutoPeftModelForCausalLM needs it), a classifier's is left out.
        companions: names of files an application keeps beside the adapter, which a replacement of
            ``out_dir`` may remove (anything else there is the user's, and is never deleted).

    Returns:
        The output directory.
    """
    model = uncompiled(model)  # a torch.compile'd model writes the names of the model it compiled
    if getattr(model, ATTACHED_ATTR, None) is None:
        raise ValueError("export_peft() needs a model returned by dynarank.attach().")
    if any(layer.merged for layer in elastic_layers(model).values()):
        raise RuntimeError("the adapters are merged into the base; unmerge() before exporting.")
    tensors, ranks, alphas, empty = _peft_tensors(model, server_safe)
    if not ranks:
        raise ValueError("every adapted module has rank 0: there is no adapter to export.")
    save_names = [] if server_safe else list(getattr(model, "dynarank_modules_to_save", []))
    if server_safe and getattr(model, "dynarank_modules_to_save", []):
        logger.warning("server-safe export leaves out the trained task head(s) %s", model.dynarank_modules_to_save)
    save_names += tied_partners(model, save_names)
    for name in save_names:
        for pname, p in model.get_submodule(name).named_parameters():
            tensors[f"{PEFT_PREFIX}{name}.{pname}"] = p.detach().to("cpu").contiguous().clone()
    config = peft_config_dict(model, ranks, alphas, empty, save_names, server_safe)
    return write_atomically(
        out_dir,
        {
            ADAPTER_CONFIG: json.dumps(_sort_keys(config), indent=2).encode(),
            ADAPTER_WEIGHTS: tensors,
        },
        marker=ADAPTER_CONFIG,
        companions=companions,
    )
