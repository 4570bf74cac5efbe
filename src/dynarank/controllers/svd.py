"""The SVD form ElaLoRA and AdaLoRA share: E as the gate, the orthogonality penalty, importance scores,
physical resizing with every state carried.

Per rank group g (an attention head, or the whole matrix) the update is AdaLoRA's SVD form

    delta_g(x) = scaling * P_g diag(E_g) Q_g x        scaling = lora_alpha / r (never changes)

with P = the layer's B side, Q = its A side (stored as docs/architecture.md says) and E a
controller-owned vector, supplied to the layer as its gate (the gate multiplies each slot:
exactly diag(E)). A fresh adapter starts as both papers' code: P, Q ~ N(0, 0.02), E = 0.

``ortho_weight * dR/dw`` of the orthogonality penalty R (orthogonality.py; the weight the config gives, else the
defaults study's for the method and the model's kind of task) is added to the gradients
in the optimizer's pre-step hook: once per optimizer step, whatever computed the loss (PEFT adds R
inside ``forward`` and silently skips it when the loss is computed outside the model). Importance
scores: importance.py. E's module and the initialisation of fresh adapters: svd_values.py. The methods'
rounds: adalora.py, elalora.py.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..attach import ATTACHED_ATTR
from ..defaults import (
    DEFAULT_ALPHA_AT,
    SOURCE,
    default_ortho_weight,
    default_svd_init,
    default_values_lr_ratio,
    task_of,
)
from ..layer import ElasticLoRALinear, GateGather
from ..naming import SVD_ATTR
from ..optim_state import drop_parameter, reindex_parameter
from . import binding
from .base import BudgetRecord, RankController, StepRecord
from .importance import ImportanceEMA, TripletPlan
from .orthogonality import OrthogonalityPlan, add_orthogonality_gradient
from .schedules import BudgetSchedule
from .svd_values import INIT_STD as INIT_STD  # re-exported: E's module and the initialisation are svd_values.py
from .svd_values import SVDValues as SVDValues
from .svd_values import ensure_svd_values
from .svd_values import init_svd_factors as init_svd_factors

logger = logging.getLogger(__name__)

MIN_ROUNDS = 3  # fewer reallocation rounds than this in a run: warned before training

Plan = dict[str, dict[int, list[int]]]  # module -> group -> rank positions


class SVDController(RankController):
    """What ElaLoRA and AdaLoRA share: E as the gate, the penalty, the scores, physical resizing.

    Args:
        model: a model returned by ``dynarank.attach`` with method 'elalora' or 'adalora'.
        total_steps: optimizer steps of the run (required: the schedule is placed in it).
    """

    method_name = "SVD"
    force_end_round = False  # a round at T - t_final even when the interval does not fall there
    need_interior_round = True  # refuse an interval longer than the budgeting phase
    new_rank_value = 0.0  # E of an appended rank
    resizes_adapters = True

    def __init__(self, model: nn.Module, total_steps: int | None = None, *, restoring: bool = False) -> None:
        super().__init__(model, total_steps, restoring=restoring)
        c = self.config
        self.schedule = BudgetSchedule.resolve(
            total_steps,
            **self._phases(total_steps),
            method=self.method_name,
            need_interior_round=self.need_interior_round,
        )
        self.budget_unit = "params" if c.target_params is not None else "rank"
        self.start_budget = self.budget_used()
        # Validated before the model is touched; a restore brings the run's own (it started from another size).
        self.target_budget = self.start_budget if restoring else self._resolve_target()
        if not restoring:
            rounds = len(self.schedule.rounds(force_end=self.force_end_round))
            if rounds < MIN_ROUNDS:
                self.warn_before_training(
                    f"{self.method_name} runs {rounds} reallocation round(s) in this run (budgeting phase of "
                    f"{self.schedule.end - self.schedule.t_init} steps between t_init={self.schedule.t_init} and "
                    f"T - t_final={self.schedule.end}, one every {self.schedule.interval}): fewer than {MIN_ROUNDS} "
                    "leave the ranks almost where they started; train longer or resize more often."
                )
        self.ortho_weight, self.ortho_weight_source = _setting(model, "ortho_weight", default_ortho_weight)
        self.values_lr_ratio, self.values_lr_ratio_source = values_lr_ratio_of(model)
        self._scored: tuple | None = None  # (layout versions' sum, E, the scored parameters)
        self.svd_init, self.svd_init_source = svd_init_of(model)
        self.values = ensure_svd_values(model, self.layers, c.seed, self.svd_init)
        self.values.match_layout(self.layers)  # layers reshaped since E was created (a load)
        self.forget_sizes()  # E are trainable parameters of the model now
        for name, layer in self.layers.items():
            layer.set_gate(self._make_gate(name))
        self.importance = ImportanceEMA(self._scored_parameters(), c.importance_beta1, c.importance_beta2)
        self.finalized = False
        self.rank_changes = 0  # ranks pruned plus ranks added, over the run
        self._last_penalty: torch.Tensor | None = None
        self._orthogonality = OrthogonalityPlan()  # the penalty's gathers, rebuilt when a layout changes
        self._triplets = TripletPlan()  # the score's gathers, likewise
        self._module_sizes: dict[str, tuple[int, int]] = {}  # name -> (layout version, size)
        self.generator = torch.Generator().manual_seed(c.seed + 2) if c.seed is not None else None

    def _phases(self, total_steps: int | None) -> dict:
        """The schedule's settings (BudgetSchedule.resolve's keywords) from the config; None leaves a setting to the
        schedule's own rule."""
        c = self.config
        return {
            "warmup_frac": c.warmup_frac,
            "final_frac": c.final_frac,
            "t_init_steps": c.t_init_steps,
            "t_final_steps": c.t_final_steps,
            "interval": c.resize_every,
        }

    def _own_parameter_count(self) -> int:
        values = getattr(self.model, SVD_ATTR, None)
        return values.values.numel() if values is not None else 0

    def _scored_parameters(self) -> list[nn.Parameter]:
        """A and B of every module, in a fixed order, then E (one vector for all modules). Listed again only when a
        layout changed (a layer's factors are replaced only by a resize or a load, which bump its version) or E was
        replaced."""
        e = self.values.values
        version = sum(layer.layout_version for layer in self.layers.values())
        if self._scored is None or self._scored[0] != version or self._scored[1] is not e:
            listed = [p for layer in self.layers.values() for p in layer.adapter_parameters()] + [e]
            self._scored = (version, e, listed)
        return self._scored[2]

    # ------------------------------------------------------------------ E as the layer's gate
    def _make_gate(self, name: str) -> ValuesGate:
        """Module ``name``'s E as its layer's gate (:class:`ValuesGate`)."""
        return ValuesGate(self.values, name)

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """The adapters and task head at ``lr``; E in a group of its own at ``values_lr_ratio`` times it (in the
        adapters' group when the ratio is 1)."""
        groups = super().param_groups(lr, weight_decay)
        if self.values_lr_ratio != 1.0:
            groups.append(_split_off_values(groups[0], self.values.values, self.values_lr_ratio))
        return groups

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Also refused: an optimizer that does not hold E (while E is apart from the adapters)."""
        super().check_optimizer(optimizer)
        if not self.finalized and id(self.values.values) not in binding.held_ids(optimizer):
            raise ValueError(
                f"the optimizer does not hold {self.method_name}'s singular values E (model.{SVD_ATTR}): build it "
                "after dynarank.prepare_parameters(model) / DynaRankCallback(model), or with "
                "controller.build_optimizer()."
            )

    # ------------------------------------------------------------------ budgets
    def budget_used(self) -> int:
        """Current size in the budget's unit (total rank, or A and B parameters)."""
        return self.adapter_parameters() if self.budget_unit == "params" else self.total_rank()

    def _resolve_target(self) -> int:
        """The final budget in ``budget_unit`` (validated against the start)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the step protocol
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Add ``ortho_weight * dR/dw`` to the gradients of A and B (once per optimizer step)."""
        weight = self.ortho_weight
        if self.finalized or weight == 0:
            return
        penalty = add_orthogonality_gradient(self.layers.values(), weight, self._orthogonality)
        if penalty is not None:
            self._last_penalty = penalty

    def _resolved(self) -> dict:
        """The phases (steps) and the update's output scale the run trains with; the orthogonality weight, E's rate
        ratio and the adapters' start, and where they came from (the config, or the defaults)."""
        scales = {layer.scaling for layer in self.layers.values()}
        return {
            "t_init": self.schedule.t_init,
            "t_final": self.schedule.t_final,
            "resize_every": self.schedule.interval,
            "output_scale": scales.pop() if len(scales) == 1 else sorted(scales),
            "output_scale_source": output_scale_source(self.model),
            "ortho_weight": self.ortho_weight,
            "ortho_weight_source": self.ortho_weight_source,
            "values_lr_ratio": self.values_lr_ratio,
            "values_lr_ratio_source": self.values_lr_ratio_source,
            "svd_init": self.svd_init,
            "svd_init_source": self.svd_init_source,
        }

    @property
    def last_penalty(self) -> float | None:
        """R at the last step (read from the device only when asked for)."""
        return None if self._last_penalty is None else float(self._last_penalty)

    def after_step(self, optimizer: torch.optim.Optimizer) -> StepRecord:
        """Scores (t < T - t_final), a round when the schedule says so, E folded at the last step."""
        self.step += 1
        t = self.step
        record = BudgetRecord(step=t, phase=self.schedule.phase(t), budget_unit=self.budget_unit)
        if not self.finalized:
            if t < self.schedule.end:
                self.importance.track(self._scored_parameters())  # layers reshaped elsewhere (a restore)
                skipped = self.importance.update()
                if any(p.grad is not None for p in skipped):
                    self.warn_once(
                        "nonfinite-grad", "non-finite gradients on the adapters; their scores skip this step.", record
                    )
            if self.schedule.is_round(t, force_end=self.force_end_round):
                self.reallocate_round(t, record)
            if t >= self.schedule.end:
                self._drop_scores()  # ranks are final
            if self.fold_after_last_step and self.total_steps is not None and t >= self.total_steps:
                self.finalize()
        return self._finish(record)

    def _drop_scores(self) -> None:
        """Free what scoring ranks holds once ranks are final: the importance EMAs, the score's gathers and the list
        of scored parameters (built again, from the live ones, if asked for)."""
        self.importance.clear()
        self._triplets = TripletPlan()
        self._scored = None

    def reallocate_round(self, t: int, record: BudgetRecord) -> None:
        """One round of the method at step ``t``."""
        raise NotImplementedError

    def _finish(self, record: StepRecord) -> StepRecord:
        if isinstance(record, BudgetRecord):
            record.adapter_parameters = self.adapter_parameters()
            if record.budget is None:
                record.budget = self.budget_at(record.step)
        return super()._finish(record)

    def budget_at(self, t: int) -> int:
        """The budget in force at step ``t``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ scores and pruning
    def triplet_scores(self) -> dict[str, list[torch.Tensor]]:
        """Score of every rank, by module and group (importance.triplet_scores, for every module at once)."""
        params = self._scored_parameters()
        return self._triplets.scores(self.layers, params, self.importance.flat_scores(params))

    def prune_to_budget(self, t: int, record: BudgetRecord, floor: int | None = None) -> None:
        """Remove the lowest-scoring ranks until ``budget_at(t)`` holds (no group below ``floor``).

        At the end of the budgeting phase a target the plan could not reach is said once, with both sizes: the run
        ends above its budget (what is left has every group at its floor, or one rank in the model)."""
        record.budget = self.budget_at(t)
        excess = self.budget_used() - record.budget
        if excess > 0:
            self.apply_plan(self.plan_pruning(self.triplet_scores(), excess, floor), {}, record)
        used = self.budget_used()
        if t >= self.schedule.end and used > record.budget:
            floor = self.group_floor() if floor is None else floor
            self.warn_once(
                "budget-not-reached",
                f"{self.method_name} ends its budgeting phase at {used} {self.budget_unit}, above its target of "
                f"{record.budget}: no rank is left that pruning may remove (every group at its floor of {floor} "
                "rank(s), or one rank in the model). Raise the budget to what the run can reach.",
                record,
            )

    def group_floor(self) -> int:
        """Fewest ranks a group keeps when pruning to the budget: ``rank_floor``."""
        return self.config.rank_floor

    def slot_ceiling(self, layer: ElasticLoRALinear) -> int:
        """Most shared slots ``layer`` can have from now on: the ones it has (pruning only ever drops slots)."""
        return layer.n_slots

    def floor_size(self, keep: int, *, distinct: bool = False) -> int:
        """A and B parameters with every group at ``keep`` ranks: on the same shared slots in the 'shared' layout
        (the smallest size), or (``distinct``) on as many different slots as the layer can hold (the largest: what
        pruning every group to ``keep`` may leave, since pruning cannot move a rank onto another slot)."""
        return sum(floor_sizes(layer, keep, self.slot_ceiling(layer))[distinct] for layer in self.layers.values())

    def guards_shared_slots(self, keep: int) -> bool:
        """Whether pruning may need to hold shared slots common to the groups of a 'shared' layer (:class:`SharedSlots`)
        to keep the target reachable: a shrinking budget in parameters below ``floor_size(keep, distinct=True)``. A
        larger one is reached with the ranks chosen by score alone (no 'shared' layer: the two sizes are one, and a
        budget below it is refused)."""
        return (
            self.budget_unit == "params"
            and keep > 0
            and self.target_budget < self.start_budget
            and self.target_budget < self.floor_size(keep, distinct=True)
        )

    def shared_slots(self, keep: int) -> SharedSlots | None:
        """The guard a plan that removes ranks consults (None: it needs none, :meth:`guards_shared_slots`)."""
        if not self.guards_shared_slots(keep):
            return None
        return SharedSlots(self.layers, keep, self.target_budget, self.slot_ceiling)

    def plan_pruning(self, scores: dict[str, list[torch.Tensor]], excess: int, floor: int | None = None) -> Plan:
        """The lowest-scoring ranks whose removal frees at least ``excess`` (ranks or parameters).

        No group goes below ``floor`` (default ``rank_floor``), and the model keeps at least one rank. A rank whose
        removal would put the target out of reach (a 'shared' layer's groups no longer all on ``floor`` common slots
        when the budget needs them there: :class:`SharedSlots`) is kept too.
        """
        floor = self.config.rank_floor if floor is None else floor
        guard = self.shared_slots(floor)
        # Every rank by ascending score, ties by (module, group, position): one stable sort of the scores laid end
        # to end in that order; a rank's group is found from its place only for the ranks the loop reaches.
        flat, starts, owners = _laid_out(self.layers, scores)
        ranked = torch.argsort(flat, stable=True).tolist() if flat is not None else []
        ranks: dict[str, list[int]] = {}  # of the modules the plan touches, read when first reached
        books = {}
        plan: Plan = {}
        freed, left = 0, self.total_rank()
        for k in ranked:
            if freed >= excess or left <= 1:
                break
            piece = bisect.bisect_right(starts, k) - 1
            (name, g), j = owners[piece], k - starts[piece]
            layer = self.layers[name]
            if name not in ranks:
                ranks[name], books[name] = layer.ranks, layer.costs.book(layer.slots)
            if ranks[name][g] <= floor:
                continue
            slot = layer.slot_tuple[g][j]
            if guard is not None and not guard.remove(name, slot):
                continue
            cost = books[name].remove(slot)
            freed += cost if self.budget_unit == "params" else 1
            ranks[name][g] -= 1
            left -= 1
            plan.setdefault(name, {}).setdefault(g, []).append(j)
        return plan

    def module_size(self, name: str) -> int:
        """``costs.size_after(slots, {}, {})`` of module ``name``, computed once per layout."""
        layer = self.layers[name]
        cached = self._module_sizes.get(name)
        if cached is None or cached[0] != layer.layout_version:
            cached = (layer.layout_version, layer.costs.size_after(layer.slots, {}, {}))
            self._module_sizes[name] = cached
        return cached[1]

    # ------------------------------------------------------------------ physical resizing
    def _carried(self) -> list[torch.optim.Optimizer]:
        """Everything whose per-element state follows a resize: the optimizers and the score EMAs."""
        return [*self.optimizers, self.importance.carrier]

    def apply_plan(self, prune: Plan, grow: dict[str, dict[int, int]], record: BudgetRecord) -> dict:
        """Remove ``prune`` positions, then append ``grow`` ranks; E and every state follow.

        Returns {module: [(group, position), ...]} of the appended ranks (after the removal).
        """
        added: dict[str, list[tuple[int, int]]] = {}
        # Where each entry of the new E comes from, in the old numbering: a module the plan leaves alone keeps its
        # entries in place, so a run of such modules is one range; only a touched module's entries are worked out.
        sources: list[torch.Tensor] = []
        offset = fresh = 0  # the module's first entry in the old E; how many entries are appended so far
        kept_from = 0  # start of the current run of untouched modules' entries
        total = self.values.values.shape[0]
        for name, layer in self.layers.items():
            width = layer.factors()[1].shape[1]
            positions = {g: js for g, js in prune[name].items() if js} if name in prune else {}
            counts = {g: n for g, n in grow[name].items() if n > 0} if name in grow else {}
            if not positions and not counts:
                offset += width
                continue
            sources.append(torch.arange(kept_from, offset))
            self.importance.hand_over(layer.adapter_parameters())  # its score EMAs follow the resize
            source = torch.arange(width)
            if positions:
                source = source[self._kept_columns(layer, positions)]
                record.params_removed += layer.remove_slots(positions, optimizer=self._carried())
                record.pruned += sum(len(js) for js in positions.values())
            if counts:
                source, new = self._grown_columns(layer, counts, source, total - offset + fresh)
                fresh += new
                record.params_added += layer.add_slots(counts, optimizer=self._carried(), generator=self.generator)
                record.expanded += sum(counts.values())
                old = [r - counts.get(g, 0) for g, r in enumerate(layer.ranks)]
                added[name] = [(g, j) for g in sorted(counts) for j in range(old[g], old[g] + counts[g])]
            sources.append(source + offset)
            offset += width
            kept_from = offset
        sources.append(torch.arange(kept_from, offset))
        if record.pruned or record.expanded:
            e = self.values.values
            fill = torch.full((fresh,), self.new_rank_value, dtype=e.dtype) if fresh else None
            self.importance.hand_over([e])
            self.values.values = reindex_parameter(e, 0, torch.cat(sources), fill, optimizer=self._carried())
            self.values.respan(self.layers)
            record.resized = True
            self.rank_changes += record.pruned + record.expanded
            # Nothing keeps a replaced tensor (nor its gradient) alive into the next step: the list of scored
            # parameters is made again when next asked for, the penalty's gathers (which read the tensors) now.
            self._scored = None
            if self._orthogonality.widths:
                self._orthogonality.widths_for(self.layers.values())
            if self.config.reset_optimizer_on_resize:
                for opt in self.optimizers:  # as the authors' code, which rebuilds its optimizer
                    opt.state.clear()
        return added

    @staticmethod
    def _kept_columns(layer: ElasticLoRALinear, positions: dict[int, list[int]]) -> torch.Tensor:
        """Packed group-side columns that survive removing ``positions`` (in order)."""
        kept, offset = [], 0
        for g, r in enumerate(layer.ranks):
            drop = set(positions.get(g, ()))
            kept.extend(offset + j for j in range(r) if j not in drop)
            offset += r
        return torch.tensor(kept, dtype=torch.long)

    @staticmethod
    def _grown_columns(
        layer: ElasticLoRALinear, counts: dict[int, int], source: torch.Tensor, appended_at: int
    ) -> tuple[torch.Tensor, int]:
        """``source`` after appending ``counts[g]`` columns to group g (add_slots appends each group's new
        columns after its own); a new column points past the old E (``appended_at`` relative to this module's
        start, counting the entries appended for earlier modules). Returns (source, columns appended)."""
        out, offset, new = [], 0, 0
        for g, r in enumerate(layer.ranks):  # ranks before the growth (after any removal)
            out.append(source[offset : offset + r])
            k = counts.get(g, 0)
            out.append(torch.arange(appended_at + new, appended_at + new + k))
            new += k
            offset += r
        return torch.cat(out), new

    def finish(self) -> None:
        self.finalize()

    @torch.no_grad()
    def finalize(self) -> None:
        """Fold E into the group side (column c times E[c]) and drop the gate and ``model.dynarank_svd``.

        Runs by itself after the last step (``fold_after_last_step``; the training loop and the Trainer callback
        run it in ``finish()``, after the last step's checkpoint); the function is unchanged, and the model is then a
        plain elastic LoRA model that ``save_adapter``, ``unwrap`` and ``export_peft`` handle as
        any other. Call it yourself when a run stops before ``total_steps``. E leaves the bound optimizers too (its
        param group and its state; a group that held E alone stays, empty, so that a scheduler's groups still match).
        """
        if self.finalized:
            return
        for name, layer in self.layers.items():
            e = self.values.of(name).detach().to(layer.group_weight.dtype)
            layer.group_weight.mul_(e.unsqueeze(0))  # (d_g, T) * (1, T)
            layer.set_gate(None)
        for optimizer in self.optimizers:
            drop_parameter(optimizer, self.values.values)
        self._drop_scores()
        self._orthogonality = OrthogonalityPlan()  # no penalty once E is folded: its gathers go too
        if SVD_ATTR in dict(self.model.named_children()):
            del self.model._modules[SVD_ATTR]
        self.forget_sizes()
        self.finalized = True

    # ------------------------------------------------------------------ read-outs and state
    def held_bytes(self) -> int:
        """The importance EMAs (two per scored element while scores are kept), the score's gathers (an index entry
        per scored element of A and B, until ranks are final) and the orthogonality penalty's (until E is folded)."""
        return self.importance.held_bytes() + self._triplets.held_bytes() + self._orthogonality.held_bytes()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(
            {
                "rank_changes": self.rank_changes,
                "finalized": self.finalized,
                "start_budget": self.start_budget,
                "target_budget": self.target_budget,
                "budget_unit": self.budget_unit,
                # what the run trained with where its config left them to the defaults of its version
                "settings": {name: getattr(self, name) for name in RESTORED_SETTINGS},
            }
        )
        return state

    required_state = (*RankController.required_state, "start_budget", "target_budget")

    def check_state(self, state: dict) -> None:
        super().check_state(state)
        saved = state.get("settings") or {}
        for name in RESTORED_SETTINGS:
            source = getattr(self, f"{name}_source")
            if name in saved and saved[name] != getattr(self, name) and (source == "config" or name in GROUP_SETTINGS):
                given = "gives" if source == "config" else "resolves to (dynarank's defaults now)"
                raise ValueError(
                    f"this controller state trained with {name}={saved[name]!r}, and this model's config {given} "
                    f"{name}={getattr(self, name)!r}: continue the run as it trained, with {name}={saved[name]!r} in "
                    "its config."
                )
        unit = state.get("budget_unit", self.budget_unit)
        if unit != self.budget_unit:
            raise ValueError(
                f"this controller state keeps its budget in {unit}, this controller in {self.budget_unit}: the model "
                "is attached with another budget (target_rank / target_params) than the run that saved it."
            )

    def _load_state(self, state: dict) -> None:
        super()._load_state(state)
        for name, value in (state.get("settings") or {}).items():  # left to the defaults: as the run trained
            if name in RESTORED_SETTINGS and value != getattr(self, name):
                logger.info(
                    "dynarank: %s=%r as the restored run trained (the defaults now: %r).",
                    name,
                    value,
                    getattr(self, name),
                )
                setattr(self, name, value)
                setattr(self, f"{name}_source", "the restored run's (the defaults of the version it started with)")
        self.rank_changes = int(state.get("rank_changes", 0))
        self.start_budget = state["start_budget"]
        self.target_budget = state["target_budget"]
        if state.get("finalized") and not self.finalized:
            self.finalize()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The importance EMAs of every scored parameter, by position, and the new-rank generator."""
        tensors = {}
        for i, p in enumerate(self._scored_parameters()):
            state = self.importance.state_of(p)
            if state:
                tensors[f"importance.{i}.sensitivity"] = state["sensitivity"]
                tensors[f"importance.{i}.uncertainty"] = state["uncertainty"]
        if self.generator is not None:
            tensors["generator"] = self.generator.get_state()
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.finalized:
            return
        params = self._scored_parameters()  # the restored layers' parameters
        self.importance.track(params)
        self.importance.clear()
        for i, p in enumerate(params):
            key = f"importance.{i}."
            if key + "sensitivity" in tensors:
                sens, unc = tensors[key + "sensitivity"], tensors[key + "uncertainty"]
                if sens.shape != p.shape:
                    raise ValueError(
                        f"importance state {i} has shape {tuple(sens.shape)}, the parameter {tuple(p.shape)}."
                    )
                self.importance.set_state(p, sens, unc)
        if self.generator is not None and "generator" in tensors:
            self.generator.set_state(tensors["generator"])


class SharedSlots:
    """Keeps a budget in parameters reachable while a plan removes ranks from 'shared' layers.

    In the 'shared' layout a slot's row is paid once however many groups use it, so the smallest adapter has every
    group's last ``keep`` ranks on the same slots. Pruning cannot move a rank onto another slot: groups pruned to
    their floor on different slots stay there, and no later pruning brings the layer down to that size. A layer is
    held while ``keep`` of its slots are used by every group (its floor is then the smallest size,
    :func:`floor_sizes`); a layer not held is counted at the most its floor can cost (each group's ranks on slots
    of their own). The sum of those is a size pruning can always reach. A removal that would release a held layer
    is refused when the released layer's larger floor would put that sum above the target; so is nothing else.
    A budget that needs no layer held (:meth:`SVDController.guards_shared_slots`) builds no guard, and ranks go by
    score alone. (A group uses a slot at most once, so a slot is common when all the layer's groups use it; growth
    only adds uses, so a layer is never released by it.)
    """

    def __init__(
        self, layers: dict[str, ElasticLoRALinear], keep: int, target: int, ceiling: Callable[[ElasticLoRALinear], int]
    ) -> None:
        self.keep = keep
        self.layers = layers
        self._users: dict[str, Counter] = {}  # held module -> slot -> groups that use it, as the plan stands
        self._common: dict[str, int] = {}  # held module -> slots every group uses
        self._release: dict[str, int] = {}  # held module -> what releasing it adds to the reachable size
        reachable = 0
        for name, layer in layers.items():
            smallest, largest = floor_sizes(layer, keep, ceiling(layer))
            users = Counter(s for group in layer.slot_tuple for s in group)
            common = sum(1 for n in users.values() if n == layer.n_groups)
            if largest > smallest and common >= keep:
                self._users[name], self._common[name], self._release[name] = users, common, largest - smallest
            reachable += smallest if name in self._users else largest
        self.slack = target - reachable  # what releasing layers may still add

    def remove(self, name: str, slot: int) -> bool:
        """Take one use of ``slot`` away from module ``name`` unless that puts the target out of reach; whether it
        did."""
        users = self._users.get(name)
        if users is None:
            return True  # not a 'shared' layer of several groups, or no longer held
        if users[slot] == self.layers[name].n_groups:
            if self._common[name] == self.keep:  # its last common slots: the layer would be released
                if self._release[name] > self.slack:
                    return False
                self.slack -= self._release[name]
                del self._users[name]
                return True
            self._common[name] -= 1
        users[slot] -= 1
        return True


def floor_sizes(layer: ElasticLoRALinear, keep: int, slot_ceiling: int) -> tuple[int, int]:
    """(smallest, largest) A and B parameters of ``layer`` with every group at ``keep`` ranks: in the 'shared' layout
    the groups' ranks on the same slots, or on as many different ones as there can be (keep x groups, at most the
    ``slot_ceiling`` slots the layer can have); one size in the 'own' layout or with one group."""
    costs, groups = layer.costs, layer.n_groups
    smallest = costs.size_of_ranks([keep] * groups)
    if costs.layout != "shared" or groups < 2:
        return smallest, smallest
    slots = min(keep * groups, max(keep, slot_ceiling))
    return smallest, slots * costs.other_dim + keep * groups * costs.group_size


def _setting(model: nn.Module, name: str, default, kind=float) -> tuple:
    """(An SVD setting's value, where it came from): the attached config's ``name`` (as ``kind``), else
    ``default(method, task)``, the defaults study's choice for the method and the model's kind of task."""
    config = getattr(model, ATTACHED_ATTR)
    if getattr(config, name) is not None:
        return kind(getattr(config, name)), "config"
    task = task_of(model)
    return default(config.method, task), f"{SOURCE}, {task}"


# Settings an SVD run resolves from the defaults when its config leaves them unset, saved with its state: a run
# restored under a version whose defaults differ continues as it trained (check_state, _load_state). E's rate ratio
# shapes the optimizer's groups, built before the state loads, so a differing one is refused instead.
RESTORED_SETTINGS = ("ortho_weight", "values_lr_ratio", "svd_init")
GROUP_SETTINGS = ("values_lr_ratio",)


def output_scale_source(model: nn.Module) -> str:
    """Where the update's output scale came from: the config's lora_alpha or alpha_at, or the defaults study's
    alpha_at for the method and the model's kind of task (AdaLoRA-style); else lora_alpha's default, r (scale 1)."""
    config = getattr(model, ATTACHED_ATTR)
    if config.lora_alpha is not None:
        return "config (lora_alpha)"
    if getattr(config, "alpha_at", None) is not None:
        return f"config (alpha_at={config.alpha_at!r})"
    task = task_of(model)
    at = DEFAULT_ALPHA_AT[task].get(config.method)
    return "lora_alpha unset: r (scale 1)" if at is None else f"{SOURCE}, {task} (alpha_at={at!r})"


def svd_init_of(model: nn.Module) -> tuple[str, str]:
    """(How fresh adapters start, 'adalora' or 'lora'; where it came from) for a model attached with an SVD method."""
    return _setting(model, "svd_init", default_svd_init, str)


def values_lr_ratio_of(model: nn.Module) -> tuple[float, str]:
    """(E's learning rate over the adapters', where it came from) for a model attached with an SVD method."""
    return _setting(model, "values_lr_ratio", default_values_lr_ratio)


def shared_values_group(optimizer: torch.optim.Optimizer, model: nn.Module) -> tuple[dict, float, str] | None:
    """(The group of ``optimizer`` that holds E beside other parameters, E's rate ratio, its source) when the method
    trains E at another rate than that group's (``values_lr_ratio`` != 1); None otherwise (no E, not held, the ratio
    1, or E already alone in its group)."""
    values = getattr(model, SVD_ATTR, None)
    if values is None:
        return None
    ratio, source = values_lr_ratio_of(model)
    group = next((g for g in optimizer.param_groups if any(p is values.values for p in g["params"])), None)
    if ratio == 1.0 or group is None or len(group["params"]) == 1:
        return None
    return group, ratio, source


def separate_values(optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
    """Give E (``model.dynarank_svd``) a group of its own in ``optimizer`` at ``values_lr_ratio`` times the rate of the
    group that held it (its other settings copied), for an optimizer built elsewhere (a Trainer's) before its
    learning-rate schedule is. Returns whether a group was made (:func:`shared_values_group`)."""
    found = shared_values_group(optimizer, model)
    if found is None:
        return False
    group, ratio, _ = found
    optimizer.add_param_group(_split_off_values(group, getattr(model, SVD_ATTR).values, ratio))
    return True


def _split_off_values(group: dict, e: nn.Parameter, ratio: float) -> dict:
    """Take E out of ``group`` (in place) and return E's own group: ``group``'s settings, its rates (``lr``, and a
    scheduler's ``initial_lr``) times ``ratio``."""
    group["params"] = [p for p in group["params"] if p is not e]
    alone = {k: v for k, v in group.items() if k != "params"}
    for key in ("lr", "initial_lr"):
        if key in alone:
            alone[key] = alone[key] * ratio
    return {**alone, "params": [e], "name": "E"}


def _laid_out(
    names: Iterable[str], scores: dict[str, list[torch.Tensor]]
) -> tuple[torch.Tensor | None, list[int], list[tuple[str, int]]]:
    """Every rank's score laid end to end in (module in ``names``' order, group, position) order, on the CPU in the
    scores' dtype: (scores (n,), each group's first place, each group's (module, group)). A group without ranks takes
    no place; None: no rank at all."""
    pieces, starts, owners, n = [], [], [], 0
    for name in names:
        for g, s in enumerate(scores.get(name, ())):  # s: (r_g,)
            if s.numel():
                pieces.append(s.reshape(-1))
                starts.append(n)
                owners.append((name, g))
                n += s.numel()
    return (torch.cat(pieces).cpu() if pieces else None), starts, owners


class ValuesGate:
    """Module ``name``'s E as its layer's gate (G, r_max), padded slots reading a zero. The module's part of E
    comes from ``SVDValues.pieces`` (one split of E for all modules). Where every group has the same rank the
    packed columns are g * r + j: the gate is a view of that part. Otherwise one index into it padded with a
    zero. The gate is handed over as that part and how to read it (``GateGather``): the fused update reads it
    inside its own node. What the gate reads is worked out once per layout (the layer's version, its width, E's
    device).

    An object, not a closure, so that ``copy.deepcopy(model)`` gives the copy's layers gates that read the copy's E
    (a closure is copied by reference: the copy read the original's E)."""

    def __init__(self, values: SVDValues, name: str) -> None:
        self.values = values
        self.name = name
        self._key: tuple | None = None
        self._index: torch.Tensor | None = None  # the index into the part, padded (None: a view)
        self._shape: tuple[int, int] | None = None  # (G, r_max)

    def __call__(self, layer: ElasticLoRALinear) -> GateGather:
        e = self.values.pieces()[self.name]  # (T,)
        key = (layer.layout_version, e.shape[0], e.device)
        if self._key != key:
            ranks, index = layer.ranks, layer.column_index
            if len(set(ranks)) <= 1:
                self._index = None
            else:
                width = layer.group_weight.shape[1]
                self._index = torch.where(index < width, index, width).to(e.device)  # padded slots read a zero
            self._key, self._shape = key, (index.shape[0], index.shape[1])
        return GateGather(e, self._index, self._shape)
