"""The learning rate each method trains with when the user gives none: one table per kind of task, read by the
library (``controller.build_optimizer()``), the training loop and the CLI (``--lr`` unset) and the benchmarks alike.

Why per kind of task: the rate grids of the defaults study differ between the two kinds, not within one
(benchmarks/results/defaults.md). On the classifiers (MiniLM on two tweet data sets and the topics) ARD ships 3e-3;
on the causal LM (SmolLM2 on dialog pairs, loss on the responses) 3e-3 is 0.90 of the best score and 1e-2 the best,
and ElaLoRA at the classifiers' rate trails a tuned LoRA by 0.18 in test loss.

How the values were chosen (benchmarks/defaults.py): a learning-rate grid per method and data set at the middle
budget, each rate scored relative to that data set's best; the rate best on average over the data sets of the kind
is shipped, unless it failed (diverged, or ended far below the best) in a run at any budget of those data sets, and
each data set is checked with the rate chosen without it. tests/test_defaults.py holds this table
equal to the study's record.

Why per budget too, where the study measured it: the rate that trains best moves with the adapter's size. ARD on the
classifiers held to plain LoRA r=1's budget trains best at 1e-2 on all three data sets, where r=2's budget takes 3e-3;
at r=4 1e-2 diverges on all three, so 3e-3 again, and at r=6 on the binary tweets too; ElaLoRA and AdaLoRA-style
take 3e-2 at r = 1 and 2 and 1e-2 at r=4 (BUDGET_LR; a run's budget,
:func:`budget_of`, is its size as plain LoRA's rank on its targets: a fixed rank's r, a rank controller's target).
Every run records the rate it used and where it came from.

The names are the run vocabulary: dynarank's methods and the stock baselines (``lora``, ``dora``, ``adalora``,
``full``) that the application trains beside them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from .config import is_finite_number, stock_adalora_start_rank

TASKS = ("classify", "causal-lm")  # the CLI's --task values
DEFAULT_LR: dict[str, dict[str, float]] = {
    # sequence classification (encoders with a task head)
    "classify": {
        "dynarank-lora": 3e-3,  # plain LoRA in dynarank's layer: LoRA's rate
        "ard": 3e-3,
        "elalora": 3e-2,  # without the orthogonality penalty (DEFAULT_ORTHO_WEIGHT), E at the factors' rate
        "adalora-physical": 1e-2,  # likewise
        # stock baselines (a user's untuned `--method lora`; the benchmarks tune them per data set). LoRA and DoRA
        # score best at 1e-2 on some middle-budget grids, but 1e-2 diverged at r=6 (tweets-3, tweets-2): it cannot ship
        "lora": 3e-3,
        "dora": 3e-3,
        "adalora": 3e-2,
        "eva": 3e-3,  # stock LoRA with EVA's data-driven init: LoRA's rate
        "full": 3e-4,
    },
    # causal language models (instruction tuning, loss on the responses)
    "causal-lm": {
        "dynarank-lora": 1e-2,
        "ard": 1e-2,
        "elalora": 1e-2,  # no orthogonality penalty, started as plain LoRA (DEFAULT_SVD_INIT), E at the factors' rate
        "adalora-physical": 1e-2,  # likewise, and at plain LoRA's scale (DEFAULT_ALPHA_AT)
        "lora": 1e-2,
        "dora": 1e-2,
        "adalora": 3e-2,
        "eva": 1e-2,
        "full": 1e-4,
    },
}
# The budget DEFAULT_LR was chosen at, per kind: the adapter size of plain LoRA at this rank on the same targets
# (the study's middle budget).
MIDDLE_BUDGET: dict[str, float] = {"classify": 2, "causal-lm": 4}
# Rates chosen at other budgets (plain LoRA ranks -> rate), where the study ran a rate grid at that budget on every
# data set of the kind (benchmarks/defaults.py, "Rates at other budgets"). A run with a budget takes the rate of the
# studied budget nearest to its own on a log scale (DEFAULT_LR's at the middle one); a run without one, DEFAULT_LR's.
BUDGET_LR: dict[str, dict[str, dict[float, float]]] = {
    # r=1 and r=4 on the classifiers: a grid on all three data sets (tweets-2, tweets-3, topics) for every entry, of
    # the shipped configuration (the SVD methods' without the penalty; at r=4 ARD's 1e-2 diverges on all three, and
    # AdaLoRA-style's 3e-2 on the binary tweets)
    "classify": {
        "ard": {1: 1e-2, 4: 3e-3},
        "elalora": {1: 3e-2, 4: 1e-2},
        "adalora-physical": {1: 3e-2, 4: 1e-2},
        "lora": {1: 1e-2, 4: 3e-3},
        "dynarank-lora": {1: 1e-2, 4: 3e-3},  # LoRA's rate, as in DEFAULT_LR
        "eva": {1: 1e-2, 4: 3e-3},
    },
    # r=1 on the causal LMs: a grid on both data sets (dialogs, sentiment LM); the middle budget's rates again
    "causal-lm": {"ard": {1: 1e-2}, "lora": {1: 1e-2}, "dynarank-lora": {1: 1e-2}, "eva": {1: 1e-2}},
}
# The SVD methods' orthogonality penalty weight when the config gives none (``ortho_weight=None``), per kind of task:
# the configuration the defaults study chose for each (benchmarks/defaults.py, CONFIGURATIONS: the papers' 0.1, or
# no penalty; the penalty's gradient costs time every step, so it ships only where it wins its vote by more than the
# vote's standard error), pinned to its record by tests/test_defaults.py.
DEFAULT_ORTHO_WEIGHT: dict[str, dict[str, float]] = {
    "classify": {"elalora": 0.0, "adalora-physical": 0.0},
    "causal-lm": {"elalora": 0.0, "adalora-physical": 0.0},
}
# How many times the adapters' learning rate the SVD methods' singular values E train with when the config gives no
# ratio (``values_lr_ratio=None``), per kind of task: the configuration the defaults study chose for each
# (benchmarks/defaults.py), pinned to its record by tests/test_defaults.py.
DEFAULT_VALUES_LR_RATIO: dict[str, dict[str, float]] = {
    "classify": {"elalora": 1.0, "adalora-physical": 1.0},  # 30x ran on the classifiers too, and lost the vote
    "causal-lm": {"elalora": 1.0, "adalora-physical": 1.0},  # ElaLoRA's 30x lost to its LoRA start (E = 1)
}
# How a fresh SVD adapter starts when the config does not say (``svd_init=None``), per kind of task: 'adalora' (P, Q
# ~ N(0, 0.02), E = 0: the papers') or 'lora' (plain LoRA's draw and E = 1); the configuration the defaults study
# chose for each (benchmarks/defaults.py), pinned to its record by tests/test_defaults.py.
DEFAULT_SVD_INIT: dict[str, dict[str, str]] = {
    "classify": {"elalora": "adalora", "adalora-physical": "adalora"},
    "causal-lm": {"elalora": "lora", "adalora-physical": "lora"},
}
# Where AdaLoRA-style's lora_alpha is when the config gives neither it nor ``alpha_at``, per kind of task: 'target',
# the size it ends at (stock AdaLoRA's lora_alpha = target_r: the update at the fraction of its start that it keeps),
# or 'start', its start rank (scale 1, plain LoRA's); the configuration the defaults study chose for each
# (benchmarks/defaults.py), pinned to its record by tests/test_defaults.py.
DEFAULT_ALPHA_AT: dict[str, dict[str, str]] = {
    "classify": {"adalora-physical": "target"},
    "causal-lm": {"adalora-physical": "start"},
}
# Methods whose budget is their rank r itself (fixed ranks; stock AdaLoRA prunes to r on average).
RANK_BUDGET_METHODS = ("dynarank-lora", "lora", "dora", "eva", "adalora")
SOURCE = "dynarank.defaults (docs/defaults.md)"


def source(task: str, budget: float | None = None, method: str | None = None) -> str:
    """What a run records as the origin of a default rate (``lr_source``): the table, and the studied budget the
    rate was chosen at when it is not the middle one."""
    studied = None if budget is None or method is None else studied_budget(method, task, budget)
    if studied is None or studied == MIDDLE_BUDGET[task]:
        return f"{SOURCE}, {task}"
    return f"{SOURCE}, {task}, chosen at plain LoRA r={studied:g}'s budget (this run's: r={budget:.3g})"


def nearest_budget(studied: Iterable[float], middle: float, budget: float) -> float:
    """Of the ``studied`` budgets (``middle`` among them), the one nearest ``budget`` on a log scale (a tie goes to
    the middle one): whose rate a run with ``budget`` takes. benchmarks/defaults.py applies the same rule."""
    return min(sorted(studied), key=lambda b: (abs(math.log(b / budget)), b != middle))


def studied_budget(method: str, task: str, budget: float) -> float:
    """The budget (plain LoRA ranks) whose rate a run of ``method`` with ``budget`` takes (:func:`nearest_budget`
    among the middle one and BUDGET_LR's)."""
    middle = MIDDLE_BUDGET[task]
    return nearest_budget({middle, *BUDGET_LR.get(task, {}).get(method, {})}, middle, budget)


class UnknownDefault(KeyError, ValueError):
    """A method or task that a table of defaults has no entry for: a ValueError naming the argument and the choices
    (and a KeyError, as it was before it was a ValueError)."""

    def __str__(self) -> str:
        return str(self.args[0])  # the message as written (KeyError's own str quotes it)


def _entry(table: Mapping[str, Mapping[str, Any]], what: str, method: Any, task: Any) -> Any:
    """``table[task][method]``, or an UnknownDefault that names the argument it lacks and the choices."""
    if not isinstance(task, str) or task not in table:
        raise UnknownDefault(f"task {task!r} has no default {what}s; tasks: {', '.join(table)}.")
    if not isinstance(method, str) or method not in table[task]:
        raise UnknownDefault(f"method {method!r} has no default {what}; methods: {', '.join(table[task])}.")
    return table[task][method]


def default_lr(method: str, task: str = "classify", budget: float | None = None) -> float:
    """The learning rate ``method`` trains with on ``task`` when none is given.

    ``budget``: the run's adapter budget as plain LoRA's rank on the same targets (:func:`budget_of`): the rate
    chosen at the studied budget nearest to it; None (a run without one): DEFAULT_LR's.

    Raises:
        ValueError naming the argument: a method or task the table has no rate for (an :class:`UnknownDefault`,
            also a KeyError, naming the choices), a budget that is not a finite positive number."""
    rate = _entry(DEFAULT_LR, "learning rate", method, task)
    if budget is None:
        return rate
    if not is_finite_number(budget) or not budget > 0:
        raise ValueError(f"budget must be a finite positive number of plain LoRA ranks (or None), not {budget!r}.")
    studied = studied_budget(method, task, float(budget))
    return BUDGET_LR[task][method][studied] if studied != MIDDLE_BUDGET[task] else rate


def budget_in_lora_ranks(target_params: int | None, shapes: Iterable[tuple[int, int]]) -> float | None:
    """An adapter budget of ``target_params`` parameters as plain LoRA's rank on the target matrices of ``shapes``
    ((d_in, d_out) each; a rank of LoRA costs d_in + d_out per matrix): the scale the defaults were chosen on.
    None without a budget or targets."""
    per_rank = sum(d_in + d_out for d_in, d_out in shapes)
    return None if target_params is None or per_rank == 0 else target_params / per_rank


def default_ortho_weight(method: str, task: str = "classify") -> float:
    """The orthogonality penalty weight an SVD method (``elalora``, ``adalora-physical``) trains with on ``task`` when
    its config gives none (UnknownDefault naming the choices)."""
    return _entry(DEFAULT_ORTHO_WEIGHT, "orthogonality weight", method, task)


def default_values_lr_ratio(method: str, task: str = "classify") -> float:
    """How many times the adapters' learning rate an SVD method's singular values E train with on ``task`` when its
    config gives no ratio (UnknownDefault naming the choices)."""
    return _entry(DEFAULT_VALUES_LR_RATIO, "singular values' rate ratio", method, task)


def default_svd_init(method: str, task: str = "classify") -> str:
    """How a fresh adapter of an SVD method starts on ``task`` when its config does not say: 'adalora' or 'lora'
    (UnknownDefault naming the choices)."""
    return _entry(DEFAULT_SVD_INIT, "start", method, task)


def studied_start_rank(method: str, budget: float) -> int | None:
    """The start rank ``r`` the defaults study gave ``method`` at a budget of ``budget`` plain LoRA ranks (rounded to
    a whole rank, at least 1): ARD max(8, 2b), ElaLoRA b (it conserves its size), AdaLoRA-style stock AdaLoRA's 1.5b
    (at least b + 1); None for a method whose r is its size (docs/defaults.md, "What the study ran is what ships")."""
    b = max(1, round(budget))
    return {"ard": max(8, 2 * b), "elalora": b, "adalora-physical": stock_adalora_start_rank(b)}.get(method)


def budget_of(method: str, r: int, knobs: Mapping[str, Any], shapes: Iterable[tuple[int, int]]) -> float | None:
    """A run's adapter budget as plain LoRA's rank (what default_lr's ``budget`` takes), from its method, rank and
    config fields: r for a fixed rank (and stock AdaLoRA, which prunes to r on average); ``target_params`` over LoRA
    r=1's parameters on the targets (``shapes``) for a rank controller held to one; an SVD method per matrix without
    one ends at ``target_rank`` per matrix, or keeps r (ElaLoRA conserves it). None: no budget (ARD without
    ``target_params``, whose r is only where it starts; full fine-tuning; an SVD method per head)."""
    if method in RANK_BUDGET_METHODS:
        return float(r)
    if knobs.get("target_params") is not None:
        return budget_in_lora_ranks(knobs["target_params"], shapes)
    if method in ("elalora", "adalora-physical") and knobs.get("granularity", "matrix") == "matrix":
        return float(knobs.get("target_rank") or r)
    return None


def task_of(model) -> str:
    """'causal-lm' for a model that generates text (a transformers LM, bare or inside a PEFT wrapper), else
    'classify': which table of defaults a model trains with."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    can_generate = getattr(base, "can_generate", None)
    return "causal-lm" if callable(can_generate) and can_generate() else "classify"
