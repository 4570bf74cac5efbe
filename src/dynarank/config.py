"""Configuration of a dynarank adapter: a small shared base and one dataclass per method.

    DynaRankConfig(method="ard", r=8, ard_lambda=2.0)        # -> ARDConfig(r=8, ard_lambda=2.0)
    DynaRankConfig(method="elalora", ard_lambda=2.0)         # ConfigError: ard_lambda is a knob of 'ard'

Methods (the same names in the library, the CLI, YAML files, run records and the docs):

    dynarank-lora      fixed per-group ranks (the engine without a controller)
    ard                ARD-LoRA: a learned scale per group sets its rank (ARDConfig)
    elalora            ElaLoRA: importance-scored prune AND expand (ElaLoRAConfig)
    adalora-physical   AdaLoRA-style importance-scored pruning that frees memory as it prunes (AdaLoRAConfig)

A knob the chosen method does not use is an error that names it: nothing is silently ignored. So is a knob set away
from its default that the rest of the config leaves without effect (:func:`inert_knobs`: the per-head knobs under
granularity='matrix'; ElaLoRA's switch_off above a rank floor, k_candidates without swaps; ARD's data-start knobs under
rank_init='uniform', init_rho and cap_order without a budget, alpha_travel beside lr_alpha: :func:`inert_ard_knobs`),
and a phase of the SVD methods' schedule given both as a fraction and in steps. Each
field carries its help text once (``metadata["help"]``); the CLI builds its flags from these fields.
A validation error is a :class:`ConfigError` that carries the field(s) it is about, so an application
can name its own spelling of them (the CLI names flags) without parsing the message. ``validate()`` holds every check:
construction runs it, and so does ``attach``, so a field changed after construction is checked before it is used.
Numbers of another type (numpy's) end as the Python int or float they equal, which JSON and YAML write.
``from_dict`` validates as the constructor does; what earlier versions recorded is read by the named rules of
:func:`read_record`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

Granularity = Literal["head", "matrix"]
HeadLayout = Literal["own", "shared"]
Preset = Literal["default", "paper"]
LambdaMode = Literal["relative", "gradient", "absolute"]
TVForm = Literal["step", "anchor"]
AlphaAt = Literal["target", "start"]
Readout = Literal["ceil", "round"]
MaskKind = Literal["hard", "soft"]
RankInit = Literal["auto", "uniform", "data"]
InitStatistic = Literal["gradient", "gradient-relative", "activation"]
InitMargin = Literal["gains", "equal"]
CapOrder = Literal["margin", "margin-per-parameter"]
InitScale = Literal["norm", "input", "input-gains"]
SVDInit = Literal["adalora", "lora"]

logger = logging.getLogger(__name__)

# Module-name suffixes that identify attention projections in common Hugging Face layouts.
QUERY_SUFFIXES = ("query", "q_proj", "q", "q_lin")
KEY_VALUE_SUFFIXES = ("key", "value", "k_proj", "v_proj", "k", "v", "k_lin", "v_lin")
# The attention's output projection, split per head by its input columns (Phi's self_attn.dense, Falcon's and Bloom's
# self_attention.dense, GPT-NeoX's and ALBERT's attention.dense too).
OUTPUT_SUFFIXES = (
    "attention.output.dense", "o_proj", "out_proj", "o", "out_lin", "self_attn.dense", "self_attention.dense",
    "attention.dense",
)  # fmt: skip
# Projections that compute q, k and v in one matrix (Phi-3, Falcon / GPT-NeoX / Bloom, MPT): no per-head split.
FUSED_QKV_SUFFIXES = ("qkv_proj", "query_key_value", "Wqkv", "qkv")
# Top-level task heads: trained in full (modules_to_save), never adapted. BART-style models call theirs
# classification_head; DistilBERT's classifier is preceded by a freshly initialised pre_classifier.
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs", "lm_head", "classification_head", "pre_classifier")
DEFAULT_START_RANK = 8  # r when neither it nor a budget is given
ORTHO_WEIGHT = 0.1  # the papers' orthogonality weight (both papers' code): stock PEFT AdaLoRA's in the application
LEGACY_METHODS = {"lora": "dynarank-lora", "adalora": "adalora-physical"}  # names in adapters saved before 0.2


class ConfigError(ValueError):
    """A configuration value the method refuses; ``fields`` names the field(s) it is about."""

    def __init__(self, fields: str | tuple[str, ...], problem: str) -> None:
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.problem = problem
        super().__init__(f"{' / '.join(self.fields)}: {problem}")

    def named(self, name_of) -> str:
        """The message with every field spelled by ``name_of(field)`` (e.g. a command-line flag)."""
        return f"{' / '.join(name_of(f) for f in self.fields)}: {self.problem}"


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field that carries its help text (the CLI's flags and the docs read it)."""
    if default is not dataclasses.MISSING:
        kw["default"] = default
    return field(metadata={"help": text}, **kw)


def _choice(config: Any, name: str, allowed: tuple[str, ...]) -> None:
    if getattr(config, name) not in allowed:
        raise ConfigError(name, f"{getattr(config, name)!r} is not one of {', '.join(allowed)}.")


