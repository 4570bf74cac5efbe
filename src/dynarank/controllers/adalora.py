"""AdaLoRA on the rank-elastic engine (the SVD form of svd.py), pruning physically.

At every round (schedules.py, forced at T - t_final) the lowest-scoring ranks are removed
PHYSICALLY until the budget holds,

    budget(t) = floor(target + (start - target) * (1 - p)^3)      in ranks or in parameters,

so parameters, optimizer state and compute fall while training (PEFT masks E instead and
keeps every initial rank allocated). Optimizer moments of kept ranks are carried. No group goes
below rank_floor, so a budget in parameters below every group at rank_floor is refused up front;
in the 'shared' head layout the heads' last ranks are kept on common rows where the budget needs
it (svd.SharedSlots).
"""

from __future__ import annotations

from ..config import ADALORA_TARGET_FRACTION, ConfigError
from ..slot_costs import smallest_adapter
from .base import BudgetRecord
from .schedules import cubic_budget, stock_adalora_phases
from .svd import SVDController


class AdaLoRAController(SVDController):
    """AdaLoRA with physical pruning: ranks scored by importance fall to a budget on a cubic schedule.

    Args:
        model: a model returned by ``dynarank.attach(model, DynaRankConfig(method="adalora-physical", ...))``.
        total_steps: optimizer steps of the run.
    """

    method_name = "AdaLoRA"
    force_end_round = True  # the target is reached exactly at T - t_final
    need_interior_round = False  # a single pruning at T - t_final is a legitimate (if abrupt) schedule

    def _phases(self, total_steps: int | None) -> dict:
        """Stock AdaLoRA's phases for what the config leaves unset (schedules.stock_adalora_phases): the warm-up
        and final phase when neither their fraction nor their step count is given, the interval when not given."""
        phases = super()._phases(total_steps)
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            return phases  # BudgetSchedule.resolve says what is wrong with it
        stock = stock_adalora_phases(total_steps)
        filled = []
        if phases["warmup_frac"] is None and phases["t_init_steps"] is None:
            phases["t_init_steps"] = stock["tinit"] + 1
            filled.append("t_init_steps")
        if phases["final_frac"] is None and phases["t_final_steps"] is None:
            phases["t_final_steps"] = stock["tfinal"] - 1
            filled.append("t_final_steps")
        if phases["interval"] is None:
            phases["interval"] = stock["deltaT"]
            filled.append("interval")
        return {**phases, "defaulted": tuple(filled)}

    def _resolve_target(self) -> int:
        """round(target_rank x groups) ranks, or target_params; below the start, at or above the floor.

        The floor is the least pruning can leave: every group at ``rank_floor`` ranks (in the 'shared' layout on the
        same rows, where pruning keeps them when the budget needs it: svd.SharedSlots), or with rank_floor 0 one rank
        of the cheapest layer (the model keeps one). A budget in parameters below it is refused, as ElaLoRA's is.
        """
        c = self.config
        floor_ranks = c.rank_floor * sum(layer.n_groups for layer in self.layers.values())
        if self.budget_unit == "rank":
            target_rank = c.target_rank if c.target_rank is not None else ADALORA_TARGET_FRACTION * c.r
            target = round(target_rank * sum(layer.n_groups for layer in self.layers.values()))
            lowest = max(1, floor_ranks)
        else:
            target = c.target_params
            floor = c.rank_floor
            lowest = self.floor_size(floor) if floor > 0 else smallest_adapter(l.costs for l in self.layers.values())
        if self.budget_unit == "params" and c.rank_floor > 0 and target < lowest:
            raise ConfigError(
                ("target_params", "rank_floor"),
                f"AdaLoRA's target budget ({target} params) is below {lowest}, the smallest size pruning can reach "
                f"with every group at its rank_floor of {c.rank_floor} rank(s): raise target_params to at least "
                f"{lowest}, or lower rank_floor.",
            )
        field = "target_rank" if self.budget_unit == "rank" else "target_params"
        groups = sum(layer.n_groups for layer in self.layers.values())
        fresh = c.r * groups if self.budget_unit == "rank" else self.floor_size(c.r)  # every head at rank r
        if self.start_budget <= target and self.start_budget < fresh:  # pruned before: a finished run, loaded
            below = f"{self.start_budget / groups:.3g}" if self.budget_unit == "rank" else self.start_budget
            raise ConfigError(
                (field,),
                f"AdaLoRA's target budget ({target} {self.budget_unit}) must be below the start ({self.start_budget}), "
                "and this adapter already is at its target size (pruned by its run, as dynarank.load_adapter gives a "
                f"finished one back): nothing is left to prune. To prune it further, set {field} below {below}: "
                f"model.dynarank_config = dataclasses.replace(model.dynarank_config, {field}=...); to train it on at "
                "this size, continue with another method, e.g. ElaLoRA, which moves ranks between heads under the "
                "same budget: model.dynarank_config = DynaRankConfig.from_dict({**model.dynarank_config.to_dict(), "
                "'method': 'elalora'}).",
            )
        if not lowest <= target < self.start_budget:
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
