"""How an elastic layer changes shape: ranks removed and added with their optimizer state carried, a saved layout
taken (loading), each applied to the layer's tensors from a plan of ``slot_layout.py``.

:class:`SlotResizing` is a part of ``ElasticLoRALinear`` (layer.py), which owns the tensors, the slot lists and
the index rebuild these methods end with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .optim_state import reindex_parameter
from .slot_layout import decode_slots, growth, removal

Optimizers = torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None


class SlotResizing:
    """remove_slots / add_slots / set_slots and the state-dict hook of an elastic layer."""

    shared_weight: nn.Parameter
    group_weight: nn.Parameter
    _slots: list[list[int]]
    merged: bool
    n_groups: int
    group_size: int
    split: str
    layout: str

    def _check_resizable(self) -> None:
        if self.merged:
            raise RuntimeError("unmerge() the adapter before resizing it.")

    def _apply_layout(
        self,
        new_slots: list[list[int]],
        slot_source: torch.Tensor,
        new_shared: torch.Tensor | None,
        column_source: torch.Tensor,
        new_group: torch.Tensor | None,
        optimizer: Optimizers,
    ) -> None:
        self.shared_weight = reindex_parameter(self.shared_weight, 0, slot_source, new_shared, optimizer)
        self.group_weight = reindex_parameter(self.group_weight, 1, column_source, new_group, optimizer)
        self._slots = new_slots
        self._rebuild_index()

    def remove_slots(self, positions: Mapping[int, Sequence[int]], optimizer: Optimizers = None) -> int:
        """Physically remove ranks: ``positions[g]`` lists positions (0..r_g-1) in group g.

        Kept ranks keep their order, values and optimizer state; a shared slot that no group
        uses any more is dropped. Returns the number of parameters removed.

        The resized weights are new Parameter objects: pass EVERY optimizer that holds this layer's
        parameters (the controllers pass the ones they are bound to), or it keeps stepping the old ones.
        """
        self._check_resizable()
        before = self.num_adapter_parameters()
        new_slots, used, columns = removal(self._slots, positions)
        self._apply_layout(
            new_slots,
            torch.tensor(used, dtype=torch.long),
            None,
            torch.tensor(columns, dtype=torch.long),
            None,
            optimizer,
        )
        return before - self.num_adapter_parameters()

    def add_slots(
        self,
        counts: Mapping[int, int],
        optimizer: Optimizers = None,
        generator: torch.Generator | None = None,
    ) -> int:
        """Append ``counts[g]`` ranks to group g without changing the layer's function.

        The new B entries are zero; the new A entries are random (so B receives gradient),
        except where a shared slot already carries a non-zero B. New entries start with zero
        optimizer moments. Returns the number of parameters added.
        """
        self._check_resizable()
        before = self.num_adapter_parameters()
        n_slots = self.n_slots
        plan = growth(self._slots, counts, self.layout, n_slots)
        if not plan.fresh:
            return 0
        dtype, device = self.shared_weight.dtype, self.shared_weight.device
        bound = 1.0 / math.sqrt(self.in_features)

        def _random(*shape: int) -> torch.Tensor:
            t = torch.empty(*shape, dtype=dtype)
            return t.uniform_(-bound, bound, generator=generator).to(device)

        n_fresh, n_new = plan.n_fresh, len(plan.fresh)
        if self.split == "rows":  # shared = A (random), group = B (zero)
            shared_new = _random(n_fresh, self.other_dim)
            group_new = torch.zeros(self.group_size, n_new, dtype=dtype, device=device)
        else:  # shared = B^T (zero), group = A^T (random where its slot is fresh)
            shared_new = torch.zeros(n_fresh, self.other_dim, dtype=dtype, device=device)
            group_new = _random(self.group_size, n_new)
            keep_random = torch.tensor(plan.fresh, device=device)
            group_new = group_new * keep_random.to(dtype)
        self._apply_layout(
            plan.slots,
            torch.arange(n_slots + n_fresh),
            shared_new,
            torch.tensor(plan.column_order, dtype=torch.long),
            group_new,
            optimizer,
        )
        return self.num_adapter_parameters() - before

    def set_slots(self, slots: Sequence[Sequence[int]]) -> None:
        """Reshape (uninitialised values) to a saved slot layout; used by loading only."""
        self._check_resizable()
        if len(slots) != self.n_groups:
            raise ValueError(f"layout has {len(slots)} groups, this layer has {self.n_groups}.")
        n_slots = 1 + max((s for g in slots for s in g), default=-1)
        n_cols = sum(len(g) for g in slots)
        self.shared_weight = nn.Parameter(
            self.shared_weight.new_zeros(n_slots, self.other_dim), requires_grad=self.shared_weight.requires_grad
        )
        self.group_weight = nn.Parameter(
            self.group_weight.new_zeros(self.group_size, n_cols), requires_grad=self.group_weight.requires_grad
        )
        self._slots = [list(map(int, g)) for g in slots]
        self._rebuild_index()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """Take the saved slot layout first (``slot_layout``), so that the saved tensors fit; then load them."""
        saved = state_dict.get(prefix + "slot_layout")
        if saved is not None:
            try:
                slots = decode_slots(saved)
            except ValueError as exc:
                errors.append(f"{prefix}slot_layout: {exc}")
                return
            if len(slots) != self.n_groups:
                errors.append(
                    f"{prefix}slot_layout: the saved adapter has {len(slots)} rank groups, this layer {self.n_groups} "
                    "(another granularity, head layout or model)."
                )
                return
            if slots != self._slots:
                self.set_slots(slots)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        # The gather indices are derived, not saved: made again where the loaded factors now are (a model built on
        # the meta device and loaded with assign=True, or filled by to_empty(), holds none that are right).
        self._rebuild_index()