def is_positive_number(value: Any) -> bool:
    """A finite number > 0 (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def is_finite_number(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (not a bool, not text)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    """An integer of any integral type (Python's, numpy's), not a bool (numpy's bool is no integral type)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_python_number(config: Any, name: str) -> None:
    """Field ``name`` (a real number, already checked) as the Python int or float it equals. Numpy's scalars would
    reach JSON and YAML as themselves, which write neither: np.int64 is no int, and np.float64, a float subclass,
    passes every isinstance check and is still refused by yaml.safe_dump."""
    value = getattr(config, name)
    if value is not None and type(value) not in (int, float):
        setattr(config, name, int(value) if isinstance(value, numbers.Integral) else float(value))


def _number(
    config: Any,
    name: str,
    at_least: float | None = None,
    above: float | None = None,
    below: float | None = None,
    optional: bool = False,
    why: str = "",
) -> None:
    """ConfigError unless field ``name`` is a finite number in the bounds given (``at_least``: >=, ``above``: >,
    ``below``: <), or None when ``optional``. Written as "is it inside" so that NaN, for which every comparison is
    False, is outside. A number of another real type (numpy's) is kept as the Python int or float it equals."""
    value = getattr(config, name)
    if value is None and optional:
        return
    finite = is_finite_number(value)
    inside = finite and not (
        (at_least is not None and not value >= at_least)
        or (above is not None and not value > above)
        or (below is not None and not value < below)
    )
    if not inside:
        if below is not None and (at_least is not None or above is not None):
            low = f"[{at_least:g}" if at_least is not None else f"({above:g}"
            bounds = f"in {low}, {below:g})"
        else:
            given = ((">=", at_least), (">", above), ("<", below))
            bounds = " ".join(f"{op} {bound:g}" for op, bound in given if bound is not None)
        noun = "" if finite else "a finite number " if bounds else "a finite number"
        raise ConfigError(name, f"must be {noun}{bounds}{why}, got {value!r}.")
    _as_python_number(config, name)


def _count(config: Any, name: str, low: int, optional: bool = True) -> None:
    """ConfigError unless field ``name`` is an integer >= ``low`` (numpy's kept as the Python int), or None when
    ``optional``."""
    value = getattr(config, name)
    if value is None and optional:
        return
    if not is_integer(value) or value < low:
        raise ConfigError(name, f"must be an integer >= {low}, got {value!r}.")
    _as_python_number(config, name)


def _names(config: Any, name: str, optional: bool = False) -> None:
    """Field ``name`` as a list of module names (non-empty strings): a tuple is taken as a list, a set as its sorted
    list. A single string is refused (only target_modules reads a string, as a regex): a name is given as a
    one-element list."""
    value = getattr(config, name)
    if value is None and optional:
        return
    if isinstance(value, str):
        raise ConfigError(
            name, f"must be a list of module names, got the string {value!r}: for one name write [{value!r}]."
        )
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(n, str) and n for n in value):
        raise ConfigError(name, f"must be a list of module names (non-empty strings), got {value!r}.")
    if not isinstance(value, list):
        setattr(config, name, sorted(value) if isinstance(value, (set, frozenset)) else list(value))


def _default_of(cls: type, name: str) -> Any:
    spec = fields_of(cls)[name]
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


