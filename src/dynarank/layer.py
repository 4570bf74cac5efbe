"""The rank-elastic LoRA layer: a frozen ``nn.Linear`` plus rank groups with live ranks.

Notation (see docs/architecture.md): G groups of size d_g; S shared slots; T = sum_g r_g
group-side columns; r_max = max_g r_g.

* ``split="rows"``: group g owns output rows ``[g*d_g, (g+1)*d_g)``.
  shared side = A (S, d_in); group side = B packed as (d_g, T).
* ``split="cols"``: group g owns input columns ``[g*d_g, (g+1)*d_g)``.
  shared side = B^T (S, d_out); group side = A^T packed as (d_g, T).

The update is ``delta(x) = scaling * sum_g B_g (m_g * (A_g x))`` where ``m_g`` is the
optional gate of the group's slots, supplied by a controller through :meth:`set_gate`.

This module is the layer itself (its construction, the forward pass, its weights as matrices, merging);
how it changes shape (remove_slots, add_slots, loading a saved layout) is ``layer_resize.py``, and the
slot lists' own bookkeeping (encoding, gather indices, removal and growth plans) is ``slot_layout.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .layer_buckets import BucketPlan, bucketed_update, rank_buckets, take_columns, worth_bucketing
from .layer_fused import fused_update_applies, low_rank_update
from .layer_resize import Optimizers as Optimizers  # re-exported: the type of the resizes' optimizer argument
from .layer_resize import SlotResizing
from .naming import GATE_ENTRIES
from .quantized import refuse_merge
from .slot_costs import SlotCosts
from .slot_layout import decode_slots as decode_slots  # re-exported (the layout's decoding lives in slot_layout)
from .slot_layout import encode_slots, gather_indices, is_dense

Split = Literal["rows", "cols"]
Layout = Literal["own", "shared"]


class GateGather(NamedTuple):
    """A gate (G, R) read from a flat vector of multipliers ``source`` (T,): ``source.view(shape)`` where ``index``
    is None, else ``F.pad(source, (0, 1))[index]`` (index (G, R) into source; T reads the zero padding). A gate fn
    may return one instead of the (G, R) tensor: the fused update (layer_fused.py) then reads the gate from
    ``source`` inside its own node, so the view or the gather costs the autograd engine no node of its own."""

    source: torch.Tensor
    index: torch.Tensor | None
    shape: tuple[int, int]

    def tensor(self) -> torch.Tensor:
        """The (G, R) gate as plain autograd (a view of the source, or a gather from it)."""
        if self.index is None:
            return self.source.view(self.shape)
        return F.pad(self.source, (0, 1))[self.index]


GateFn = Callable[["ElasticLoRALinear"], "torch.Tensor | GateGather"]


class ElasticLoRALinear(SlotResizing, nn.Module):
    """A frozen linear layer with a low-rank update whose rank differs per group and can change.

    Args:
        base: the frozen layer (its parameters get ``requires_grad=False``).
        n_groups: number of rank groups G (1 for a whole-matrix adapter).
        split: "rows" (groups over output features) or "cols" (over input features).
        layout: "own" (disjoint slots per group) or "shared" (groups index the same slots).
        r: initial rank of every group.
        scaling: output scale of the update (lora_alpha / r), never changed by resizing.
        dropout: dropout probability on the adapter input.
        dtype: dtype of the adapter parameters (default: float32, or the base's if floating
            and at least 32 bits; a quantized base's weight holds bytes: float32). The base is never upcast.
        generator: RNG for the initialisation of A.
    """

    # The update runs as one autograd node (layer_fused.py; not for rank buckets); False: the plain autograd path
    # (the reference the tests hold the fused node to; the same values up to rounding).
    fused: bool = True

    def __init__(
        self,
        base: nn.Linear,
        *,
        n_groups: int = 1,
        split: Split = "rows",
        layout: Layout = "own",
        r: int = 8,
        scaling: float = 1.0,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if split not in ("rows", "cols"):
            raise ValueError(f"split must be 'rows' or 'cols', got {split!r}.")
        if layout not in ("own", "shared"):
            raise ValueError(f"layout must be 'own' or 'shared', got {layout!r}.")
        if r < 0:
            raise ValueError(f"rank must be >= 0, got {r}.")
        split_dim = base.out_features if split == "rows" else base.in_features
        if n_groups < 1 or split_dim % n_groups:
            raise ValueError(
                f"{n_groups} groups do not divide the {'output' if split == 'rows' else 'input'} "
                f"dimension {split_dim} of this Linear({base.in_features}, {base.out_features})."
            )
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.split: Split = split
        self.layout: Layout = layout
        self.n_groups = n_groups
        self.group_size = split_dim // n_groups
        self.scaling = float(scaling)
        self.merged = False
        self._gate_fn: GateFn | None = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        device = base.weight.device
        if dtype is None:
            dtype = (
                base.weight.dtype
                if base.weight.is_floating_point() and base.weight.element_size() >= 4
                else torch.float32
            )
        self.adapter_dtype = dtype  # what a Trainer that casts trainable parameters is undone to (integrations)
        if layout == "own":
            n_slots = n_groups * r
            self._slots = [list(range(g * r, (g + 1) * r)) for g in range(n_groups)]
        else:
            n_slots = r
            self._slots = [list(range(r)) for _ in range(n_groups)]
        self.shared_weight = nn.Parameter(torch.empty(n_slots, self.other_dim, device=device, dtype=dtype))
        self.group_weight = nn.Parameter(torch.empty(self.group_size, n_groups * r, device=device, dtype=dtype))
        self._draw_factors(generator)
        self.register_buffer("slot_index", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("column_index", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        # The slot lists, saved with the weights (a persistent buffer): a state dict of this layer says which
        # layout its tensors have, so ANY loader (a Trainer resuming, load_best_model_at_end, load_state_dict)
        # reshapes the layer first and then loads them (_load_from_state_dict).
        self.register_buffer("slot_layout", torch.zeros(0, dtype=torch.long, device=device))
        self._rebuild_index()

    @torch.no_grad()
    def _draw_factors(self, generator: torch.Generator | None = None) -> None:
        """A drawn like PEFT's default (kaiming-uniform, a=sqrt(5) => U(+-1/sqrt(d_in))), B zero: the adapted model
        starts as the base model. Drawn on the CPU (a seeded generator is a CPU generator), then placed: the same
        values on any device."""
        shared, group = self.factors()
        a_factor, b_factor = (shared, group) if self.split == "rows" else (group, shared)
        bound = 1.0 / math.sqrt(self.base.in_features)
        if a_factor.is_meta:  # built on the meta device: nothing to draw until reset_parameters() after to_empty()
            return
        a_factor.copy_(torch.empty(a_factor.shape, dtype=a_factor.dtype).uniform_(-bound, bound, generator=generator))
        b_factor.zero_()

    def reset_parameters(self) -> None:
        """Start the adapter afresh at its current ranks (A drawn, B zero) and rebuild its index buffers; the base
        layer is its own module (``base.reset_parameters()``). What a model built on the meta device needs after
        ``to_empty()``: ``for m in model.modules(): if hasattr(m, "reset_parameters"): m.reset_parameters()``."""
        self._draw_factors()
        self._rebuild_index()

    # ------------------------------------------------------------------ shape facts
    @property
    def weight(self) -> torch.Tensor:
        """The frozen base layer's weight, read through (model code reads a projection's ``.weight``, e.g. T5's
        ``self.wo.weight.dtype``; stock PEFT's layers read it through too). The update is not in it."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (None without one), read through as :attr:`weight` is."""
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def other_dim(self) -> int:
        """Width of a shared-side slot: d_in for rows (A), d_out for cols (B^T)."""
        return self.base.in_features if self.split == "rows" else self.base.out_features

    @property
    def ranks(self) -> list[int]:
        """Live rank of every group."""
        return list(self._rank_tuple)

    @property
    def slot_tuple(self) -> tuple[tuple[int, ...], ...]:
        """The slot lists as they stand, immutable (no copy: what per-step code reads; ``slots`` copies)."""
        return self._slot_tuple

    @property
    def slots(self) -> list[list[int]]:
        """Shared-slot indices used by every group (a copy)."""
        return [list(s) for s in self._slots]

    @property
    def n_slots(self) -> int:
        """S: rows of the shared side; the rank of the equivalent plain LoRA update."""
        return self.shared_weight.shape[0]

    @property
    def max_rank(self) -> int:
        return max(self._rank_tuple, default=0)

    def num_adapter_parameters(self) -> int:
        return self.shared_weight.numel() + self.group_weight.numel()

    @property
    def costs(self) -> SlotCosts:
        """What this layer's ranks cost in parameters (slot_costs.py)."""
        return SlotCosts(self.group_size, self.other_dim, self.n_groups, self.layout)

    def num_adapter_parameters_at(self, ranks: Sequence[int]) -> int:
        """Parameters the layer would hold with group g cut to its first ``ranks[g]`` ranks."""
        if len(ranks) != self.n_groups or any(not 0 <= k <= len(s) for k, s in zip(ranks, self._slots)):
            raise ValueError(f"ranks {list(ranks)} do not fit the live ranks {self.ranks}.")
        return self.costs.size([slots[: int(k)] for k, slots in zip(ranks, self._slots)])

    def adapter_parameters(self) -> list[nn.Parameter]:
        return list(self.factors())

    def factors(self) -> tuple[nn.Parameter, nn.Parameter]:
        """(shared side, group side), read from the parameter store directly: what per-step code over every module
        reads (``nn.Module.__getattr__`` costs ten times as much, which a model of hundreds of modules feels)."""
        params = self._parameters
        return params["shared_weight"], params["group_weight"]

    # ------------------------------------------------------------------ index bookkeeping
    def _rebuild_index(self) -> None:
        """Derive the padded gather indices from the slot lists.

        slot_index[g, j]: shared slot of group g's j-th rank, or S (a zero pad) past r_g.
        column_index[g, j]: packed group-side column, or T (a zero pad) past r_g.
        """
        self.layout_version = getattr(self, "layout_version", 0) + 1  # controllers cache sizes per version
        self._slot_tuple = tuple(tuple(s) for s in self._slots)
        self._rank_tuple = tuple(len(s) for s in self._slot_tuple)
        self.slot_layout = encode_slots(self._slots).to(self.shared_weight.device)
        slot_index, column_index = gather_indices(self._slots, self.n_slots, self.group_weight.shape[1])
        device = self.shared_weight.device
        self.slot_index = slot_index.to(device)
        self.column_index = column_index.to(device)
        ranks = self.ranks
        self._dense = is_dense(self._slots, self.layout)  # every gather of the forward pass is a view
        # Uneven ranks: the padded product costs G * r_max * d_g per token on the group side, the rank
        # buckets T * d_g (T = sum_g r_g; groups at rank 0 cost nothing) plus a few extra passes over the
        # (N, d) activations. Buckets pay off only when the padding is large (BUCKET_MIN_WASTE).
        self._buckets: BucketPlan | None = None
        if not self._dense and self.n_groups > 1 and worth_bucketing(ranks):
            self._buckets = rank_buckets(self._slots, device)

    # ------------------------------------------------------------------ gate hook
    def set_gate(self, fn: GateFn | None) -> None:
        """Install the controller's gate: ``fn(layer)`` returns (G, r_max) multipliers of the slots (a tensor, or a
        :class:`GateGather` reading them from a flat vector).

        Refused while merged: :meth:`unmerge` subtracts the update as it is then, so a gate changed in
        between would leave the base weight wrong.
        """
        if self.merged:
            raise RuntimeError("unmerge() the adapter before changing its gate.")
        self._gate_fn = fn

    @property
    def has_gate(self) -> bool:
        """Whether a gate is installed (:meth:`set_gate`)."""
        return self._gate_fn is not None

    def gate(self) -> torch.Tensor | None:
        """The (G, r_max) multipliers of the slots (None: no gate)."""
        read = self._gate_fn(self) if self._gate_fn is not None else None
        return read.tensor() if isinstance(read, GateGather) else read

    # ------------------------------------------------------------------ forward
    def _group_side_padded(self) -> torch.Tensor:
        """Group-side factor as (d_g, G, r_max); zero beyond each group's rank."""
        w = self.group_weight
        if self._dense:
            return w.view(self.group_size, self.n_groups, -1)
        return take_columns(F.pad(w, (0, 1)), self.column_index)  # padding positions read the zero column

    def _low_rank_update(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d_in) -> (N, d_out), without the scaling, as plain autograd (rank buckets or padded products)."""
        if self._buckets is not None:
            return bucketed_update(self, x, self._buckets_on(x.device))
        return self._padded_update(x, self.gate())

    def _padded_update(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """(N, d_in) -> (N, d_out), without the scaling: every group padded to r_max (a view when dense)."""
        n = x.shape[0]
        w = self._group_side_padded()  # (d_g, G, r_max)
        if self.split == "rows":
            z = x @ self.shared_weight.t()  # (N, S)
            zp = z.view(n, self.n_groups, -1) if self._dense else take_columns(F.pad(z, (0, 1)), self.slot_index)
            if gate is not None:
                zp = zp * gate  # (N, G, r_max)
            if self.n_groups == 1:  # a reshape, not zp[:, 0]: a select's backward allocates and fills a zero tensor
                return zp.reshape(n, -1) @ w.reshape(w.shape[0], -1).t()  # (N, d_out)
            return torch.einsum("ngr,dgr->ngd", zp, w).reshape(n, self.out_features)
        xg = x.view(n, self.n_groups, self.group_size)  # (N, G, d_g)
        zp = torch.einsum("ngd,dgr->ngr", xg, w)  # (N, G, r_max)
        if gate is not None:
            zp = zp * gate
        if self._dense:
            z = zp.reshape(n, -1)  # (N, S): slot of (g, j) is g*r + j
        else:
            z = zp.new_zeros(n, self.n_slots + 1).index_add(1, self.slot_index.flatten(), zp.reshape(n, -1))
            z = z[:, : self.n_slots]
        return z @ self.shared_weight  # (N, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or self.n_slots == 0:
            return out
        h = self.dropout(x.to(self.shared_weight.dtype))
        if self._buckets is not None:
            delta = self._low_rank_update(h.reshape(-1, self.in_features)) * self.scaling
        else:
            read = self._gate_fn(self) if self._gate_fn is not None else None
            gather = isinstance(read, GateGather)
            gate = read.source if gather else read  # gather: the flat source, read inside the fused node
            shared, group = self.factors()
            if self.fused and fused_update_applies(h, shared, group, gate):
                # one autograd node for the update (layer_fused.py), the base's output added in it when it can be
                index = None if self._dense else (self.slot_index.reshape(-1), self.column_index.reshape(-1))
                gate_index = read.index.reshape(-1) if gather and read.index is not None else None
                same = out.dtype == h.dtype
                y = low_rank_update(
                    h,
                    shared,
                    group,
                    gate,
                    self.scaling,
                    self.split,
                    self.n_groups,
                    out if same else None,
                    index,
                    gate_index,
                )
                return y if same else out + y.to(out.dtype)
            gate = read.tensor() if gather else read
            delta = self._padded_update(h.reshape(-1, self.in_features), gate) * self.scaling
        return out + delta.view(*out.shape[:-1], self.out_features).to(out.dtype)

    def _buckets_on(self, device: torch.device) -> BucketPlan:
        if self._buckets.device != device:  # the module moved since the last rebuild
            self._buckets = self._buckets.to(device)
        return self._buckets

    # ------------------------------------------------------------------ weights
    def _group_side_scattered(self) -> torch.Tensor:
        """Group side placed at its shared slots, gate folded in: (G, S, d_g)."""
        w = self._group_side_padded()  # (d_g, G, r_max)
        gate = self.gate()
        if gate is not None:
            w = w * gate.to(w.dtype)
        w = w.permute(1, 2, 0)  # (G, r_max, d_g)
        out = w.new_zeros(self.n_groups, self.n_slots + 1, self.group_size)
        index = self.slot_index.unsqueeze(-1).expand(-1, -1, self.group_size)
        return out.scatter_add(1, index, w)[:, : self.n_slots]

    def gated_group_weight(self) -> torch.Tensor:
        """The packed group side (d_g, T) with the gate folded into its columns.

        The gate multiplies each rank of each group, so folding it into that rank's group-side
        column leaves the update unchanged; a layer saved this way needs no gate to be exact.
        """
        w = self.group_weight
        gate = self.gate()
        if gate is None:
            return w
        per_column = w.new_ones(w.shape[1] + 1)  # the extra entry absorbs the padding positions
        per_column = per_column.index_put((self.column_index.flatten(),), gate.to(w.dtype).flatten())
        return w * per_column[: w.shape[1]]

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The update as plain LoRA factors (A: (S, d_in), B: (d_out, S)), gate folded, no scaling.

        ``B @ A * scaling`` equals :meth:`delta_weight`; this is what the PEFT export writes.
        """
        spread = self._group_side_scattered()  # (G, S, d_g)
        if self.split == "rows":
            b = spread.permute(0, 2, 1).reshape(self.out_features, self.n_slots)
            return self.shared_weight, b
        a = spread.permute(1, 0, 2).reshape(self.n_slots, self.in_features)
        return a, self.shared_weight.t()

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A as a (d_out, d_in) matrix in the adapter's dtype."""
        a, b = self.lora_factors()
        return (b @ a) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Add the update to the base weight. Idempotent; forward then skips the adapter.

        Change nothing of the adapter while merged (resizing and gates are refused; an optimizer step
        would make :meth:`unmerge` subtract a different update).
        """
        if self.merged:
            return
        self._check_base_whole()
        refuse_merge("", self.base)
        w = self.base.weight
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    def _check_base_whole(self) -> None:
        """RuntimeError if FSDP manages the base (dynarank.shard_base): at rest this process holds a shard of its
        weight, and FSDP would overwrite a merge into the gathered copy at its next gather."""
        if getattr(self.base, "_is_fsdp_managed_module", False):
            raise RuntimeError(
                "the base weight is sharded by FSDP (dynarank.shard_base): an adapter cannot be merged into it. Export "
                "the adapter (dynarank.export_peft) and merge it into an unsharded base."
            )

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: subtract the update again. The base weight comes back within rounding, not bit for bit
        ((w + d) - d need not round to w, in fp32 too: a few percent of the elements differ, by about one unit in the
        last place of w + d; a merge keeps no copy of the weight to undo that). Idempotent."""
        if not self.merged:
            return
        w = self.base.weight
        w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        """Refuse, with one error, weights saved with a controller's gate that the model loading them has no place
        for (:func:`dropped_gate_error`); else take the saved layout and the tensors (layer_resize.py)."""
        refused = dropped_gate_error(unexpected_keys)
        if refused is not None:
            if refused not in errors:
                errors.append(refused)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def extra_repr(self) -> str:
        return (
            f"split={self.split}, layout={self.layout}, groups={self.n_groups}x{self.group_size}, "
            f"ranks={self.ranks}, slots={self.n_slots}, scaling={self.scaling:g}"
        )


def dropped_gate_error(unexpected_keys: list[str]) -> str | None:
    """The error of a load whose state dict holds a controller's gate (ARD's alphas, the SVD methods' E, which the
    saved adapters may compute with) that the loading model has no submodule for; None if it holds none.

    ``model.load_state_dict`` lists the model's unexpected keys before it loads the model's layers (a module's own
    entries come before its children's); under ``strict=False`` it would drop the gate without a word, and the
    adapters would compute something else than the saved ones. A model that has its controller takes the gate (or
    folds one its run has dropped since: controllers/load_folding.py).
    """
    for key in unexpected_keys:
        what = GATE_ENTRIES.get(".".join(key.rsplit(".", 2)[-2:]))  # 'dynarank_ard.alpha' under any prefix
        if what is not None:
            return (
                f"{key}: this state dict holds {what}, which a rank-changing run's adapters compute with until the run "
                "folds them in, and this model has no place for them: without them, the adapters of a state saved "
                "mid-run compute something else. Save and load adapters with dynarank.save_adapter(model, dir) and "
                "dynarank.load_adapter(base, dir) (which fold them in); resume a run from its checkpoint "
                "(dynarank.checkpoint, or the Trainer's resume_from_checkpoint); or build the model's rank controller "
                "(dynarank.build_controller) before load_state_dict, so that the model takes them."
            )
    return None
