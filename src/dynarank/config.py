"""Configuration of a dynarank adapter: one dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Method = Literal["lora", "ard"]
Granularity = Literal["head", "matrix"]
HeadLayout = Literal["own", "shared"]

METHODS: tuple[str, ...] = ("lora", "ard")
GRANULARITIES: tuple[str, ...] = ("head", "matrix")
HEAD_LAYOUTS: tuple[str, ...] = ("own", "shared")

# Module-name suffixes that identify attention projections in common Hugging Face layouts.
QUERY_SUFFIXES = ("query", "q_proj", "q")
KEY_VALUE_SUFFIXES = ("key", "value", "k_proj", "v_proj", "k", "v")
OUTPUT_SUFFIXES = ("attention.output.dense", "o_proj", "out_proj", "o")
# Task heads that stay trainable (and are never adapted by "all-linear").
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs", "lm_head")


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field that carries its help text (used by the CLI and the docs)."""
    if default is not dataclasses.MISSING:
        kw["default"] = default
    return field(metadata={"help": text}, **kw)


@dataclass
class DynaRankConfig:
    """What to adapt, and how.

    The low-rank update of a target ``W`` (d_out x d_in) is
    ``delta(x) = scaling * sum_g B_g (m_g * (A_g x))`` with ``scaling = lora_alpha / r``.
    """

    method: Method = _help("Rank method: 'lora' (fixed ranks) or 'ard' (learned per-head ranks).", "lora")
    target_modules: list[str] | str = _help(
        "Modules to adapt: a list of name suffixes, a regex (string) matched against the full "
        "name, or 'all-linear' (every Linear except the task head).",
        default_factory=lambda: ["query", "value"],
    )
    r: int = _help("Initial rank of every group (per head under granularity='head').", 8)
    lora_alpha: float | None = _help("Output scale numerator; scaling = lora_alpha / r. Default: r.", None)
    lora_dropout: float = _help("Dropout on the adapter input (0 disables it).", 0.0)
    granularity: Granularity = _help(
        "'head': one rank group per attention head in q/k/v/o projections; 'matrix': one per module.",
        "head",
    )
    head_layout: HeadLayout = _help(
        "'own': each head has its own A rows (a rank costs d_in + d_head); 'shared': the heads of a "
        "projection share A's rows and each keeps its own B columns (plain LoRA's cost at full use).",
        "own",
    )
    num_heads: int | None = _help("Attention heads; default model.config.num_attention_heads.", None)
    num_kv_heads: int | None = _help("Key-value heads (GQA); default model.config.num_key_value_heads.", None)
    head_dim: int | None = _help("Head size; default model.config.head_dim or hidden_size / num_heads.", None)
    modules_to_save: list[str] | None = _help(
        "Modules trained in full and saved with the adapter; default: the task head if there is one.",
        None,
    )
    exclude_modules: list[str] = _help("Name suffixes never adapted.", default_factory=list)
    seed: int | None = _help("Seed for the adapter's initialisation (None: the global torch RNG).", None)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not known; choose one of {', '.join(METHODS)}.")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r}; choose 'head' or 'matrix'.")
        if self.head_layout not in HEAD_LAYOUTS:
            raise ValueError(f"head_layout={self.head_layout!r}; choose 'own' or 'shared'.")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer (the initial rank per group), got {self.r!r}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}.")
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("target_modules is empty: give names, a regex, or 'all-linear'.")
        elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}.")

    @property
    def scaling(self) -> float:
        """Output scale of the update, fixed for the whole run (it never follows rank changes)."""
        return (self.lora_alpha if self.lora_alpha is not None else self.r) / self.r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DynaRankConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}.")
        return cls(**data)