@dataclass
class DynaRankConfig:
    """What to adapt, and how: the fields every method shares.

    The low-rank update of a target ``W`` (d_out x d_in) is
    ``delta(x) = scaling * sum_g B_g (m_g * (A_g x))`` with ``scaling = lora_alpha / r``.
    ``DynaRankConfig(method=..., **fields)`` builds the method's own config class.
    """

    METHOD: ClassVar[str] = "dynarank-lora"  # the method this class configures
    method: str = _help(
        "Rank method: 'dynarank-lora' (fixed ranks), 'ard' (learned per-head ranks), 'elalora' (importance-scored "
        "prune and expand) or 'adalora-physical' (importance-scored pruning that frees memory).",
        "dynarank-lora",
    )
    target_modules: list[str] | str = _help(
        "Modules to adapt: a list of name suffixes, a regex (string) matched against the full name, or "
        "'all-linear' (every Linear except the task head).",
        default_factory=lambda: ["query", "value"],
    )
    r: int | None = _help(
        "Initial rank of every group (per head under granularity='head'); higher: more capacity. Unset: with a "
        "budget (target_params), the start the defaults study gave the method at that budget, resolved when the "
        "adapters are attached (dynarank.defaults.studied_start_rank: at b plain LoRA ranks ARD max(8, 2b), ElaLoRA "
        "b, AdaLoRA-style 1.5b, at least b + 1; docs/defaults.md); otherwise 8.",
        None,
    )
    lora_alpha: float | None = _help(
        "Output scale numerator; scaling = lora_alpha / r, fixed for the run. Default: r (scaling 1); "
        "adalora-physical: where alpha_at puts it.",
        None,
    )
    lora_dropout: float = _help("Dropout on the adapter input (0 disables it).", 0.0)
    granularity: Granularity = _help(
        "'head': one rank group per attention head in q/k/v/o projections; 'matrix': one per module.", "head"
    )
    head_layout: HeadLayout = _help(
        "'own': each head has its own A rows (a rank costs d_in + d_head); 'shared': the heads of a projection "
        "share A's rows and each keeps its own B columns (plain LoRA's cost at full use). Per head only "
        "(granularity='head').",
        "own",
    )
    num_heads: int | None = _help(
        "Attention heads (granularity='head' only); default model.config.num_attention_heads.", None
    )
    num_kv_heads: int | None = _help(
        "Key-value heads (GQA; granularity='head' only); default model.config.num_key_value_heads.", None
    )
    head_dim: int | None = _help(
        "Head size (granularity='head' only); default model.config.head_dim or hidden_size / num_heads.", None
    )
    modules_to_save: list[str] | None = _help(
        "Modules trained in full and saved with the adapter (a list of name suffixes, even of one: a string is "
        "refused, target_modules alone reads one, as a regex); default: the task head if there is one.",
        None,
    )
    exclude_modules: list[str] = _help(
        "Name suffixes never adapted (a list, even of one: a string is refused, target_modules alone reads one, as a "
        "regex).",
        default_factory=list,
    )
    seed: int | None = _help(
        "Seed of the adapter's draws: its starting factors and the SVD methods' P, Q and new ranks (None: the global "
        "torch RNG). Dropout masks come from the global torch RNG, as the model's own dropout does: seed it "
        "too (torch.manual_seed) for a repeatable run.",
        None,
    )

    def __new__(cls, method: str | None = None, **fields: Any):
        """``DynaRankConfig(method=...)`` builds the method's class; a knob that class lacks is a ConfigError."""
        if cls is DynaRankConfig:
            cls = config_class(method if method is not None else DynaRankConfig.METHOD)
        elif method is not None and method != cls.METHOD:
            raise ConfigError("method", f"{cls.__name__} configures {cls.METHOD!r}, not {method!r}.")
        _refuse_foreign(cls, fields)
        return object.__new__(cls)

    def __post_init__(self) -> None:
        if self.method is None:  # method=None is the default method (as leaving it out): __new__ chose the class
            self.method = type(self).METHOD
        self.validate()

    def validate(self) -> None:
        """Check every field, a ConfigError naming the field(s) otherwise: each on its own (:meth:`_check_fields`),
        then the knobs the rest of the config leaves without effect (:func:`inert_knobs`). What the checks accept is
        normalised in place: numpy's numbers to the Python int or float they equal, a tuple or set of names to a list.

        Construction runs it, and ``dynarank.attach`` runs it again: a field changed after construction is checked
        before anything uses it."""
        self._check_fields()
        _refuse_inert(type(self), inert_knobs(type(self), vars(self)))

    def _check_fields(self) -> None:
        """The shared fields' checks; a method's class adds its own (calling this first)."""
        if self.method != type(self).METHOD:
            raise ConfigError("method", f"{type(self).__name__} configures {type(self).METHOD!r}, not {self.method!r}.")
        _choice(self, "granularity", ("head", "matrix"))
        _choice(self, "head_layout", ("own", "shared"))
        # Unset with a budget: the budget's start, resolved against the model's targets (attach.start_rank); without
        # a budget there is nothing to take the start from.
        if self.r is None and getattr(self, "target_params", None) is None:
            self.r = DEFAULT_START_RANK
        if self.r is not None and (not is_integer(self.r) or self.r < 1):
            raise ConfigError("r", f"must be a positive integer (the initial rank per group), got {self.r!r}.")
        _as_python_number(self, "r")
        _number(self, "lora_dropout", at_least=0, below=1)
        _number(self, "lora_alpha", above=0, optional=True)
        for name in ("num_heads", "num_kv_heads", "head_dim"):
            _count(self, name, 1)
        self._check_targets()
        _names(self, "exclude_modules")
        _names(self, "modules_to_save", optional=True)
        seed = self.seed
        if seed is not None and (not is_integer(seed) or not -(2**63) <= seed < 2**63):
            raise ConfigError("seed", f"must be an integer (or None: the global torch RNG), got {seed!r}.")
        _as_python_number(self, "seed")

    def _check_targets(self) -> None:
        """target_modules: 'all-linear', a regex that compiles, or a non-empty list of names (a set: sorted)."""
        spec = self.target_modules
        if isinstance(spec, str):
            if not spec:
                raise ConfigError("target_modules", "is empty: give names, a regex, or 'all-linear'.")
            try:
                re.compile(spec)
            except re.error as exc:
                raise ConfigError(
                    "target_modules", f"{spec!r} is read as a regex (a string is), and it does not compile: {exc}."
                ) from None
            return
        if not isinstance(spec, (list, tuple, set, frozenset)) or not spec:
            raise ConfigError("target_modules", f"must be a non-empty list of names, got {spec!r}.")
        _names(self, "target_modules")

    @property
    def scaling(self) -> float:
        """Output scale of the update given ``lora_alpha`` (or its default r), fixed for the whole run (it never
        follows rank changes)."""
        return (self.lora_alpha if self.lora_alpha is not None else self.r) / self.r

    def output_scale(self, start_params: int, alpha_at: str | None = None) -> float:
        """The output scale the adapters train with, given their size at the start in parameters (A and B) and, for
        AdaLoRA-style, where an unset ``lora_alpha`` is when its config does not say (``alpha_at``)."""
        return self.scaling

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DynaRankConfig:
        """The config ``data`` gives, validated as the constructor validates it: a key the method has no field for,
        or a knob the rest of the config leaves without effect, is a ConfigError naming it; another method's field
        at its default there sets nothing, and is left out (``{**config.to_dict(), 'method': ...}`` switches
        method). On a method's own class (``ARDConfig.from_dict``) the method is that class's when ``data`` names
        none, and another method's dict is refused.

        A record (what :meth:`to_dict` wrote, in this version or an earlier one: every field of the shared base) is
        first read as the version that wrote it meant it, by the named rules of :func:`read_record`."""
        data = dict(data)
        unnamed = [key for key in data if not isinstance(key, str)]
        if unnamed:
            raise ConfigError(tuple(map(repr, unnamed)), "not a dynarank setting (a setting is named by a string).")
        if _is_record(data):
            data = read_record(data)
        method = data.get("method")
        target = config_class(method if method is not None else cls.METHOD)
        if not issubclass(target, cls):
            raise ConfigError("method", f"{cls.__name__} does not configure {method!r} ({target.__name__} does).")
        # Another method's config with its method changed ({**config.to_dict(), "method": ...}): its own fields at
        # their defaults set nothing, and are left out; one set to anything else is refused as a foreign knob.
        known = fields_of(target)
        data = {k: v for k, v in data.items() if k in known or not _unset_elsewhere(k, v)}
        return target(**data)


@dataclass
class FixedRankConfig(DynaRankConfig):
    """dynarank-lora: the engine at fixed per-group ranks."""

    METHOD: ClassVar[str] = "dynarank-lora"
    method: str = "dynarank-lora"


