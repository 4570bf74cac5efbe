"""ElaLoRA: importance-scored ranks pruned AND expanded, total rank conserved, physically resized.

Parameterisation, penalty and scores as AdaLoRA (adalora.py, importance.py). Each round
(schedules.py: t > t_init, (t - t_init) % interval == 0, t <= T - t_final):

    b = round(b0 * (1 - p^3))                                   # changes this round
    every group g offers its k_g = min(k, r_g - 1) lowest-scoring ranks as candidates
                                                                (r_g with switch_off=True)
    prune  : the b lowest candidates over all groups            (removed from A, E, B)
    expand : the groups of the b highest candidates, one rank each (b capped at #candidates // 2)

A new rank is a near no-op orthogonal to the group's ranks: a random vector projected off the
span of the group's current A rows (and, separately, B columns) - one Gram-Schmidt step against
an orthonormal basis of that span - normalised, with E = 1e-13. A group never exceeds
min(d_g, d_other) ranks (no orthogonal direction is left beyond that); its candidate is then
passed over for the next highest.

Deliberate difference from the authors' code: their loop rebuilds the optimizer after every
round, which resets every Adam moment (and leaves the learning-rate scheduler driving the old
optimizer). Here A, E and B are resized in place through the engine: kept ranks keep their
moments, new ranks start with zero momentum and a second moment that makes their first update the
learning rate (``optim_state``: zero early in a run; a zeroed one would inflate it to 2.5x after 1,000
steps), the scheduler is untouched. ``reset_optimizer_on_resize=True``
resets the moments after each round that changed ranks, for exact reproduction.

Budget: the total rank is conserved (the papers' unit). With ``target_params`` the budget is
in parameters: expansions are admitted in score order only while the adapter stays within
``target_params`` (default: its initial size), so the count never exceeds it.

Starting above the budget (``target_rank`` below r, or ``target_params`` below the initial
size): the budget falls on AdaLoRA's cubic schedule from the start to the target, reached at
T - t_final. Each round first prunes the lowest-scoring ranks until budget(t) holds (as AdaLoRA),
then swaps b ranks as above within budget(t); a forced round at T - t_final lands on the target.
Pruning to the budget keeps the same floor as the candidates (one rank per group, or rank_floor;
0 with switch_off, the model still keeping one rank), so a target that floor cannot reach is refused up front.
In the 'shared' head layout that floor has every head's last ranks on the same shared rows (a row is paid once);
pruning cannot move a rank onto another row, so where the target needs it the rounds keep the heads on common
rows (svd.SharedSlots: a rank whose removal would put the target out of reach is not pruned, nor offered up in a
swap). A target that is reached whichever rows the heads keep is pruned by score alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..layer import ElasticLoRALinear
from ..slot_costs import smallest_adapter
from .base import BudgetRecord
from .schedules import cubic_budget, cubic_changes
from .svd import Plan, SVDController, _laid_out

NEW_RANK_VALUE = 1e-13  # E of an expanded rank: the function is unchanged to ~1e-13


@dataclass(frozen=True)
class Candidate:
    """A rank offered for reallocation: its score and where it lives."""

    score: float
    module: str
    group: int
    position: int


class ElaLoRAController(SVDController):
    """Prune the weakest ranks and grow the groups whose weakest ranks are still strong.

    Args:
        model: a model returned by ``dynarank.attach(model, DynaRankConfig(method="elalora", ...))``.
        total_steps: optimizer steps of the run.
    """

    method_name = "ElaLoRA"
    need_interior_round = True
    new_rank_value = NEW_RANK_VALUE

    @property
    def shrinks(self) -> bool:
        """Whether the run starts above its budget and prunes into it (cubic schedule) while reallocating."""
        return self.target_budget < self.start_budget

    @property
    def force_end_round(self) -> bool:  # type: ignore[override]
        return self.shrinks  # a shrinking budget is reached exactly at T - t_final, as AdaLoRA's

    def group_floor(self) -> int:
        """Fewest ranks a group keeps: one (the authors' rule), 0 with switch_off; never below rank_floor."""
        return max(0 if self.config.switch_off else 1, self.config.rank_floor)

    def _resolve_target(self) -> int:
        """Rank: round(target_rank x groups), or the initial total (conserved). Parameters: target_params.

        Below the start the budget shrinks to it; it must stay reachable with every group at its floor.
        """
        c = self.config
        if self.budget_unit == "rank":
            if c.target_rank is None:
                return self.start_budget
            target = round(c.target_rank * sum(layer.n_groups for layer in self.layers.values()))
        else:
            target = c.target_params
        keep = self.group_floor()
        if self.budget_unit == "params" and keep == 0:  # every group may go: the model still keeps one rank
            lowest = smallest_adapter(layer.costs for layer in self.layers.values())
            at_floor = "one rank of the cheapest layer (the model keeps one)"
        else:
            groups = sum(layer.n_groups for layer in self.layers.values())
            lowest = max(1, keep * groups if self.budget_unit == "rank" else self.floor_size(keep))
            at_floor = f"the size with every group at its floor of {keep} rank(s)"
        if target < lowest:
            field = "target_rank" if self.budget_unit == "rank" else "target_params"
            hint = "" if c.switch_off else " (or let a group give up its last rank: switch_off)"
            raise ConfigError(
                field,
                f"ElaLoRA's budget ({target} {self.budget_unit}) is below {lowest}, {at_floor}: raise it{hint}.",
            )
        return target

    def budget_at(self, t: int) -> int:
        """Conserved (or a constant ceiling), or AdaLoRA's cubic fall from the start when starting above it."""
        if self.shrinks:
            return cubic_budget(self.schedule, t, self.start_budget, self.target_budget)
        return self.target_budget

    def capacity(self, layer: ElasticLoRALinear) -> int:
        """Most ranks a group can hold: beyond min(d_g, d_other) no orthogonal direction is left."""
        return min(layer.group_size, layer.other_dim)

    def slot_ceiling(self, layer: ElasticLoRALinear) -> int:
        """Most shared slots ``layer`` can have: a group makes a new one only when it uses every slot there is, and
        holds at most ``capacity`` ranks (or its start, r)."""
        return max(self.config.r, self.capacity(layer))

    # ------------------------------------------------------------------ one round
    def reallocate_round(self, t: int, record: BudgetRecord) -> None:
        if self.shrinks:
            self.prune_to_budget(t, record, self.group_floor())
        b = cubic_changes(self.schedule, t, self.config.b_changes)
        if b > 0:
            self.reallocate(self.triplet_scores(), b, record)

    def candidates(self, scores: dict[str, list[torch.Tensor]]) -> list[Candidate]:
        """Every group's k_g = min(k, r_g - max(1, rank_floor)) lowest-scoring ranks, lowest score first
        (a group never offers the ranks that keep it at its floor, nor its last rank). With ``switch_off``
        the last rank is offered too: k_g = min(k, r_g - rank_floor). A group at rank 0 offers nothing and
        so is never grown again."""
        keep = self.group_floor()
        flat, starts, owners = _laid_out(self.layers, scores)
        if flat is None:
            return []
        values = flat.tolist()
        sizes = [stop - start for start, stop in zip(starts, [*starts[1:], len(values)])]
        # Every group's ranks by ascending score (ties by position): one stable sort by score, then one by group.
        group_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        by_score = torch.argsort(flat, stable=True)
        ranked = by_score[torch.argsort(group_of[by_score], stable=True)].tolist()
        order = {name: i for i, name in enumerate(self.layers)}
        found = []
        for (name, g), start, size in zip(owners, starts, sizes):
            k = min(self.config.k_candidates, size - keep)
            for idx in ranked[start : start + max(k, 0)]:
                found.append(Candidate(values[idx], name, g, idx - start))
        return sorted(found, key=lambda c: (c.score, order[c.module], c.group, c.position))

    def plan(self, scores: dict[str, list[torch.Tensor]], b: int) -> tuple[Plan, dict[str, dict[int, int]]]:
        """(ranks to prune, ranks to add per group) for one round of ``b`` changes."""
        pool = self.candidates(scores)
        b = min(b, len(pool) // 2)
        prune: Plan = {}
        ranks = {name: layer.ranks for name, layer in self.layers.items()}
        keep = self.group_floor()
        guard = self.shared_slots(keep)
        pruned, offered = [], []  # the b lowest candidates (guarded: that keep the common slots), the others
        for c in pool:
            slot = self.layers[c.module].slot_tuple[c.group][c.position]
            if len(pruned) < b and (guard is None or guard.remove(c.module, slot)):
                pruned.append(c)
            else:
                offered.append(c)
        for c in pruned:
            prune.setdefault(c.module, {}).setdefault(c.group, []).append(c.position)
            ranks[c.module][c.group] -= 1
        grow: dict[str, dict[int, int]] = {}
        size = {  # parameters after the pruning (only the budget in parameters reads them)
            name: layer.costs.size_after(layer.slots, prune[name], {}) if name in prune else self.module_size(name)
            for name, layer in self.layers.items()
        }
        ceiling = self.budget_at(self.step)  # params: expansions stay within the budget in force
        added = 0
        for c in reversed(offered):  # highest first; the pruned ones are not offered
            if added == b:
                break
            layer = self.layers[c.module]
            if ranks[c.module][c.group] >= self.capacity(layer):
                continue
            counts = dict(grow.get(c.module, {}))
            counts[c.group] = counts.get(c.group, 0) + 1
            if self.budget_unit == "params":
                new_size = layer.costs.size_after(layer.slots, prune.get(c.module, {}), counts)
                if sum(size.values()) - size[c.module] + new_size > ceiling:
                    continue
                size[c.module] = new_size
            grow[c.module] = counts
            ranks[c.module][c.group] += 1
            added += 1
        return prune, grow

    def reallocate(
        self, scores: dict[str, list[torch.Tensor]], b: int, record: BudgetRecord | None = None
    ) -> BudgetRecord:
        """One round with the given scores (``triplet_scores()`` in training; any in tests); returns its record."""
        prune, grow = self.plan(scores, b)
        return self.resize(prune, grow, record)

    def resize(self, prune: Plan, grow: dict[str, dict[int, int]], record: BudgetRecord | None = None) -> BudgetRecord:
        """Remove ``prune`` positions, then append ``grow[module][group]`` near-no-op orthogonal ranks."""
        record = record if record is not None else BudgetRecord(self.step, "active", budget_unit=self.budget_unit)
        added = self.apply_plan(prune, grow, record)
        for name, new in added.items():
            self._initialise_new_ranks(self.layers[name], new)
        return record

    # ------------------------------------------------------------------ new ranks
    @torch.no_grad()
    def _initialise_new_ranks(self, layer: ElasticLoRALinear, new: list[tuple[int, int]]) -> None:
        """Give each appended rank unit vectors orthogonal to its group's other ranks (E is already 1e-13).

        A shared slot that other groups already use (layout 'shared') keeps its row: only the
        group-side vector is drawn.
        """
        groups_new = {}
        for g, j in new:
            groups_new.setdefault(g, []).append(j)
        claimed: set[int] = set()  # shared rows drawn in this round
        in_use_before = {
            s for g, slots in enumerate(layer.slots) for j, s in enumerate(slots) if j not in groups_new.get(g, ())
        }
        offsets = [sum(layer.ranks[:g]) for g in range(layer.n_groups)]
        for g, positions in groups_new.items():
            slots = layer.slots[g]
            for j in sorted(positions):
                column = offsets[g] + j
                others = layer.group_weight[:, offsets[g] : offsets[g] + j].t()  # (j, d_g) the group's ranks
                layer.group_weight[:, column] = _orthogonal_unit(others, self.generator)
                slot = slots[j]
                if slot in in_use_before or slot in claimed:
                    continue
                rows = layer.shared_weight[slots[:j]]  # (j, d_other)
                layer.shared_weight[slot] = _orthogonal_unit(rows, self.generator)
                claimed.add(slot)


def _orthogonal_unit(rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A random unit vector orthogonal to every row of ``rows`` (k, d), k < d.

    v <- v - Q Q^T v with Q an orthonormal basis of the rows' span (one Gram-Schmidt step
    against that basis), then v / ||v||; computed in float64.
    """
    d = rows.shape[1]
    v = torch.randn(d, generator=generator, dtype=torch.float64)
    if rows.shape[0]:
        q, _ = torch.linalg.qr(rows.detach().to("cpu", torch.float64).t())  # (d, k)
        v = v - q @ (q.t() @ v)
    return (v / v.norm()).to(rows.device, rows.dtype)
