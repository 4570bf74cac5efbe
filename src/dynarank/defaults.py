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
equal to the study's record. Every run records the rate it used and where it came from.

The names are the run vocabulary: dynarank's methods and the stock baselines (``lora``, ``dora``, ``adalora``,
``full``) that the application trains beside them.
"""

from __future__ import annotations

TASKS = ("classify", "causal-lm")  # the CLI's --task values
DEFAULT_LR: dict[str, dict[str, float]] = {
    # sequence classification (encoders with a task head)
    "classify": {
        "dynarank-lora": 3e-3,  # plain LoRA in dynarank's layer: LoRA's rate
        "ard": 3e-3,
        "elalora": 1e-2,
        "adalora-physical": 3e-2,
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
        "elalora": 3e-2,
        "adalora-physical": 3e-2,
        "lora": 1e-2,
        "dora": 1e-2,
        "adalora": 3e-2,
        "eva": 1e-2,
        "full": 1e-4,
    },
}
SOURCE = "dynarank.defaults (docs/defaults.md)"


def source(task: str) -> str:
    """What a run records as the origin of a default rate (``lr_source``)."""
    return f"{SOURCE}, {task}"


def default_lr(method: str, task: str = "classify") -> float:
    """The learning rate ``method`` trains with on ``task`` when none is given (KeyError naming the choices)."""
    if task not in DEFAULT_LR:
        raise KeyError(f"no default learning rates for task {task!r}; tasks: {', '.join(DEFAULT_LR)}.")
    if method not in DEFAULT_LR[task]:
        raise KeyError(f"no default learning rate for {method!r}; methods: {', '.join(DEFAULT_LR[task])}.")
    return DEFAULT_LR[task][method]


def task_of(model) -> str:
    """'causal-lm' for a model that generates text (a transformers LM, bare or inside a PEFT wrapper), else
    'classify': which table of defaults a model trains with."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    can_generate = getattr(base, "can_generate", None)
    return "causal-lm" if callable(can_generate) and can_generate() else "classify"