@dataclass
class RankControlConfig(DynaRankConfig):
    """What every rank-changing method shares."""

    rank_floor: int = _help("Smallest rank a group can end at; 0 lets a head switch off.", 0)
    resize_every: int | None = _help(
        "Optimizer steps between physical resizes (ElaLoRA's interval, AdaLoRA's deltaT; None: the active phase // "
        "20, at least 1: 20 to 39 rounds, a round every step when the phase is under 40 steps; adalora-physical: "
        "stock AdaLoRA's T // 40, at least 1).",
        None,
    )
    warmup_frac: float | None = _help(
        "Fraction of steps before ranks may change (ARD: alpha frozen, its task gradient is 0 at t=0; "
        "ElaLoRA/AdaLoRA: t_init). adalora-physical's default None: stock AdaLoRA's 10% (PEFT's tinit).",
        0.2,
    )
    final_frac: float | None = _help(
        "Fraction of steps at the end with ranks fixed, fine-tuning A and B (t_final). adalora-physical's default "
        "None: stock AdaLoRA's 20% (PEFT's tfinal).",
        0.15,
    )
    target_params: int | None = _help(
        "Budget in adapter parameters (A and B, what the export costs); see each method for how it is held.", None
    )

    def _check_fields(self) -> None:
        super()._check_fields()
        top = self.r if self.r is not None else float("inf")  # an unresolved start is checked once resolved
        if not is_integer(self.rank_floor) or not 0 <= self.rank_floor <= top:
            raise ConfigError("rank_floor", f"must be an integer in [0, r={self.r}], got {self.rank_floor!r}.")
        _as_python_number(self, "rank_floor")
        _count(self, "resize_every", 1)
        _count(self, "target_params", 1)
        given = [f for f in (self.warmup_frac, self.final_frac) if f is not None]  # None: the method's own phase
        if not all(is_finite_number(f) and 0 <= f < 1 for f in given) or not (sum(given) < 1):
            raise ConfigError(
                ("warmup_frac", "final_frac"),
                f"must be in [0, 1) and leave an active phase (their sum < 1), got {self.warmup_frac} and "
                f"{self.final_frac}.",
            )
        _as_python_number(self, "warmup_frac")
        _as_python_number(self, "final_frac")


@dataclass
class ARDConfig(RankControlConfig):
    """ARD-LoRA: a learnable alpha per group, rank = ceil(r0 * alpha); l1 + total variation shrink it.

    ``target_params``: the adapter's final size. A ceiling falls cubically from the start to this count over the
    active phase, a floor at it holds back the read-out's cuts that would go below it, and the l1 strength is
    steered so that the learned ranks follow (None: the l1 strength alone sets the size)."""

    METHOD: ClassVar[str] = "ard"
    method: str = "ard"
    head_layout: HeadLayout = _help(
        "'shared' (ARD's default, the layout the defaults study measured on real models): the heads of a projection "
        "share A's rows and each keeps its own B columns; 'own': each head has its own A rows (a rank costs d_in + "
        "d_head), for heads that read independent input directions (the planted-rank task). Per head only "
        "(granularity='head').",
        "shared",
    )
    preset: Preset = _help(
        "'default': settings calibrated to the run (warm-up, straight-through hard mask, relative lambda); "
        "'paper': the seed paper's literal values (lambda 0.01, beta 0.1, lr 1e-4 / 5e-5, soft mask, round).",
        "default",
    )
    ard_lambda: float | None = _help(
        "l1 strength (larger: smaller ranks). lambda_mode='relative': in units of the loss improvement of warm-up "
        "per slot, priced by each group's parameter cost (default 1.0); 'gradient': in units of the median task "
        "gradient on alpha at the end of warm-up; 'absolute': the raw coefficient of sum |alpha| (paper: 0.01).",
        None,
    )
    lambda_mode: LambdaMode = _help("How ard_lambda is read: 'relative', 'gradient' or 'absolute'.", "relative")
    ard_beta: float | None = _help(
        "Strength of the total-variation (rank stability) term, in the units of ard_lambda but independent of it "
        "(ard_lambda=0 leaves TV acting alone): beta_g = ard_beta * p_g, lambda_g = ard_lambda * p_g, with p_g "
        "the price lambda_mode gives a group. Default: a tenth of the mode's default lambda (relative: 0.1; "
        "absolute: 0.001, the paper's lambda * beta).",
        None,
    )
    tv_form: TVForm = _help(
        "'step': the paper's ||alpha(t) - alpha(t-1)||^2 (alpha(t-1): the value before the previous update); "
        "'anchor': ||alpha(t) - alpha(last resize)||^2 (docs/ard.md measures both).",
        "step",
    )
    lr_alpha: float | None = _help(
        "Learning rate of the alphas (None: alpha_travel / active steps, so a head can cross its range).", None
    )
    alpha_travel: float = _help("How far (in alpha) a head can move over the active phase when lr_alpha=None.", 2.0)
    readout: Readout = _help("Rank read from alpha: 'ceil' (unbiased with the hard mask) or 'round'.", "ceil")
    mask: MaskKind = _help(
        "'hard': 0/1 mask in the forward pass with the clamp's gradient (straight-through); 'soft': the clamp mask "
        "itself (biased: B grows to compensate partly-on slots).",
        "hard",
    )
    cap_order: CapOrder = _help(
        "With target_params: which ranks the falling budget cap cuts first. 'margin': the tail rank whose alpha is "
        "nearest its switch-off point; 'margin-per-parameter': that margin over the parameters the cut frees (a "
        "shared slot's last user frees its A row too, so whole slots go before co-users at equal margins).",
        "margin",
    )
    rank_init: RankInit = _help(
        "Starting ranks: 'uniform' (every group at r), 'data' (a pass over init_batches batches before training "
        "measures each group, gives the groups whose statistics promise most per parameter their ranks until the "
        "adapter holds init_rho x target_params, and points A at the measured directions; without target_params "
        "every group keeps rank r (or the directions measured, if fewer) and only A is pointed, the alphas then "
        "deciding the size) or "
        "'auto' (default: 'data' with a target_params, 'uniform' without one; a controller built by hand without "
        "dynarank.init_ranks starts uniform, with a warning).",
        "auto",
    )
    init_rho: float = _help(
        "rank_init='data': the adapter starts at init_rho x target_params (higher: more room to learn the "
        "allocation, more memory early on).",
        1.5,
    )
    init_batches: int | None = _help(
        "rank_init='data': batches of training data the statistics are measured on (unset: total_steps // 20, "
        "between 1 and 4: a measured batch costs about one training step, so the pass stays near 5% of the run).",
        None,
    )
    init_statistic: InitStatistic = _help(
        "rank_init='data': 'gradient-relative' (the loss gradient at each group's outputs against its inputs, its "
        "gains normalised per module: modules compete by how concentrated their gradient is, not by its scale), "
        "'gradient' (the same, not normalised) or 'activation' (each group's outputs against its inputs, normalised "
        "per module).",
        "gradient-relative",
    )
    init_margin: InitMargin = _help(
        "rank_init='data': where each group's alpha starts inside its rank's interval (r0 * alpha in (r - 1, r]). "
        "'gains': ordered by the measured gain per parameter of the group's last rank, from r - 1/4 (the weakest) "
        "to r (the strongest), so that the budget's first cuts take the ranks the data rated lowest; 'equal': every "
        "group at r (alpha = r / r0), the cuts' order then left to the alphas' first updates.",
        "equal",
    )
    init_scale: InitScale = _help(
        "rank_init='data': the size of the A rows written along the measured directions. 'input' (default): what a "
        "default-drawn row reads from the measured inputs (rms of A x), so that B's "
        "steps move the output as far as from a random A (a measured direction often lines up with the few input "
        "channels that carry most of the activation, and at equal norm reads up to ~20x more); 'norm': the norm of "
        "PEFT's default draw (the default before 5 Dec); 'input-gains': as 'input', "
        "and each candidate's gain multiplied by its row's factor before the allocation (what the rescaled row can "
        "move the loss by).",
        "input",
    )

    def _check_fields(self) -> None:
        super()._check_fields()
        for name, allowed in (
            ("preset", ("default", "paper")),
            ("lambda_mode", ("relative", "gradient", "absolute")),
            ("tv_form", ("step", "anchor")),
            ("readout", ("ceil", "round")),
            ("mask", ("hard", "soft")),
            ("rank_init", ("auto", "uniform", "data")),
            ("init_statistic", ("gradient", "gradient-relative", "activation")),
            ("init_margin", ("gains", "equal")),
            ("init_scale", ("norm", "input", "input-gains")),
            ("cap_order", ("margin", "margin-per-parameter")),
        ):
            _choice(self, name, allowed)
        _count(self, "init_batches", 1)
        _number(self, "init_rho", above=1, why=" (the start is init_rho x the budget)")
        for name in ("ard_lambda", "lr_alpha", "ard_beta"):
            _number(self, name, at_least=0, optional=True)
        _number(self, "alpha_travel", above=0)

    @property
    def data_start(self) -> bool:
        """Whether the run starts from measured ranks (:func:`starts_from_data`)."""
        return starts_from_data(vars(self))


