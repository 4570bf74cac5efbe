"""ARD-LoRA under a parameter budget: which slots a cap removes, which a floor holds, and how the l1 strength is
steered.

A group g keeps a prefix of its slots (positions 0..k_g-1). The margin of slot j is ``r0 * alpha_g - j``: how far
alpha sits above the point where that slot switches off. A cap removes tail slots, lowest margin first, until the
prefix costs at most the budget; a floor holds back the slots the read-out would cut, highest margin first, while
the prefix still fits under the target. Both go by the same order, so the alphas rank the slots and the budget
decides how many survive.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from ..layer import ElasticLoRALinear
from ..slot_costs import SlotBook


def prefix_cost(layers: Mapping[str, ElasticLoRALinear], ranks: Mapping[str, list[int]]) -> int:
    """Adapter parameters with every group cut to its first ``ranks[module][g]`` slots."""
    return sum(layer.num_adapter_parameters_at(ranks[name]) for name, layer in layers.items())


def _ledgers(
    layers: Mapping[str, ElasticLoRALinear], ranks: Mapping[str, list[int]]
) -> tuple[list[str], dict[str, list[list[int]]], dict[str, SlotBook]]:
    """(the modules in order, their groups' live slots, a ledger per module of the slots the prefixes ``ranks``
    use): who still uses each shared slot, as its A row (B^T row) is freed with its last user and paid by its first."""
    order = list(layers)
    slots = {name: layers[name].slots for name in order}
    books = {name: layers[name].costs.book([s[:k] for s, k in zip(slots[name], ranks[name])]) for name in order}
    return order, slots, books


def cap_to_budget(
    layers: Mapping[str, ElasticLoRALinear],
    ranks: dict[str, list[int]],
    scaled_alpha: Mapping[str, list[float]],
    floor: int,
    budget: int,
    per_parameter: bool = False,
) -> None:
    """Lower ``ranks`` in place until they cost at most ``budget``.

    Args:
        layers: the adapted modules, in a fixed order (ties between equal margins go to the first).
        ranks: prefix length per module and group (at most the group's live rank).
        scaled_alpha: r0 * alpha per module and group.
        floor: no group goes below it; one rank is kept in all.
        budget: adapter parameters allowed.
        per_parameter: order the cuts by margin per parameter the cut frees (a knapsack's greedy: a shared slot's
            last user frees its row too, so it goes before a co-user at the same margin) instead of by margin.
    """
    cost = prefix_cost(layers, ranks)
    if cost <= budget:
        return
    order, slots, books = _ledgers(layers, ranks)
    heap: list[tuple[float, int, int, int]] = []

    def key(i: int, g: int) -> float:
        name = order[i]
        k = ranks[name][g]
        margin = scaled_alpha[name][g] - (k - 1)
        if not per_parameter:
            return margin
        return margin / books[name].price_of_removing(slots[name][g][k - 1])

    def push(i: int, g: int) -> None:
        k = ranks[order[i]][g]
        if k > floor:
            heapq.heappush(heap, (key(i, g), i, g, k))

    for i, name in enumerate(order):
        for g in range(layers[name].n_groups):
            push(i, g)
    left = sum(sum(r) for r in ranks.values())
    while cost > budget and heap and left > 1:
        value, i, g, k = heapq.heappop(heap)
        name = order[i]
        if ranks[name][g] != k or value != key(i, g):
            continue  # stale: the group was cut since, or its tail's price changed (re-pushed then)
        ranks[name][g] = k - 1
        slot = slots[name][g][k - 1]
        cost -= books[name].remove(slot)
        left -= 1
        push(i, g)
        if per_parameter and books[name].usage[slot] == 1:  # its last user now frees the row too: re-rank it
            for h, group in enumerate(slots[name]):
                if h != g and ranks[name][h] > 0 and group[ranks[name][h] - 1] == slot:
                    push(i, h)


def hold_to_budget(
    layers: Mapping[str, ElasticLoRALinear],
    ranks: dict[str, list[int]],
    scaled_alpha: Mapping[str, list[float]],
    budget: int,
) -> None:
    """Raise ``ranks`` in place, back toward the live ranks, while they cost at most ``budget``.

    The slot held next is the one the alphas would keep next: the highest margin r0 * alpha_g - k_g among the
    groups' first cut slots. A slot that does not fit is passed over (a cheaper one, e.g. a shared row still in
    use, may).

    Args:
        layers: the adapted modules, in a fixed order (ties between equal margins go to the first).
        ranks: prefix length per module and group (the read-out, at most the group's live rank).
        scaled_alpha: r0 * alpha per module and group.
        budget: adapter parameters the held ranks may bring the adapter up to.
    """
    cost = prefix_cost(layers, ranks)
    if cost >= budget:
        return
    order, slots, books = _ledgers(layers, ranks)
    heap: list[tuple[float, int, int]] = []

    def push(i: int, g: int) -> None:
        k = ranks[order[i]][g]
        if k < len(slots[order[i]][g]):
            heapq.heappush(heap, (-(scaled_alpha[order[i]][g] - k), i, g))

    for i, name in enumerate(order):
        for g in range(layers[name].n_groups):
            push(i, g)
    while heap:
        _, i, g = heapq.heappop(heap)
        name = order[i]
        slot = slots[name][g][ranks[name][g]]
        if cost + books[name].price_of_adding(slot) > budget:
            continue  # does not fit; the group's later slots need this one first (a prefix), so it is done
        cost += books[name].add(slot)
        ranks[name][g] += 1
        push(i, g)


def steer_factor(wanted: int, budget: int, limit: float = 2.0) -> float:
    """Factor on every lambda: the size the alphas ask for over the budget, clipped to [1/limit, limit]."""
    return min(limit, max(1.0 / limit, wanted / max(1, budget)))
