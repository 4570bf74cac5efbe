"""What ranks cost in adapter parameters: the one place the slot arithmetic lives.

A layer's adapter is S shared-side slots of ``other_dim`` values each (A rows for rows-split layers, B^T rows
for cols-split ones) and, per group g, r_g group-side columns of ``group_size`` values. A group's rank j uses
one slot; in the 'own' layout no two groups share a slot, in the 'shared' layout they may. So

    size = (slots still used by some group) * other_dim + (sum_g r_g) * group_size

and removing one rank frees ``group_size``, plus ``other_dim`` when its slot had no other user. Every planner
(ARD's budget cap, the SVD methods' pruning, ElaLoRA's ceiling) and the layer itself count with these.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotCosts:
    """The sizes of one layer's adapter (group_size and other_dim as in ElasticLoRALinear)."""

    group_size: int
    other_dim: int
    n_groups: int
    layout: str  # "own" or "shared"

    def one_rank(self) -> int:
        """What a rank with a slot of its own costs: one shared-side row and one group-side column (every rank of
        the 'own' layout; the smallest adapter there is)."""
        return self.group_size + self.other_dim

    def added_rank(self, slot_in_use: bool) -> int:
        """What one more rank costs: its group-side column, and its shared-side row unless (the 'shared' layout,
        more than one group) another group already uses that slot."""
        if self.layout == "own" or self.n_groups == 1 or not slot_in_use:
            return self.one_rank()
        return self.group_size

    def size(self, slots: Sequence[Sequence[int]]) -> int:
        """Parameters of an adapter whose group g uses the slots ``slots[g]``."""
        used = {s for group in slots for s in group}
        return len(used) * self.other_dim + sum(len(group) for group in slots) * self.group_size

    def size_of_ranks(self, ranks: Sequence[int]) -> int:
        """Parameters of a fresh adapter with these ranks: own slots per group, or (shared) the first max(r) slots."""
        if self.layout == "own":
            return sum(ranks) * self.one_rank()
        return max(ranks, default=0) * self.other_dim + sum(ranks) * self.group_size

    def size_after(
        self, slots: Sequence[Sequence[int]], prune: Mapping[int, Sequence[int]], grow: Mapping[int, int]
    ) -> int:
        """Parameters after removing ``prune[g]`` positions of group g and appending ``grow[g]`` ranks to it.

        A group that grows in the 'shared' layout takes a slot it does not use yet before a new one is made
        (``ElasticLoRALinear.add_slots``): S = max(slots still used, max_g r_g)."""
        kept = [[s for j, s in enumerate(group) if j not in prune.get(g, ())] for g, group in enumerate(slots)]
        ranks = [len(k) + grow.get(g, 0) for g, k in enumerate(kept)]
        if self.layout == "own":
            return sum(ranks) * self.one_rank()
        used = len({s for k in kept for s in k})
        return max(used, max(ranks, default=0)) * self.other_dim + sum(ranks) * self.group_size

    def rank_price(self) -> float:
        """What one rank of one group costs on average (ARD prices its l1 term with it): a shared slot is split
        between the groups that use it."""
        if self.layout == "shared":
            return self.group_size + self.other_dim / self.n_groups
        return self.one_rank()

    def book(self, slots: Sequence[Sequence[int]]) -> SlotBook:
        """A ledger of ``slots`` that says what each removal frees."""
        return SlotBook(self, slots)


def smallest_adapter(costs: Iterable[SlotCosts]) -> int:
    """Parameters of the smallest adapter that is not empty: one rank in one group of the cheapest layer."""
    return min(c.one_rank() for c in costs)


class SlotBook:
    """How many groups still use each slot of a layer, as ranks are removed one by one (a planner's ledger)."""

    def __init__(self, costs: SlotCosts, slots: Sequence[Sequence[int]]) -> None:
        self.costs = costs
        self.usage = Counter(s for group in slots for s in group)

    def remove(self, slot: int) -> int:
        """Remove one use of ``slot``; returns the parameters that frees."""
        freed = self.price_of_removing(slot)
        self.usage[slot] -= 1
        return freed

    def price_of_removing(self, slot: int) -> int:
        """What removing one use of ``slot`` would free: its group-side column, and its row with its last user."""
        return self.costs.group_size + (self.costs.other_dim if self.usage[slot] == 1 else 0)

    def price_of_adding(self, slot: int) -> int:
        """What one more use of ``slot`` would cost: its group-side column, and its row when no group uses it."""
        return self.costs.group_size + (self.costs.other_dim if self.usage[slot] == 0 else 0)

    def add(self, slot: int) -> int:
        """Add one use of ``slot``; returns the parameters that costs."""
        price = self.price_of_adding(slot)
        self.usage[slot] += 1
        return price