@dataclass
class SVDConfig(RankControlConfig):
    """What ElaLoRA and AdaLoRA share: the update P diag(E) Q, ranks scored by importance, one group per matrix
    by default (as both papers)."""

    METHOD: ClassVar[str] = ""  # abstract: ElaLoRAConfig or AdaLoRAConfig
    granularity: Granularity = _help(
        "'matrix' (the papers' unit): one rank group per module; 'head': one per attention head in q/k/v/o.",
        "matrix",
    )
    target_rank: float | None = _help(
        "Final average rank per group (AdaLoRA's target_r): the total rank budget falls cubically from r x groups "
        "to round(target_rank x groups).",
        None,
    )
    t_init_steps: int | None = _help("Exact t_init in optimizer steps, in place of warmup_frac (give one).", None)
    t_final_steps: int | None = _help("Exact t_final in optimizer steps, in place of final_frac (give one).", None)
    ortho_weight: float | None = _help(
        "Weight of the orthogonality penalty, the mean over groups of ||A A^T - I||_F and ||B^T B - I||_F; its "
        "gradient is added once per optimizer step (0 disables it). None: the weight the defaults study chose for "
        "the method and the model's kind of task (dynarank.defaults.DEFAULT_ORTHO_WEIGHT; docs/defaults.md).",
        None,
    )
    values_lr_ratio: float | None = _help(
        "The singular values E's learning rate as a multiple of the adapters' (one scalar per rank scales that "
        "rank's whole update, where the factors move element by element). None: the ratio the defaults study chose "
        "for the method and the model's kind of task (dynarank.defaults.DEFAULT_VALUES_LR_RATIO; docs/defaults.md). "
        "Applies to optimizers dynarank builds (controller.build_optimizer / param_groups, the CLI, "
        "DynaRankTrainer); an optimizer built elsewhere trains E at its group's rate.",
        None,
    )
    svd_init: SVDInit | None = _help(
        "How a fresh adapter starts. 'adalora' (the papers): P and Q drawn from N(0, 0.02), E = 0, so at first only E "
        "learns; 'lora': the factors as plain LoRA draws them (A kaiming-uniform, B = 0) and E = 1, so the first steps "
        "are plain LoRA's. Both start from the base model's function. None: the start the defaults study chose for "
        "the method and the model's kind of task (dynarank.defaults.DEFAULT_SVD_INIT; docs/defaults.md).",
        None,
    )
    importance_beta1: float = _help("EMA factor of the sensitivity I = |w * dL/dw| (AdaLoRA/ElaLoRA: 0.85).", 0.85)
    importance_beta2: float = _help("EMA factor of the uncertainty |I - Ibar| (AdaLoRA/ElaLoRA: 0.85).", 0.85)
    reset_optimizer_on_resize: bool = _help(
        "Reset every optimizer moment after a round that changed ranks, as the ElaLoRA authors' code does (it "
        "rebuilds its optimizer); default False carries the moments of every kept rank.",
        False,
    )

    def _check_fields(self) -> None:
        super()._check_fields()
        _count(self, "t_init_steps", 0)
        _count(self, "t_final_steps", 0)
        for name in ("importance_beta1", "importance_beta2"):
            _number(self, name, above=0, below=1)
        if self.svd_init is not None:
            _choice(self, "svd_init", ("adalora", "lora"))
        _number(self, "ortho_weight", at_least=0, optional=True)
        _number(self, "values_lr_ratio", above=0, optional=True)
        if not isinstance(self.reset_optimizer_on_resize, bool):
            raise ConfigError(
                "reset_optimizer_on_resize", f"must be True or False, got {self.reset_optimizer_on_resize!r}."
            )
        if self.target_rank is not None and self.target_params is not None:
            raise ConfigError(
                ("target_rank", "target_params"), "give the budget either in ranks or in parameters, not both."
            )
        both = schedule_given_twice(type(self), vars(self))
        if both:
            raise ConfigError(
                tuple(name for pair in both for name in pair),
                "; ".join(
                    f"{fraction}={getattr(self, fraction)} and {steps}={getattr(self, steps)} both give "
                    f"{steps.removesuffix('_steps')}, as a fraction of the run and in steps (the steps would override "
                    "the fraction)"
                    for fraction, steps in both
                )
                + ": give one.",
            )
        if self.target_rank is None:
            return
        value = self.target_rank
        if not is_finite_number(value) or not 0 < value < self.r:
            conserving = " ElaLoRA without target_rank conserves the total rank." if self.METHOD == "elalora" else ""
            raise ConfigError(
                "target_rank",
                f"must be a number in (0, r={self.r}) (the budget falls from the initial rank to it), got {value!r}."
                + conserving,
            )
        if value < self.rank_floor:
            raise ConfigError(("target_rank", "rank_floor"), f"{value} is below the floor {self.rank_floor}.")
        _as_python_number(self, "target_rank")


