"""ARD-LoRA's resize step: every group cut to the rank its alpha reads, under the parameter budget when there is
one (the cap on the cubic schedule, the floor at the target, the l1 strength steered toward it), one slot kept if
all would go, and the gates dropped when the final phase begins. The budget's arithmetic is ard_budget.py.

:class:`ARDResizing` is a part of ``ARDController`` (ard.py), which owns the alphas, the settings and the step.
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from ..slot_costs import smallest_adapter
from .ard_budget import cap_to_budget, hold_to_budget, prefix_cost, steer_factor
from .base import BudgetRecord, StepRecord
from .schedules import cubic_budget

STEER_LIMIT = 2.0  # budget mode: the l1 strength changes by at most this factor per resize


class ARDResizing:
    """The budget (its check, its schedule, the steering and the cap) and the physical cut at every resize."""

    def _check_budget(self) -> None:
        target = self.settings.target_params
        if target is None:
            return
        floor = self.settings.rank_floor
        lowest = sum(layer.num_adapter_parameters_at([floor] * layer.n_groups) for layer in self.layers.values())
        lowest = max(lowest, smallest_adapter(layer.costs for layer in self.layers.values()))
        if target < lowest:  # the bound that fails is named, with its own remedy
            raise ConfigError(
                "target_params",
                f"ARD's budget ({target:,}) is below {lowest:,}, the smallest adapter it can keep (rank_floor={floor} "
                "everywhere, one rank in all): raise the budget.",
            )
        if target >= self.start_params:
            measured = getattr(self, "rank_init", None) is not None
            r0 = self.settings.r0
            full = sum(layer.costs.size_of_ranks([r0] * layer.n_groups) for layer in self.layers.values())
            if measured and target < full:  # the start filled init_rho x the budget to within one rank's cost
                rho = self.rank_init["rho"]
                raise ConfigError(
                    ("init_rho", "target_params"),
                    f"ARD's budget ({target:,}) must be below the adapter's size at its start measured from the data "
                    f"({self.start_params:,}), which it prunes down from; init_rho={rho:g} filled {rho:g} x the "
                    "budget to within one rank's cost: raise init_rho (the default is 1.5), and attach again.",
                )
            start = "its start measured from the data" if measured else f"the start rank {r0}"
            raise ConfigError(
                ("target_params", "r"),
                f"ARD's budget ({target:,}) must be below the adapter's size at {start} ({self.start_params:,}), "
                "which it prunes down from: lower the budget, or raise the start rank to start from more capacity.",
            )

    def budget_at(self, t: int | None = None) -> int | None:
        """The parameter cap at step ``t`` (None without a budget): cubic from the start to the target."""
        target = self.settings.target_params
        if target is None:
            return None
        return cubic_budget(self.schedule, self.step if t is None else t, self.start_params, target)

    def _cost(self, ranks: dict[str, list[int]]) -> int:
        return prefix_cost(self.layers, ranks)

    def _steer_lambda(self, wanted: int, budget: int) -> None:
        """Scale every lambda by the size the alphas ask for over the budget (clipped per resize)."""
        self.lambda_scale *= steer_factor(wanted, budget, STEER_LIMIT)

    def _cap_to_budget(self, readouts: dict[str, list[int]], budget: int) -> None:
        """Lower ``readouts`` in place to the budget, lowest-margin tail slots first (ard_budget.py)."""
        per_parameter = self.config.cap_order == "margin-per-parameter"
        cap_to_budget(self.layers, readouts, self._scaled_alphas(), self.settings.rank_floor, budget, per_parameter)

    def _hold_to_target(self, readouts: dict[str, list[int]]) -> None:
        """Keep ``readouts`` at the target at least: the slots the read-out would cut below it are held, highest
        margin first (ard_budget.py). Slots removed are gone for good, so a read-out that fell below the target
        would otherwise end the run under the budget the user asked for."""
        hold_to_budget(self.layers, readouts, self._scaled_alphas(), self.settings.target_params)

    @torch.no_grad()
    def _switch_on_held(self, held: dict[str, list[int]], on_before: dict[str, list[int]]) -> None:
        """Fix the rank of every group the floor held a slot of, with all its slots on from now on.

        A held slot was off (its alpha read it off), so its group-side column is stale: switched back on as it is,
        it would change the function at once (measured: that cost SmolLM2 0.015 of test loss at r=4). Each slot
        that was off restarts from a zero group-side column with zero momentum (the function is unchanged; the
        slot trains from there, as a new LoRA rank does from B = 0). Its second moment (``exp_avg_sq``) is kept: a
        zeroed one makes the slot's next updates larger than the rate by a factor growing with Adam's step count t
        (at most 1.4x after t = 30, 2.0x after 80, 5.2x after 1,000, 6.6x after 5,000: 0.1 g / sqrt(0.001 g^2)
        once the bias corrections are ~1). The group's alpha is set to its cap and kept there (``_project_alphas``):
        its read-out keeps every slot, so the group is never cut again.

        Args:
            held: per module, the groups whose rank the floor raised (after the cut: their live rank is final).
            on_before: per module and group, how many leading slots the mask had on before this resize.
        """
        start = 0
        for name, layer in self.layers.items():
            groups = held.get(name, [])
            columns = [int(layer.column_index[g, j]) for g in groups for j in range(on_before[name][g], layer.ranks[g])]
            if columns:
                index = torch.tensor(columns, device=layer.group_weight.device)
                layer.group_weight.index_fill_(1, index, 0.0)
                for optimizer in self.optimizers:
                    for key, value in optimizer.state.get(layer.group_weight, {}).items():
                        is_momentum = "sq" not in str(key)  # exp_avg, momentum_buffer; not exp_avg_sq / max_exp_avg_sq
                        if is_momentum and torch.is_tensor(value) and value.shape == layer.group_weight.shape:
                            value.index_fill_(1, index.to(value.device), 0.0)
            for g in groups:
                self.held[start + g] = True
            start += layer.n_groups

    def _mask_on_counts(self) -> dict[str, list[int]]:
        """Per module and group: how many leading slots the mask has on (x_j = r0 * alpha_g - j > 1/2, the
        floor, or every slot of a group whose rank the floor fixed)."""
        s = self.settings
        scaled = self.settings.r0 * self.gates.alpha.detach().float().cpu()
        on = torch.ceil(scaled - 0.5 - 1e-6).clamp(min=s.rank_floor)
        on = torch.minimum(torch.where(self.held.cpu(), self.group_ranks.float(), on), self.group_ranks.float())
        return {name: part.long().tolist() for name, part in self.gates.split(on).items()}

    def _scaled_alphas(self) -> dict[str, list[float]]:
        scaled = self.gates.split(self.settings.r0 * self.gates.alpha.detach().float().cpu())
        return {n: v.tolist() for n, v in scaled.items()}

    def _resize(self, record: BudgetRecord) -> None:
        """Cut every group to its read-out rank (and under the budget), carrying the optimizer state of
        the kept slots."""
        readouts = {name: part.tolist() for name, part in self.gates.split(self._readout_vector().cpu()).items()}
        live = int(self.group_ranks.sum())
        wanted = sum(sum(r) for r in readouts.values())
        budget = self.budget_at()
        raised: dict[str, list[int]] = {}
        if budget is not None:
            self._steer_lambda(self._cost(readouts), budget)
            self._cap_to_budget(readouts, budget)
            before_hold = {name: list(r) for name, r in readouts.items()}
            self._hold_to_target(readouts)
            raised = {
                name: [g for g, (a, b) in enumerate(zip(before_hold[name], r)) if b > a] for name, r in readouts.items()
            }
            on_before = self._mask_on_counts() if any(raised.values()) else {}
        kept = sum(sum(r) for r in readouts.values())
        # ranks, before the collapse guard: the read-out's cuts, the cap's on top, the floor's holds against them
        record.cut_by_alpha, record.cut_by_budget = live - max(wanted, kept), max(wanted - kept, 0)
        record.held_by_budget = max(kept - wanted, 0)
        self.cuts["alpha"] += record.cut_by_alpha
        self.cuts["budget"] += record.cut_by_budget
        self.cuts["held"] += record.held_by_budget
        if not kept:
            self._keep_one_slot(readouts, record)
        removed = 0  # ranks, physically
        for name, layer in self.layers.items():
            cut = {g: list(range(k, r)) for g, (k, r) in enumerate(zip(readouts[name], layer.ranks)) if k < r}
            if cut:
                record.params_removed += layer.remove_slots(cut, optimizer=self.optimizers)
                removed += sum(len(positions) for positions in cut.values())
                record.resized = True
        record.pruned = removed
        self._layout_changed()
        if any(raised.values()):
            self._switch_on_held(raised, on_before)
        self._project_alphas()
        self.anchor = self.gates.alpha.detach().clone()
        if self.step >= self.settings.final_start:
            self._drop_gates()  # ranks are fixed from here on: every physical slot is on, A and B fine-tune

    def _keep_one_slot(self, readouts: dict[str, list[int]], record: StepRecord) -> None:
        """Nothing would be left to train (and a loss without a graph would crash the loop): keep the one slot
        whose alpha is largest and report the collapse."""
        alpha = self.gates.alpha.detach().float().cpu().tolist()
        ranks = self.group_ranks.tolist()
        alive = [
            (alpha[i], n, i - self.gates.spans[n][0]) for n, (a, b) in self.gates.spans.items() for i in range(a, b)
        ]
        _, best, group = max(entry for entry, r in zip(alive, ranks) if r > 0)
        readouts[best][group] = 1
        self.warn_once(
            "collapse-all",
            "rank collapse: every group reached rank 0; one slot is kept. lambda is "
            f"far too high (ard_lambda={self.settings.ard_lambda:g}): lower it.",
            record,
        )

    def _drop_gates(self) -> None:
        for layer in self.layers.values():
            layer.set_gate(None)
        self.gates.gated.fill_(False)
