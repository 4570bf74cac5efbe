"""Configuration of a dynarank adapter: one dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Method = Literal["lora", "ard", "elalora", "adalora"]
Granularity = Literal["head", "matrix"]
HeadLayout = Literal["own", "shared"]
Preset = Literal["default", "paper"]
LambdaMode = Literal["relative", "gradient", "absolute"]
TVForm = Literal["step", "anchor"]
Readout = Literal["ceil", "round"]
MaskKind = Literal["hard", "soft"]

METHODS: tuple[str, ...] = ("lora", "ard", "elalora", "adalora")
SVD_METHODS: tuple[str, ...] = ("elalora", "adalora")  # the SVD form P diag(E) Q with importance scores
GRANULARITIES: tuple[str, ...] = ("head", "matrix")
HEAD_LAYOUTS: tuple[str, ...] = ("own", "shared")

# Module-name suffixes that identify attention projections in common Hugging Face layouts.
QUERY_SUFFIXES = ("query", "q_proj", "q", "q_lin")
KEY_VALUE_SUFFIXES = ("key", "value", "k_proj", "v_proj", "k", "v", "k_lin", "v_lin")
OUTPUT_SUFFIXES = ("attention.output.dense", "o_proj", "out_proj", "o", "out_lin")
# Top-level task heads: trained in full (modules_to_save), never adapted. BART-style models call theirs
# classification_head; DistilBERT's classifier is preceded by a freshly initialised pre_classifier.
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs", "lm_head", "classification_head", "pre_classifier")


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

    method: Method = _help(
        "Rank method: 'lora' (fixed ranks), 'ard' (learned per-head ranks), 'elalora' (importance-scored "
        "prune AND expand, total rank conserved) or 'adalora' (importance-scored pruning to a budget, "
        "physically shrinking).",
        "lora",
    )
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

    # --- rank control shared by the rank-changing methods
    rank_floor: int = _help("Smallest rank a group can end at; 0 lets a head switch off.", 0)
    resize_every: int | None = _help(
        "Optimizer steps between physical resizes (ElaLoRA's interval, AdaLoRA's deltaT; None: about 20 "
        "resizes over the active phase).",
        None,
    )

    # --- ARD-LoRA (method='ard')
    preset: Preset = _help(
        "'default': settings calibrated to the run (warm-up, straight-through hard mask, relative lambda); "
        "'paper': the seed paper's literal values (lambda 0.01, beta 0.1, lr 1e-4 / 5e-5, soft mask, round).",
        "default",
    )
    ard_lambda: float | None = _help(
        "l1 strength. lambda_mode='relative': in units of the loss improvement of warm-up per slot, priced "
        "by each group's parameter cost (default 1.0; larger = smaller ranks); 'gradient': in units of the "
        "median task gradient on alpha at the end of warm-up; 'absolute': the raw coefficient of "
        "sum |alpha| (paper: 0.01).",
        None,
    )
    lambda_mode: LambdaMode = _help("'relative' (calibrated to the run's loss), 'gradient' or 'absolute'.", "relative")
    ard_beta: float | None = _help(
        "Strength of the total-variation (rank stability) term, in the units of ard_lambda but independent of it "
        "(ard_lambda=0 leaves TV acting alone): beta_g = ard_beta * p_g, lambda_g = ard_lambda * p_g, with p_g "
        "the price lambda_mode gives a group. Default: a tenth of the mode's default lambda (relative: 0.1; "
        "absolute: 0.001, the paper's lambda * beta).",
        None,
    )
    tv_form: TVForm = _help(
        "'step': the paper's ||alpha(t) - alpha(t-1)||^2 (alpha(t-1): the value before the previous update); "
        "'anchor': ||alpha(t) - alpha(last resize)||^2, which holds alpha near its value at the last cut "
        "(docs/ard.md measures both).",
        "step",
    )
    lr_alpha: float | None = _help(
        "Learning rate of the alphas (None: alpha_travel / active steps, so a head can cross its range).", None
    )
    alpha_travel: float = _help("How far (in alpha) a head can move over the active phase when lr_alpha=None.", 2.0)
    warmup_frac: float = _help(
        "Fraction of steps with alpha frozen at the start (its task gradient is 0 at t=0); ElaLoRA/AdaLoRA: "
        "t_init, the steps before the first reallocation.",
        0.2,
    )
    final_frac: float = _help(
        "Fraction of steps at the end with ranks fixed, fine-tuning A and B (ElaLoRA/AdaLoRA: t_final).", 0.15
    )
    readout: Readout = _help("Rank read from alpha: 'ceil' (unbiased with the hard mask) or 'round'.", "ceil")
    mask: MaskKind = _help(
        "'hard': 0/1 mask in the forward pass with the clamp's gradient (straight-through); "
        "'soft': the clamp mask itself (biased: B grows to compensate partly-on slots).",
        "hard",
    )

    # --- ElaLoRA / AdaLoRA (method='elalora' / 'adalora'): update P diag(E) Q, ranks scored by importance
    target_rank: float | None = _help(
        "Final average rank per group (AdaLoRA's target_r); the total rank budget falls cubically from "
        "r x groups to round(target_rank x groups). AdaLoRA's default (no target given): 2/3 of r, like PEFT's "
        "12 -> 8; ElaLoRA's: none (the total rank is conserved), with one it prunes into the budget while "
        "reallocating.",
        None,
    )
    target_params: int | None = _help(
        "Budget in adapter parameters (A and B, what the export costs) instead of ranks. AdaLoRA: the final "
        "count; ElaLoRA: a ceiling that expansions never exceed (None: ElaLoRA conserves the total rank), or, "
        "below the initial size, a budget it prunes into on AdaLoRA's cubic schedule while reallocating; "
        "ARD: a ceiling that falls cubically from the start to this count over the active phase, with the "
        "l1 strength steered so that the learned ranks follow it (None: the l1 strength alone sets the size).",
        None,
    )
    t_init_steps: int | None = _help("ElaLoRA/AdaLoRA: exact t_init in optimizer steps (overrides warmup_frac).", None)
    t_final_steps: int | None = _help("ElaLoRA/AdaLoRA: exact t_final in optimizer steps (overrides final_frac).", None)
    k_candidates: int = _help("ElaLoRA: lowest-scoring ranks every group offers per round (capped at rank - 1).", 2)
    b_changes: int = _help(
        "ElaLoRA: ranks pruned and added in the first round (b0); later rounds use round(b0 (1 - p^3)).", 4
    )
    ortho_weight: float = _help(
        "Weight of the orthogonality penalty, the mean over groups of ||A A^T - I||_F and ||B^T B - I||_F; its "
        "gradient is added once per optimizer step (0 disables it).",
        0.1,
    )
    importance_beta1: float = _help("EMA factor of the sensitivity I = |w * dL/dw| (AdaLoRA/ElaLoRA: 0.85).", 0.85)
    importance_beta2: float = _help("EMA factor of the uncertainty |I - Ibar| (AdaLoRA/ElaLoRA: 0.85).", 0.85)
    switch_off: bool = _help(
        "ElaLoRA: a group may offer its last rank too, so a head or matrix can be switched off and its "
        "parameters go to the others (rank_floor still applies). Default False keeps one rank in every group, "
        "as the authors' code does.",
        False,
    )
    reset_optimizer_on_resize: bool = _help(
        "Reset every optimizer moment after a round that changed ranks, as the ElaLoRA authors' code does (it "
        "rebuilds its optimizer); default False carries the moments of every kept rank.",
        False,
    )

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
        self._validate_rank_control()
        self._validate_svd()
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("target_modules is empty: give names, a regex, or 'all-linear'.")
        elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}.")

    def _validate_rank_control(self) -> None:
        choices = {
            "preset": ("default", "paper"),
            "lambda_mode": ("relative", "gradient", "absolute"),
            "tv_form": ("step", "anchor"),
            "readout": ("ceil", "round"),
            "mask": ("hard", "soft"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}.")
        if not isinstance(self.rank_floor, int) or not 0 <= self.rank_floor <= self.r:
            raise ValueError(f"rank_floor must be an integer in [0, r={self.r}], got {self.rank_floor!r}.")
        if self.resize_every is not None and (not isinstance(self.resize_every, int) or self.resize_every < 1):
            raise ValueError(f"resize_every must be a positive integer or None, got {self.resize_every!r}.")
        for name in ("ard_lambda", "lr_alpha", "ard_beta"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}.")
        if self.alpha_travel <= 0:
            raise ValueError(f"alpha_travel must be > 0, got {self.alpha_travel!r}.")
        if not (0 <= self.warmup_frac < 1 and 0 <= self.final_frac < 1 and self.warmup_frac + self.final_frac < 1):
            raise ValueError(
                f"warmup_frac ({self.warmup_frac}) and final_frac ({self.final_frac}) must be in [0, 1) and leave "
                "an active phase (their sum < 1)."
            )

    def _validate_svd(self) -> None:
        for name in ("k_candidates", "b_changes", "t_init_steps", "t_final_steps", "target_params"):
            value = getattr(self, name)
            low = 1 if name in ("k_candidates", "target_params") else 0
            if value is None and name not in ("k_candidates", "b_changes"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        for name in ("importance_beta1", "importance_beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)!r}.")
        if self.ortho_weight < 0:
            raise ValueError(f"ortho_weight must be >= 0, got {self.ortho_weight!r}.")
        for name in ("switch_off", "reset_optimizer_on_resize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.switch_off and self.method != "elalora":
            raise ValueError(
                f"switch_off applies to method='elalora', not {self.method!r}: ARD and AdaLoRA switch groups off "
                "whenever rank_floor is 0."
            )
        budget_fields = ("target_rank", "target_params", "t_init_steps", "t_final_steps")
        if self.method not in SVD_METHODS:
            # ARD takes a parameter budget too; the rank budget and the step counts are the SVD methods'.
            allowed = ("target_params",) if self.method == "ard" else ()
            given = [n for n in budget_fields if getattr(self, n) is not None and n not in allowed]
            if given:
                raise ValueError(f"{', '.join(given)} apply to method='elalora' or 'adalora', not {self.method!r}.")
            return
        if self.target_rank is not None and self.target_params is not None:
            raise ValueError(
                "give the budget either in ranks (target_rank) or in parameters (target_params), not both."
            )
        if self.target_rank is None:
            return
        value = self.target_rank
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < self.r:
            raise ValueError(
                f"target_rank must be a number in (0, r={self.r}) (the budget falls from the initial rank to it), "
                f"got {value!r}."
                + (" ElaLoRA without target_rank conserves the total rank." if self.method == "elalora" else "")
            )
        if value < self.rank_floor:
            raise ValueError(f"target_rank ({value}) is below rank_floor ({self.rank_floor}): no group may go there.")

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