@dataclass
class ElaLoRAConfig(SVDConfig):
    """ElaLoRA: each round prunes the lowest-scoring ranks and grows the groups whose weakest ranks score highest.

    Without a budget the total rank is conserved; ``target_params`` at or above the initial size is a ceiling
    that expansions never exceed; a budget below the start (``target_rank`` below r, or ``target_params`` below
    the initial size) is reached on AdaLoRA's cubic schedule while the method goes on reallocating."""

    METHOD: ClassVar[str] = "elalora"
    method: str = "elalora"
    k_candidates: int = _help(
        "Lowest-scoring ranks every group offers to a round's swaps (capped at rank - 1; with b_changes > 0).", 2
    )
    b_changes: int = _help("Ranks pruned and added in the first round (b0); later rounds use round(b0 (1 - p^3)).", 4)
    switch_off: bool = _help(
        "A group may offer its last rank too, so a head or matrix can be switched off and its parameters go to the "
        "others (with rank_floor 0: a floor of 1 or more keeps the last rank anyway). Default False keeps one rank in "
        "every group, as the authors' code does.",
        False,
    )

    def _check_fields(self) -> None:
        super()._check_fields()
        _count(self, "k_candidates", 1, optional=False)
        _count(self, "b_changes", 0, optional=False)
        if not isinstance(self.switch_off, bool):
            raise ConfigError("switch_off", f"must be True or False, got {self.switch_off!r}.")


ADALORA_TARGET_FRACTION = 2 / 3  # AdaLoRA's target_rank=None: PEFT AdaLoRA's default init_r 12 -> target_r 8


def stock_adalora_start_rank(target: int) -> int:
    """Stock AdaLoRA's initial rank for a target rank, as dynarank's loop and study set it: 1.5x, at least one more
    (1 -> 2, 4 -> 6, 12 -> 18)."""
    return max(target + 1, round(1.5 * target))


@dataclass
class AdaLoRAConfig(SVDConfig):
    """AdaLoRA-style pruning: the lowest-scoring ranks are removed physically until a budget that falls cubically
    holds (``target_rank``, default 2/3 of r as PEFT's 12 -> 8; or ``target_params``).

    Unset, the phases and the output scale are stock AdaLoRA's as dynarank's study ran it (docs/defaults.md): 10% of
    the run before the first pruning, 20% at the end with ranks fixed, a round every T / 40 steps
    (schedules.stock_adalora_phases), and ``lora_alpha`` at the final size, so that the update's scale is the
    fraction of its start that it ends at."""

    METHOD: ClassVar[str] = "adalora-physical"
    method: str = "adalora-physical"
    warmup_frac: float | None = _help(
        "Fraction of steps before ranks may change (t_init). None: stock AdaLoRA's, PEFT's tinit = 10% of the run.",
        None,
    )
    final_frac: float | None = _help(
        "Fraction of steps at the end with ranks fixed, fine-tuning A and B (t_final). None: stock AdaLoRA's, "
        "PEFT's tfinal = 20% of the run.",
        None,
    )

    alpha_at: AlphaAt | None = _help(
        "Where an unset lora_alpha is: 'target', the size the adapter ends at, so that the update's scale is the "
        "fraction of its start it keeps (stock AdaLoRA's lora_alpha = target_r over init_r, 8 / 12 in PEFT's "
        "defaults); 'start', the start rank (scale 1, plain LoRA's). None: the defaults study's choice for the "
        "model's kind of task (dynarank.defaults.DEFAULT_ALPHA_AT; docs/defaults.md). Acts on nothing when "
        "lora_alpha is given.",
        None,
    )

    def _check_fields(self) -> None:
        super()._check_fields()
        if self.alpha_at is not None:
            _choice(self, "alpha_at", ("target", "start"))

    def output_scale(self, start_params: int, alpha_at: str | None = None) -> float:
        """``lora_alpha / r`` when given; else, with ``alpha_at`` (the config's, else the argument) 'start', 1;
        'target' (or unset), the final size over the start: ``target_params / start_params``, or ``target_rank / r``
        (its default 2/3)."""
        if self.lora_alpha is not None:
            return self.scaling
        if (self.alpha_at or alpha_at) == "start":
            return 1.0
        if self.target_params is not None:
            return self.target_params / start_params
        target_rank = self.target_rank if self.target_rank is not None else ADALORA_TARGET_FRACTION * self.r
        return target_rank / self.r


CONFIG_CLASSES: dict[str, type[DynaRankConfig]] = {
    c.METHOD: c for c in (FixedRankConfig, ARDConfig, ElaLoRAConfig, AdaLoRAConfig)
}
METHODS: tuple[str, ...] = tuple(CONFIG_CLASSES)


