"""Quantized base layers: bitsandbytes ``Linear4bit`` (NF4 / FP4) and ``Linear8bitLt`` under the adapters.

Recognised by class, without importing bitsandbytes (the core imports without it). What the rest of dynarank
relies on, read in bitsandbytes 0.50's source and checked by tests/test_quantized.py:

* Both classes subclass ``nn.Linear``, but their weight holds quantized bytes: a ``Params4bit`` of uint8, shape
  (d_out * d_in / 2, 1), or an ``Int8Params`` of int8 with per-row scales. So the adapter cannot take the weight's
  dtype (it is float32, see ``ElasticLoRALinear``), and nothing may be added into the weight in place (merge refuses:
  the sum would have to be quantized again, which changes the base).
* The CPU repacking trap (4-bit): on a CPU with AVX512-BF16, the first ``Linear4bit.forward`` in eval mode on an
  input without grad repacks the weight IN PLACE into a CPU-only layout (absmax rounded to bfloat16) and from then on
  computes in bfloat16, in train mode too: outputs move by ~5e-3, no gradient flows through the layer to its input
  any more (adapters below it stop learning, silently), tiny layers (d_out not a multiple of 32) crash, and a plain
  ``dequantize_4bit`` of the repacked bytes returns garbage. bitsandbytes' own inverse is best effort (the absmax
  stays rounded). :func:`keep_training_layout` turns the repacking off (``support_avx512bf16_for_cpu = False``) on
  every 4-bit layer, so evaluation computes exactly what training computes; ``attach`` and the CLI's loader call it.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


def quantization_of(module: nn.Module) -> str | None:
    """'nf4' or 'fp4' for a bitsandbytes ``Linear4bit``, 'int8' for a ``Linear8bitLt``, None for any other module."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("bitsandbytes"):
            continue
        if cls.__name__ == "Linear4bit":
            return str(getattr(module.weight, "quant_type", "fp4"))
        if cls.__name__ == "Linear8bitLt":
            return "int8"
    return None


def is_repacked(module: nn.Module) -> bool:
    """Whether a 4-bit layer's weight is in bitsandbytes' CPU inference layout (see the module docstring)."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def keep_training_layout(model: nn.Module) -> int:
    """Turn bitsandbytes' CPU repacking off on every 4-bit layer of ``model`` (undoing, best effort and with a
    warning, a repacking that happened already). Returns the number of 4-bit layers. Idempotent."""
    layers = [(name, m) for name, m in model.named_modules() if quantization_of(m) in ("nf4", "fp4")]
    repacked = []
    for name, layer in layers:
        layer.support_avx512bf16_for_cpu = False
        if is_repacked(layer):
            _unpack(layer)
            repacked.append(name)
    if repacked:
        logger.warning(
            "dynarank: %d 4-bit layers (%s, ...) had been repacked by bitsandbytes for CPU inference (an eval-mode "
            "forward pass without grad); put back in the training layout, best effort: their scales stay rounded to "
            "bfloat16. Load the base again for the exact quantized weights.",
            len(repacked),
            repacked[0],
        )
    return len(layers)


def _unpack(layer: nn.Module) -> None:
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = layer.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    layer.quant_state = weight.quant_state


def refuse_merge(name: str, module: nn.Module) -> None:
    """Raise if ``module`` is a quantized layer: an update cannot be added into quantized bytes."""
    kind = quantization_of(module)
    if kind is not None:
        raise ValueError(
            f"{name or 'this layer'} has a {kind} bitsandbytes base: merging would quantize base + update again, "
            "which changes the base. Export the adapter (dynarank.export_peft) and keep the quantized base, or load "
            "the base in float precision and merge into that."
        )
