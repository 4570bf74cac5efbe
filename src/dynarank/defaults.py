"""The learning rate each method trains with when the user gives none: one table, read by the library
(``controller.build_optimizer()``), the training loop and the CLI (``--lr`` unset) and the benchmarks alike.

How the values were chosen is in docs/defaults.md: a learning-rate grid per method and data set at the middle
budget, the rate that is best on average over the OTHER data sets checked on each left-out one, and the rate
best over all of them kept. Every run records the rate it used and where it came from.

The names are the run vocabulary: dynarank's methods and the stock baselines (``lora``, ``dora``, ``adalora``,
``full``) that the application trains beside them.
"""

from __future__ import annotations

DEFAULT_LR: dict[str, float] = {
    # dynarank's methods
    "dynarank-lora": 1e-3,
    "ard": 1e-3,
    "elalora": 1e-3,
    "adalora-physical": 1e-3,
    # stock baselines
    "lora": 1e-3,
    "dora": 1e-3,
    "adalora": 1e-3,
    "full": 3e-5,
}
SOURCE = "dynarank.defaults (docs/defaults.md)"


def default_lr(method: str) -> float:
    """The learning rate ``method`` trains with when none is given (KeyError naming the methods otherwise)."""
    if method not in DEFAULT_LR:
        raise KeyError(f"no default learning rate for {method!r}; methods: {', '.join(DEFAULT_LR)}.")
    return DEFAULT_LR[method]
