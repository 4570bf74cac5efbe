"""AdaLoRA on the rank-elastic engine (the SVD form of svd.py), pruning physically.

At every round (schedules.py, forced at T - t_final) the lowest-scoring ranks are removed
PHYSICALLY until the budget holds,

    budget(t) = floor(target + (start - target) * (1 - p)^3)      in ranks or in parameters,

so parameters, optimizer state and compute fall while training (PEFT masks E instead and
keeps every initial rank allocated). Optimizer moments of kept ranks are carried.
"""

from __future__ import annotations

from ..config import ConfigError
from ..slot_costs import smallest_adapter
from .base import BudgetRecord
from .schedules import cubic_budget
from .svd import SVDController

DEFAULT_TARGET_FRACTION = 2 / 3  # target_rank=None: PEFT AdaLoRA's default init_r 12 -> target_r 8


class AdaLoRAController(SVDController):
    """AdaLoRA with physical pruning: ranks scored by importance fall to a budget on a cubic schedule.

    Args:
        model: a model returned by ``dynarank.attach(model, DynaRankConfig(method="adalora-physical", ...))``.
        total_steps: optimizer steps of the run.
    """

    method_name = "AdaLoRA"
    force_end_round = True  # the target is reached exactly at T - t_final
    need_interior_round = False  # a single pruning at T - t_final is a legitimate (if abrupt) schedule

    def _resolve_target(self) -> int:
        """round(target_rank x groups) ranks, or target_params; below the start, above the floor."""
        c = self.config
        floor_ranks = c.rank_floor * sum(layer.n_groups for layer in self.layers.values())
        if self.budget_unit == "rank":
            target_rank = c.target_rank if c.target_rank is not None else DEFAULT_TARGET_FRACTION * c.r
            target = round(target_rank * sum(layer.n_groups for layer in self.layers.values()))
            lowest = max(1, floor_ranks)
        else:
            target = c.target_params
            lowest = smallest_adapter(layer.costs for layer in self.layers.values())
        if not lowest <= target < self.start_budget:
            field = "target_rank" if self.budget_unit == "rank" else "target_params"
            raise ConfigError(
                (field, "r"),
                f"AdaLoRA's target budget ({target} {self.budget_unit}) must be below the start ({self.start_budget}) "
                f"and at least {lowest} (rank_floor and one rank): change the budget, or the start rank.",
            )
        return target

    def reallocate_round(self, t: int, record: BudgetRecord) -> None:
        """AdaLoRA: prune the lowest-scoring ranks until ``budget(t)`` holds."""
        self.prune_to_budget(t, record)

    def budget_at(self, t: int) -> int:
        """The budget in force at step ``t`` (AdaLoRA: the cubic schedule)."""
        return cubic_budget(self.schedule, t, self.start_budget, self.target_budget)