def config_class(method: str) -> type[DynaRankConfig]:
    """The config class of ``method`` (ConfigError naming the methods otherwise)."""
    if not isinstance(method, str):
        raise ConfigError("method", f"must be a method name, one of {', '.join(METHODS)}; got {method!r}.")
    if method in LEGACY_METHODS:
        raise ConfigError(
            "method",
            f"{method!r} is a stock PEFT baseline's name; dynarank's own method is {LEGACY_METHODS[method]!r}.",
        )
    if method not in CONFIG_CLASSES:
        raise ConfigError("method", f"{method!r} is not known; choose one of {', '.join(METHODS)}.")
    return CONFIG_CLASSES[method]


def fields_of(cls: type[DynaRankConfig]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unset_elsewhere(name: str, value: Any) -> bool:
    """Whether ``value`` is field ``name``'s default in every method whose config has it (False: no method has it)."""
    owners = [CONFIG_CLASSES[m] for m in methods_using(name)]
    return bool(owners) and all(_same_value(value, _default_of(c, name)) for c in owners)


def _same_value(a: Any, b: Any) -> bool:
    """``a == b`` of the same type (True is not 1, 1.0 is not 1): a default is only the default itself."""
    return type(a) is type(b) and a == b


def methods_using(name: str) -> list[str]:
    """The methods whose config has field ``name``."""
    return [m for m, c in CONFIG_CLASSES.items() if name in fields_of(c)]


def _refuse_foreign(cls: type[DynaRankConfig], given: dict[str, Any]) -> None:
    """ConfigError naming every field in ``given`` that ``cls`` does not have (and who uses it)."""
    known = fields_of(cls)
    foreign = [name for name in given if name not in known]
    if not foreign:
        return
    users = {name: methods_using(name) for name in foreign}
    detail = "; ".join(
        f"{name} is a knob of {', '.join(repr(m) for m in who)}" if who else f"{name} is not a dynarank setting"
        for name, who in users.items()
    )
    raise ConfigError(tuple(foreign), f"not used by method {cls.METHOD!r} ({detail}).")


# What ARD's preset='paper' sets: its fields, and the run's learning rate (lr, not a config field)
ARD_PAPER_PRESET = {
    "ard_lambda": 0.01,
    "lambda_mode": "absolute",
    # The paper's objective L_task + lambda * (sum |alpha| + beta * sum TV) with lambda 0.01, beta 0.1: the TV
    # term's own strength (ard_beta is not multiplied by ard_lambda) is lambda * beta.
    "ard_beta": 0.01 * 0.1,
    "lr_alpha": 5e-5,
    "lr": 1e-4,
    "mask": "soft",
    "readout": "round",
    "rank_floor": 1,
    "warmup_frac": 0.0,
    "final_frac": 0.0,
    "tv_form": "step",
}
PAPER_PRESET_FIELDS = tuple(name for name in ARD_PAPER_PRESET if name != "lr")
DATA_START_KNOBS = ("init_rho", "init_batches", "init_statistic", "init_margin", "init_scale")


def starts_from_data(values: Mapping[str, Any]) -> bool:
    """Whether an ARD config's fields (``values``) start the run from measured ranks: 'data', or 'auto' with a budget
    (the paper preset keeps the paper's uniform start)."""
    if values["rank_init"] == "auto":
        return values["target_params"] is not None and values["preset"] != "paper"
    return values["rank_init"] == "data"


def inert_ard_knobs(cls: type[DynaRankConfig], values: Mapping[str, Any]) -> dict[str, str]:
    """The ARD knobs that ``values`` (an ARD config's fields) sets away from their defaults while its other fields
    make them act on nothing, each with why.

    The data-driven start's knobs are inert where the start is uniform whatever happens: ``rank_init='uniform'``,
    and ``'auto'`` without a budget or under ``preset='paper'`` (``DynaRankConfig.data_start``). Under ``'auto'``
    with a budget they stay the user's to set (the start is measured once ``dynarank.init_ranks`` runs, as the CLI
    and the Trainer integration do). ``init_rho`` and ``cap_order`` need a budget under every start."""
    why: dict[str, str] = {}
    uniform = {
        "uniform": "rank_init='uniform' starts every group at r",
        "auto": "rank_init='auto' starts every group at r "
        + ("under preset='paper'" if values["preset"] == "paper" else "without a budget (target_params)"),
    }
    if not starts_from_data(values):
        for name in DATA_START_KNOBS:
            why[name] = f"{name} is a knob of the data-driven start, and {uniform[values['rank_init']]}"
    if values["target_params"] is None:
        why.setdefault("init_rho", "the data-driven start holds init_rho x target_params, and target_params is unset")
        why["cap_order"] = "cap_order orders the budget cap's cuts, and there is no budget (target_params)"
    if values["preset"] == "paper":
        why["alpha_travel"] = "alpha_travel sets lr_alpha when lr_alpha is unset, and preset='paper' sets it"
        for name in PAPER_PRESET_FIELDS:
            why[name] = f"preset='paper' sets {name} (to the paper's value)"
    elif values["lr_alpha"] is not None:
        why["alpha_travel"] = "alpha_travel sets lr_alpha when lr_alpha is unset, and lr_alpha is given"
    return {name: reason for name, reason in why.items() if values[name] != _default_of(cls, name)}


HEAD_KNOBS = ("head_layout", "num_heads", "num_kv_heads", "head_dim")  # what lays out or counts per-head groups
# The two forms of each phase of the SVD methods' schedule: (a fraction of the run, exact steps that override it).
SCHEDULE_FORMS = (("warmup_frac", "t_init_steps"), ("final_frac", "t_final_steps"))


def inert_knobs(cls: type[DynaRankConfig], values: Mapping[str, Any]) -> dict[str, str]:
    """The knobs that ``values`` (the fields of a ``cls`` config) sets away from their defaults while its other
    fields make them act on nothing, each with why (a config refuses them; a record of an earlier version is read
    without them, :func:`read_record`).

    Every method: the per-head knobs under granularity='matrix', one rank group per module (attach neither lays out
    nor counts heads). AdaLoRA-style: alpha_at with lora_alpha given. ElaLoRA: switch_off with a rank_floor of 1 or
    more (the floor keeps each group's last rank anyway) and k_candidates with b_changes=0 (no round swaps a rank, so
    none is offered). ARD: :func:`inert_ard_knobs`."""
    why: dict[str, str] = {}
    if values["granularity"] == "matrix":
        for name in HEAD_KNOBS:
            why[name] = f"{name} shapes per-head rank groups, and granularity='matrix' makes one group per module"
    if issubclass(cls, ElaLoRAConfig):
        floor = values["rank_floor"]
        if is_integer(floor) and floor >= 1:
            why["switch_off"] = (
                f"switch_off lets a group give up its last rank, and rank_floor={floor} keeps {floor} in every group"
            )
        if values["b_changes"] == 0:
            why["k_candidates"] = (
                "k_candidates is how many ranks a group offers to a round's swaps, and b_changes=0 makes no swap"
            )
    if issubclass(cls, AdaLoRAConfig) and values["lora_alpha"] is not None:
        why["alpha_at"] = "alpha_at says where an unset lora_alpha is, and lora_alpha is given"
    why = {name: reason for name, reason in why.items() if values[name] != _default_of(cls, name)}
    if issubclass(cls, ARDConfig):
        why.update(inert_ard_knobs(cls, values))
    return why


def schedule_given_twice(cls: type[DynaRankConfig], values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The phases of an SVD method's schedule that ``values`` gives in both forms (SCHEDULE_FORMS): the steps set and
    the fraction away from its default, which the steps would override."""
    if not issubclass(cls, SVDConfig):
        return []
    return [
        (fraction, steps)
        for fraction, steps in SCHEDULE_FORMS
        if values[steps] is not None and values[fraction] != _default_of(cls, fraction)
    ]


def _refuse_inert(cls: type[DynaRankConfig], inert: dict[str, str]) -> None:
    """ConfigError naming every knob in ``inert`` (name -> why it acts on nothing), as a foreign knob is refused."""
    if inert:
        detail = "; ".join(inert.values())
        them = "it" if len(inert) == 1 else "them"
        raise ConfigError(tuple(inert), f"not used by method {cls.METHOD!r} with this config ({detail}): unset {them}.")


# ---------------------------------------------------------------------------- records of earlier versions
# Version 0.1's config: one flat dataclass whose to_dict recorded every field for every method (switch_off, its last
# field, is missing from its earlier records).
FLAT_FIELDS_0_1 = (
    "method", "target_modules", "r", "lora_alpha", "lora_dropout", "granularity", "head_layout", "num_heads",
    "num_kv_heads", "head_dim", "modules_to_save", "exclude_modules", "seed", "rank_floor", "resize_every", "preset",
    "ard_lambda", "lambda_mode", "ard_beta", "tv_form", "lr_alpha", "alpha_travel", "warmup_frac", "final_frac",
    "readout", "mask", "target_rank", "target_params", "t_init_steps", "t_final_steps", "k_candidates", "b_changes",
    "ortho_weight", "importance_beta1", "importance_beta2", "switch_off", "reset_optimizer_on_resize",
)  # fmt: skip
# Fields a version recorded and this one no longer has, each with the value at which it did what this version does:
# a record holding that value loads without it; another value is refused (this version cannot do what it did).
RETIRED_FIELDS: dict[str, Any] = {
    "init_uniform": 0.0,  # ARD's data start: a share of the budget spread as plain LoRA's first (0: none); removed
}


def _is_record(data: Mapping[str, Any]) -> bool:
    """Whether ``data`` is what a :meth:`DynaRankConfig.to_dict` wrote: it holds every field of the shared base, as
    every version since 0.1 has written them (a dict written by hand names only what it sets)."""
    return all(spec.name in data for spec in dataclasses.fields(DynaRankConfig))


def read_record(data: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded config (``to_dict`` of this version or an earlier one) as this version reads it, by these rules
    alone; whatever they leave is validated as the constructor validates it:

    * a method name of before 0.2 is its method's name now (LEGACY_METHODS), and None the default method;
    * a record of version 0.1's flat config (only FLAT_FIELDS_0_1, k_candidates among them) keeps only the fields of
      its method's class: it recorded every field for every method;
    * a retired field (RETIRED_FIELDS) at the value that did what this version does is dropped;
    * a knob recorded before such knobs were refused, which acted on nothing (:func:`inert_knobs`; or the fraction
      of a phase also given in steps, which overrode it: :func:`schedule_given_twice`), is dropped (its default is
      read), with a warning that names it."""
    data = dict(data)
    method = data.get("method")
    if method is None:  # recorded as None before method=None was read as the default method (which it was)
        method = DynaRankConfig.METHOD
    if isinstance(method, str):
        data["method"] = method = LEGACY_METHODS.get(method, method)
    target = config_class(method)
    if "k_candidates" in data and set(data) <= set(FLAT_FIELDS_0_1):
        data = {name: value for name, value in data.items() if name in fields_of(target)}
    for name, value in RETIRED_FIELDS.items():
        if name in data and name not in fields_of(target):
            if data[name] != value:
                raise ConfigError(
                    name,
                    f"{data[name]!r} was recorded by an earlier version; the field is retired, and this version only "
                    f"reads it at {value!r} (what it does now).",
                )
            del data[name]
    values = {**{name: _default_of(target, name) for name in fields_of(target)}, **data}
    why = inert_knobs(target, values)
    why.update({fraction: f"{steps} overrode {fraction}" for fraction, steps in schedule_given_twice(target, values)})
    if why:
        logger.warning(
            "dynarank: the recorded %s config sets %s, which acted on nothing (%s): read at %s.",
            target.METHOD,
            ", ".join(f"{name}={data[name]!r}" for name in why),
            "; ".join(why.values()),
            "its default" if len(why) == 1 else "their defaults",
        )
        for name in why:
            del data[name]
    return data
