"""A layer's slot layout as plain lists: group g's ranks are the shared-side slots ``slots[g]``, its group-side
columns are packed in group order. How the layout is encoded in a state dict, the padded gather indices the
forward pass reads, and how a removal or a growth rewrites the lists (which rows and columns survive, which
are new). Nothing here touches a parameter: ``layer_resize.py`` applies these plans to the layer's tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch


def encode_slots(slots: Sequence[Sequence[int]]) -> torch.Tensor:
    """Slot lists as one long tensor: [G, r_0, slots of group 0..., r_1, slots of group 1..., ...]."""
    flat = [len(slots)]
    for group in slots:
        flat.append(len(group))
        flat.extend(int(s) for s in group)
    return torch.tensor(flat, dtype=torch.long)


def decode_slots(encoded: torch.Tensor) -> list[list[int]]:
    """The slot lists of :func:`encode_slots` (ValueError when the tensor is not such an encoding)."""
    values = [int(v) for v in encoded.reshape(-1).tolist()]
    if not values or values[0] < 0:
        raise ValueError("not a slot layout (empty, or a negative group count).")
    slots, i = [], 1
    for _ in range(values[0]):
        if i >= len(values) or values[i] < 0 or i + 1 + values[i] > len(values):
            raise ValueError("not a slot layout (a group runs past the end).")
        group = values[i + 1 : i + 1 + values[i]]
        if any(s < 0 for s in group):
            raise ValueError("not a slot layout (a negative slot).")
        slots.append(group)
        i += 1 + values[i]
    if i != len(values):
        raise ValueError("not a slot layout (values left over).")
    return slots


def gather_indices(slots: Sequence[Sequence[int]], n_slots: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The padded gather indices of a layout, (G, r_max) each, on the CPU.

    slot_index[g, j]: shared slot of group g's j-th rank, or S = ``n_slots`` (a zero pad) past r_g.
    column_index[g, j]: packed group-side column, or T = ``n_cols`` (a zero pad) past r_g.
    """
    r_max = max((len(s) for s in slots), default=0)
    slot_rows, column_rows, offset = [], [], 0
    for group in slots:  # built as lists, then one tensor each: a resize rebuilds these for every module it touches
        pad = r_max - len(group)
        slot_rows.extend([*map(int, group), *[n_slots] * pad])
        column_rows.extend([*range(offset, offset + len(group)), *[n_cols] * pad])
        offset += len(group)
    shape = (len(slots), r_max)
    slot_index = torch.tensor(slot_rows, dtype=torch.long).reshape(shape)
    column_index = torch.tensor(column_rows, dtype=torch.long).reshape(shape)
    return slot_index, column_index


def is_dense(slots: Sequence[Sequence[int]], layout: str) -> bool:
    """Equal ranks in the own layout, slots in order: every gather of the forward pass is a plain view."""
    ranks = [len(s) for s in slots]
    return (
        layout == "own"
        and len(set(ranks)) == 1
        and all(s == list(range(g * ranks[0], (g + 1) * ranks[0])) for g, s in enumerate(slots))
    )


def removal(
    slots: Sequence[Sequence[int]], positions: Mapping[int, Sequence[int]]
) -> tuple[list[list[int]], list[int], list[int]]:
    """Remove the ranks ``positions[g]`` (0..r_g-1) of group g: (the new slot lists, the old shared slots kept in
    their new order, the old group-side columns kept in their new order). A shared slot no group uses any more
    is dropped and the others renumbered; kept ranks keep their order. IndexError for a position that is not there.
    """
    n_groups = len(slots)
    drop = {g: set(int(p) for p in ps) for g, ps in positions.items()}
    for g, ps in drop.items():
        if not 0 <= g < n_groups or any(not 0 <= p < len(slots[g]) for p in ps):
            raise IndexError(
                f"group {g} has rank {len(slots[g]) if 0 <= g < n_groups else '?'}; "
                f"cannot remove positions {sorted(ps)}."
            )
    columns, kept_slots, offset = [], [], 0
    for g, group in enumerate(slots):
        keep = [j for j in range(len(group)) if j not in drop.get(g, ())]
        columns.extend(offset + j for j in keep)
        kept_slots.append([group[j] for j in keep])
        offset += len(group)
    used = sorted({s for group in kept_slots for s in group})
    remap = {old: new for new, old in enumerate(used)}
    return [[remap[s] for s in group] for group in kept_slots], used, columns


class Growth(NamedTuple):
    """What :func:`growth` plans: the new slot lists, how many shared slots are new (appended after the S old
    ones), whether each appended group-side column has a new slot, and the packed column order (old columns
    0..T-1, appended ones T, T+1, ... in the order ``fresh`` lists them)."""

    slots: list[list[int]]
    n_fresh: int
    fresh: list[bool]
    column_order: list[int]


def growth(slots: Sequence[Sequence[int]], counts: Mapping[int, int], layout: str, n_slots: int) -> Growth:
    """Append ``counts[g]`` ranks to group g. In the 'shared' layout a group first takes a slot it does not use yet
    (an old one, or one another group's growth just made), then a new one; in 'own' every rank gets a new slot.
    IndexError for a group that is not there or a negative count."""
    n_groups = len(slots)
    if any(not 0 <= g < n_groups or n < 0 for g, n in counts.items()):
        raise IndexError(f"invalid growth request {dict(counts)} for {n_groups} groups.")
    n_cols = sum(len(s) for s in slots)
    new_slots = [list(s) for s in slots]
    fresh_slot_of: list[int] = []  # new shared slots, in order of creation
    new_columns: list[bool] = []  # slot is fresh, per appended column
    column_order: list[list[int]] = [[] for _ in range(n_groups)]
    offset = 0
    for g, group in enumerate(slots):
        column_order[g] = list(range(offset, offset + len(group)))
        offset += len(group)
    for g in range(n_groups):
        for _ in range(int(counts.get(g, 0))):
            reusable = (
                [] if layout == "own" else [s for s in range(n_slots + len(fresh_slot_of)) if s not in new_slots[g]]
            )
            if reusable:
                slot, fresh = reusable[0], reusable[0] >= n_slots
            else:
                slot, fresh = n_slots + len(fresh_slot_of), True
                fresh_slot_of.append(slot)
            new_slots[g].append(slot)
            column_order[g].append(n_cols + len(new_columns))
            new_columns.append(fresh)
    return Growth(new_slots, len(fresh_slot_of), new_columns, [c for cols in column_order for c in cols])
