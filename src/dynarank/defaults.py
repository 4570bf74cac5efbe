"""The learning rate each method trains with when the user gives none: one table, read by the library
(``controller.build_optimizer()``), the training loop and the CLI (``--lr`` unset) and the benchmarks alike.

How the values were chosen (benchmarks/defaults.py, results in benchmarks/results/defaults.md): a learning-rate
grid per method and data set at the middle budget, each rate scored relative to that data set's best; the rate
best on average over the OTHER data sets is checked on each left-out one, and the rate best over all of them is
shipped. tests/test_defaults.py holds this table equal to the study's record. Every run records the rate it used
and where it came from.

The names are the run vocabulary: dynarank's methods and the stock baselines (``lora``, ``dora``, ``adalora``,
``full``) that the application trains beside them.
"""

from __future__ import annotations

DEFAULT_LR: dict[str, float] = {
    # dynarank's methods
    "dynarank-lora": 1e-2,  # plain LoRA in dynarank's layer: LoRA's rate
    "ard": 3e-3,
    "elalora": 3e-2,
    "adalora-physical": 3e-2,
    # stock baselines (a user's untuned `--method lora`; the benchmarks tune them per task)
    "lora": 1e-2,
    "dora": 1e-2,
    "adalora": 3e-2,
    "eva": 1e-2,  # stock LoRA with EVA's data-driven init: LoRA's rate
    "full": 1e-4,
}
SOURCE = "dynarank.defaults (docs/defaults.md)"


def default_lr(method: str) -> float:
    """The learning rate ``method`` trains with when none is given (KeyError naming the methods otherwise)."""
    if method not in DEFAULT_LR:
        raise KeyError(f"no default learning rate for {method!r}; methods: {', '.join(DEFAULT_LR)}.")
    return DEFAULT_LR[method]
