"""Rank buckets: the group side of a per-head layer with very uneven ranks, one product per live rank.

The padded product of ``ElasticLoRALinear`` costs G * r_max per output feature on the group side;
when one head holds far more rank than the rest, the buckets cost T = sum_g r_g instead (heads at
rank 0 cost nothing). ``worth_bucketing`` decides, from measurements (benchmarks/bucket_threshold.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# When the group side runs as rank buckets instead of one padded product. Measured on 2 CPU cores, one
# thread, forward + backward (benchmarks/results/bucket_threshold.md): the padded product stays faster
# until its padding (r_max - mean rank) reaches ~25-30 ranks per output feature; buckets cost 1.06-1.46x
# at MiniLM's sizes (r_max 8) and 0.78-0.90x at r_max 64 with the other heads at 4-16.
BUCKET_GAIN = 0.75  # buckets must do at most this share of the padded work ...
BUCKET_MIN_WASTE = 32  # ... and save at least this many ranks per output feature


def worth_bucketing(ranks: Sequence[int]) -> bool:
    """Whether rank buckets beat one padded product for these live ranks (see BUCKET_MIN_WASTE)."""
    padded, live = len(ranks) * max(ranks, default=0), sum(ranks)
    return live > 0 and live <= BUCKET_GAIN * padded and (padded - live) / len(ranks) >= BUCKET_MIN_WASTE


@dataclass(frozen=True)
class RankBucket:
    """The groups of one live rank: groups (n_b,), slots (n_b, r_b) shared-slot indices, columns (n_b, r_b)
    packed group-side columns."""

    rank: int
    groups: torch.Tensor
    slots: torch.Tensor
    columns: torch.Tensor

    def to(self, device: torch.device) -> RankBucket:
        return RankBucket(self.rank, self.groups.to(device), self.slots.to(device), self.columns.to(device))


@dataclass(frozen=True)
class BucketPlan:
    """A layer's buckets (rank 0 left out), and every bucket's slots flattened in bucket order (cols split:
    one scatter of all buckets into the shared slots)."""

    buckets: tuple[RankBucket, ...]
    slots: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.slots.device

    def to(self, device: torch.device) -> BucketPlan:
        return BucketPlan(tuple(b.to(device) for b in self.buckets), self.slots.to(device))


def rank_buckets(slots: Sequence[Sequence[int]], device: torch.device) -> BucketPlan | None:
    """Group the rank groups by live rank (None if every group is at rank 0)."""
    offsets, offset = [], 0
    for s in slots:
        offsets.append(offset)
        offset += len(s)
    by_rank: dict[int, list[int]] = {}
    for g, s in enumerate(slots):
        if s:
            by_rank.setdefault(len(s), []).append(g)
    if not by_rank:
        return None
    buckets = tuple(
        RankBucket(
            rank=r,
            groups=torch.tensor(groups, dtype=torch.long, device=device),
            slots=torch.tensor([slots[g] for g in groups], dtype=torch.long, device=device),
            columns=torch.tensor([list(range(offsets[g], offsets[g] + r)) for g in groups], device=device),
        )
        for r, groups in sorted(by_rank.items())
    )
    return BucketPlan(buckets, torch.cat([b.slots.reshape(-1) for b in buckets]))


def take_columns(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[:, index]`` for a 2-D ``t`` (rows, C) and an index of any shape: (rows, *index.shape).

    The same values as advanced indexing, with a reproducible backward: advanced indexing's gradient is an
    accumulating index_put, which on a CPU with several threads adds repeated indices (a shared slot read by
    every group) with atomic adds in a racing order once the work is large enough (32,768 elements), so the same
    seed gave different gradients run to run. index_select's gradient is index_add, which adds the repeats in
    index order."""
    return t.index_select(1, index.reshape(-1)).view(t.shape[0], *index.shape)


def bucketed_update(layer, x: torch.Tensor, plan: BucketPlan) -> torch.Tensor:
    """``layer``'s low-rank update of x (N, d_in) -> (N, d_out), without the scaling, one batched product
    per distinct live rank: the same result as the padded product.

    A bucket holds the n_b groups of rank r_b; its work is n_b * r_b per token, so the layer's
    group-side cost is T = sum_g r_g instead of G * r_max.
    """
    n = x.shape[0]
    gate = layer.gate()  # (G, r_max) or None
    w = layer.group_weight  # (d_g, T)
    if layer.split == "rows":
        z = x @ layer.shared_weight.t()  # (N, S)
        y = None
        for b in plan.buckets:
            zb = take_columns(z, b.slots)  # (N, n_b, r_b); slots repeat across groups under a shared layout
            if gate is not None:
                zb = zb * gate.index_select(0, b.groups)[:, : b.rank]
            yb = torch.einsum("ngr,dgr->ngd", zb, take_columns(w, b.columns))  # (N, n_b, d_g)
            if y is None:  # in the dtype the products come in (autocast may lower it); rank-0 groups stay 0
                y = yb.new_zeros(n, layer.n_groups, layer.group_size)
            y.index_copy_(1, b.groups, yb)
        return y.reshape(n, layer.out_features)
    xg = x.view(n, layer.n_groups, layer.group_size)  # (N, G, d_g)
    parts = []
    for b in plan.buckets:
        zb = torch.einsum("ngd,dgr->ngr", xg.index_select(1, b.groups), take_columns(w, b.columns))  # (N, n_b, r_b)
        if gate is not None:
            zb = zb * gate.index_select(0, b.groups)[:, : b.rank]
        parts.append(zb.reshape(n, -1))
    values = torch.cat(parts, dim=1)  # (N, sum_b n_b r_b) in plan.slots order
    z = values.new_zeros(n, layer.n_slots).index_add(1, plan.slots, values)  # (N, S)
    return z @ layer.shared_weight  # (N, d_out)
