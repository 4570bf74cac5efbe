"""AdaLoRA on the rank-elastic engine, and the SVD-form machinery it shares with ElaLoRA.

Per rank group g (an attention head, or the whole matrix) the update is AdaLoRA's SVD form

    delta_g(x) = scaling * P_g diag(E_g) Q_g x        scaling = lora_alpha / r (never changes)

with P = the layer's B side, Q = its A side (stored as docs/architecture.md says) and E a
controller-owned vector, supplied to the layer as its gate (the gate multiplies each slot:
exactly diag(E)). A fresh adapter starts as both papers' code: P, Q ~ N(0, 0.02), E = 0.

    R = mean over (groups g with r_g > 0, factor X in {Q_g, P_g^T}) of ||X X^T - I||_F

``ortho_weight * dR/dw`` is added to the gradients in the optimizer's pre-step hook: once per
optimizer step, whatever computed the loss (PEFT adds R inside ``forward`` and silently skips
it when the loss is computed outside the model). Importance scores: importance.py.

AdaLoRA (prune only): at every round (schedules.py, forced at T - t_final) the lowest-scoring
ranks are removed PHYSICALLY until the budget holds,

    budget(t) = floor(target + (start - target) * (1 - p)^3)      in ranks or in parameters,

so parameters, optimizer state and compute fall while training (PEFT masks E instead and
keeps every initial rank allocated). Optimizer moments of kept ranks are carried.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layer import ElasticLoRALinear
from ..optim_state import reindex_parameter
from .base import BudgetRecord, RankController, StepRecord
from .importance import ImportanceEMA, triplet_scores
from .schedules import BudgetSchedule, cubic_budget

INIT_STD = 0.02  # P, Q ~ N(0, 0.02) (AdaLoRA / ElaLoRA)
DEFAULT_TARGET_FRACTION = 2 / 3  # target_rank=None: PEFT AdaLoRA's default init_r 12 -> target_r 8
SVD_ATTR = "dynarank_svd"

Plan = dict[str, dict[int, list[int]]]  # module -> group -> rank positions


def values_key(module_name: str) -> str:
    """The key of a module's E in ``model.dynarank_svd.values`` (dots are not allowed in module keys)."""
    return module_name.replace(".", "__")


class SVDValues(nn.Module):
    """E of every adapted module: a (T,) vector aligned with the layer's packed group-side columns.

    A submodule of the model (``model.dynarank_svd``) so that ``.to()`` and distributed wrappers
    see it. Creating it initialises fresh adapters as AdaLoRA does (P, Q ~ N(0, 0.02), E = 0); an
    adapter that already carries an update (a loaded one) keeps it, with E = 1.
    """

    def __init__(self, layers: dict[str, ElasticLoRALinear], generator: torch.Generator | None = None) -> None:
        super().__init__()
        values = {}
        for name, layer in layers.items():
            fresh = init_svd_factors(layer, generator)
            w = layer.group_weight
            values[values_key(name)] = nn.Parameter(
                torch.full((w.shape[1],), 0.0 if fresh else 1.0, dtype=w.dtype, device=w.device)
            )
        self.values = nn.ParameterDict(values)

    def of(self, name: str) -> nn.Parameter:
        return self.values[values_key(name)]

    def replace(self, name: str, param: nn.Parameter) -> None:
        self.values[values_key(name)] = param

    def match_layout(self, layers: dict[str, ElasticLoRALinear]) -> None:
        """Give every E the size of its layer's current rank layout (values zero; a restore fills them).

        For code that reshapes layers outside the controller (``set_slots`` when restoring a checkpoint).
        """
        for name, layer in layers.items():
            w, e = layer.group_weight, self.of(name)
            if e.shape[0] != w.shape[1]:
                self.replace(name, nn.Parameter(w.new_zeros(w.shape[1]), requires_grad=e.requires_grad))


@torch.no_grad()
def init_svd_factors(layer: ElasticLoRALinear, generator: torch.Generator | None = None) -> bool:
    """Draw P and Q from N(0, 0.02) if the adapter is fresh (its B side is zero); returns whether it was."""
    b_side = layer.group_weight if layer.split == "rows" else layer.shared_weight
    if b_side.numel() and bool(b_side.any()):
        return False
    for p in layer.adapter_parameters():
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype) * INIT_STD
        p.copy_(noise.to(p.device))
    return True


def ensure_svd_values(model: nn.Module, layers: dict[str, ElasticLoRALinear], seed: int | None) -> SVDValues:
    """``model.dynarank_svd``, created (and the adapters initialised) on the first call."""
    values = getattr(model, SVD_ATTR, None)
    if values is None:
        generator = torch.Generator().manual_seed(seed + 1) if seed is not None else None
        values = SVDValues(layers, generator)
        model.add_module(SVD_ATTR, values)
    return values


def row_forms(layer: ElasticLoRALinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every group's factors as row stacks: (shared (G, r_max, d_other), group (G, r_max, d_g), valid (G, r_max)).

    Rows: shared = Q_g (A rows), group = P_g^T (B columns); cols: shared = P_g^T, group = Q_g.
    Padded positions are zero rows.
    """
    shared = F.pad(layer.shared_weight, (0, 0, 0, 1))[layer.slot_index]  # (G, r_max, d_other)
    group = F.pad(layer.group_weight, (0, 1))[:, layer.column_index].permute(1, 2, 0)  # (G, r_max, d_g)
    return shared, group, layer.slot_index < layer.n_slots


def orthogonality_penalty(layers) -> torch.Tensor | None:
    """R = mean over groups with r_g > 0 and over both factors X of ||X X^T - I||_F (None: no rank left)."""
    terms = []
    for layer in layers:
        if layer.max_rank == 0:
            continue
        shared, group, valid = row_forms(layer)
        eye = torch.diag_embed(valid.to(shared.dtype))  # (G, r_max, r_max), zero at padded positions
        live = valid.any(dim=1)  # groups that have a rank
        for x in (shared, group):
            gram = x @ x.transpose(1, 2)  # (G, r_max, r_max)
            terms.append(torch.linalg.matrix_norm(gram - eye)[live])  # (G_live,)
    if not terms:
        return None
    return torch.cat(terms).mean()


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

    def __init__(self, model: nn.Module, total_steps: int | None = None) -> None:
        super().__init__(model, total_steps)
        c = self.config
        self.schedule = BudgetSchedule.resolve(
            total_steps,
            warmup_frac=c.warmup_frac,
            final_frac=c.final_frac,
            t_init_steps=c.t_init_steps,
            t_final_steps=c.t_final_steps,
            interval=c.resize_every,
            method=self.method_name,
            need_interior_round=self.need_interior_round,
        )
        self.budget_unit = "params" if c.target_params is not None else "rank"
        self.start_budget = self.budget_used()
        self.target_budget = self._resolve_target()  # validated before the model is touched
        self.values = ensure_svd_values(model, self.layers, c.seed)
        self.values.match_layout(self.layers)  # layers reshaped since E was created (a load)
        for name, layer in self.layers.items():
            layer.set_gate(self._make_gate(name))
        self.importance = ImportanceEMA(self._scored_parameters(), c.importance_beta1, c.importance_beta2)
        self.finalized = False
        self.rank_changes = 0  # ranks pruned plus ranks added, over the run
        self.last_penalty: float | None = None
        self.generator = torch.Generator().manual_seed(c.seed + 2) if c.seed is not None else None

    def _scored_parameters(self) -> list[nn.Parameter]:
        """A, B and E of every module, in a fixed order."""
        return [p for name, layer in self.layers.items() for p in (*layer.adapter_parameters(), self.values.of(name))]

    # ------------------------------------------------------------------ E as the layer's gate
    def _make_gate(self, name: str):
        values = self.values

        def gate(layer: ElasticLoRALinear) -> torch.Tensor:
            e = values.of(name)  # (T,) one value per packed column
            return F.pad(e, (0, 1))[layer.column_index]  # (G, r_max); padded slots read a zero

        return gate

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if any(id(p) not in held for p in self.values.parameters()):
            raise ValueError(
                f"the optimizer does not hold {self.method_name}'s singular values E (model.{SVD_ATTR}): build it "
                "after dynarank.prepare_parameters(model) / DynaRankCallback(model), or with "
                "controller.build_optimizer()."
            )
        super().bind(optimizer)

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
        weight = self.config.ortho_weight
        if self.finalized or weight == 0:
            return
        params = [p for layer in self.layers.values() for p in layer.adapter_parameters() if p.numel()]
        with torch.enable_grad():
            penalty = orthogonality_penalty(self.layers.values())
            if penalty is None:
                return
            grads = torch.autograd.grad(penalty * weight, params, allow_unused=True)
        self.last_penalty = float(penalty.detach())
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach()
            else:
                p.grad.add_(g)

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
                self.importance.clear()  # ranks are final: the scores' memory is freed
            if self.total_steps is not None and t >= self.total_steps:
                self.finalize()
        return self._finish(record)

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
        """Score of every rank, by module and group (importance.triplet_scores)."""
        score = self.importance.score
        return {
            name: triplet_scores(
                layer, score(layer.shared_weight), score(layer.group_weight), score(self.values.of(name))
            )
            for name, layer in self.layers.items()
        }

    def prune_to_budget(self, t: int, record: BudgetRecord, floor: int | None = None) -> None:
        """Remove the lowest-scoring ranks until ``budget_at(t)`` holds (no group below ``floor``)."""
        record.budget = self.budget_at(t)
        excess = self.budget_used() - record.budget
        if excess > 0:
            self.apply_plan(self.plan_pruning(self.triplet_scores(), excess, floor), {}, record)

    def plan_pruning(self, scores: dict[str, list[torch.Tensor]], excess: int, floor: int | None = None) -> Plan:
        """The lowest-scoring ranks whose removal frees at least ``excess`` (ranks or parameters).

        No group goes below ``floor`` (default ``rank_floor``), and the model keeps at least one rank.
        """
        floor = self.config.rank_floor if floor is None else floor
        order = list(self.layers)
        ranked = sorted(
            (float(v), order.index(name), g, j)
            for name, groups in scores.items()
            for g, s in enumerate(groups)
            for j, v in enumerate(s.tolist())
        )
        ranks = {name: layer.ranks for name, layer in self.layers.items()}
        usage = {name: _slot_usage(layer) for name, layer in self.layers.items()}
        plan: Plan = {}
        freed, left = 0, self.total_rank()
        for _, i, g, j in ranked:
            if freed >= excess or left <= 1:
                break
            name = order[i]
            layer = self.layers[name]
            if ranks[name][g] <= floor:
                continue
            slot = layer.slots[g][j]
            usage[name][slot] -= 1
            cost = layer.group_size + (layer.other_dim if usage[name][slot] == 0 else 0)
            freed += cost if self.budget_unit == "params" else 1
            ranks[name][g] -= 1
            left -= 1
            plan.setdefault(name, {}).setdefault(g, []).append(j)
        return plan

    # ------------------------------------------------------------------ physical resizing
    def _carried(self) -> list[torch.optim.Optimizer]:
        """Everything whose per-element state follows a resize: the optimizers and the score EMAs."""
        return [*self.optimizers, self.importance.carrier]

    def apply_plan(self, prune: Plan, grow: dict[str, dict[int, int]], record: BudgetRecord) -> dict:
        """Remove ``prune`` positions, then append ``grow`` ranks; E and every state follow.

        Returns {module: [(group, position), ...]} of the appended ranks (after the removal).
        """
        added: dict[str, list[tuple[int, int]]] = {}
        for name, layer in self.layers.items():
            positions = {g: js for g, js in prune.get(name, {}).items() if js}
            if positions:
                record.params_removed += self._remove(name, layer, positions)
                record.pruned += sum(len(js) for js in positions.values())
            counts = {g: n for g, n in grow.get(name, {}).items() if n > 0}
            if counts:
                record.params_added += self._add(name, layer, counts, added)
                record.expanded += sum(counts.values())
        if record.pruned or record.expanded:
            record.resized = True
            self.rank_changes += record.pruned + record.expanded
            if self.config.reset_optimizer_on_resize:
                for opt in self.optimizers:  # as the authors' code, which rebuilds its optimizer
                    opt.state.clear()
        return added

    def _remove(self, name: str, layer: ElasticLoRALinear, positions: dict[int, list[int]]) -> int:
        kept, offset = [], 0
        for g, r in enumerate(layer.ranks):
            drop = set(positions.get(g, ()))
            kept.extend(offset + j for j in range(r) if j not in drop)
            offset += r
        removed = layer.remove_slots(positions, optimizer=self._carried())
        self._reindex_values(name, torch.tensor(kept, dtype=torch.long), None)
        return removed

    def _add(self, name: str, layer: ElasticLoRALinear, counts: dict[int, int], added: dict) -> int:
        old, n_cols = layer.ranks, sum(layer.ranks)
        grown = layer.add_slots(counts, optimizer=self._carried(), generator=self.generator)
        source, offset, appended = [], 0, n_cols
        for g, r in enumerate(old):  # add_slots appends each group's new columns after its own
            source.extend(range(offset, offset + r))
            source.extend(range(appended, appended + counts.get(g, 0)))
            appended += counts.get(g, 0)
            offset += r
        fill = torch.full((appended - n_cols,), self.new_rank_value, dtype=self.values.of(name).dtype)
        self._reindex_values(name, torch.tensor(source, dtype=torch.long), fill)
        added[name] = [(g, j) for g in sorted(counts) for j in range(old[g], old[g] + counts[g])]
        return grown

    def _reindex_values(self, name: str, source: torch.Tensor, appended: torch.Tensor | None) -> None:
        old = self.values.of(name)
        self.values.replace(name, reindex_parameter(old, 0, source, appended, optimizer=self._carried()))

    def finish(self) -> None:
        self.finalize()

    @torch.no_grad()
    def finalize(self) -> None:
        """Fold E into the group side (column c times E[c]) and drop the gate and ``model.dynarank_svd``.

        Runs by itself after the last step; the function is unchanged, and the model is then a
        plain elastic LoRA model that ``save_adapter``, ``unwrap`` and ``export_peft`` handle as
        any other. Call it yourself when a run stops before ``total_steps``.
        """
        if self.finalized:
            return
        for name, layer in self.layers.items():
            e = self.values.of(name).detach().to(layer.group_weight.dtype)
            layer.group_weight.mul_(e.unsqueeze(0))  # (d_g, T) * (1, T)
            layer.set_gate(None)
        self.importance.clear()
        if SVD_ATTR in dict(self.model.named_children()):
            del self.model._modules[SVD_ATTR]
        self.finalized = True

    # ------------------------------------------------------------------ read-outs and state
    def held_bytes(self) -> int:
        """The importance EMAs (two per scored element while scores are kept)."""
        return sum(
            t.numel() * t.element_size()
            for state in self.importance.carrier.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(
            {
                "rank_changes": self.rank_changes,
                "finalized": self.finalized,
                "start_budget": self.start_budget,
                "target_budget": self.target_budget,
                "budget_unit": self.budget_unit,
            }
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rank_changes = int(state.get("rank_changes", 0))
        self.start_budget = state["start_budget"]
        self.target_budget = state["target_budget"]
        if state.get("finalized") and not self.finalized:
            self.finalize()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The importance EMAs of every scored parameter, by position, and the new-rank generator."""
        tensors = {}
        for i, p in enumerate(self._scored_parameters()):
            state = self.importance.carrier.state.get(p)
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


def _slot_usage(layer: ElasticLoRALinear) -> dict[int, int]:
    """How many groups use each shared slot (1 everywhere in the 'own' layout)."""
    usage: dict[int, int] = {}
    for slots in layer.slots:
        for s in slots:
            usage[s] = usage.get(s, 0) + 1
    return usage


class AdaLoRAController(SVDController):
    """AdaLoRA with physical pruning: ranks scored by importance fall to a budget on a cubic schedule.

    Args:
        model: a model returned by ``dynarank.attach(model, DynaRankConfig(method="adalora", ...))``.
        total_steps: optimizer steps of the run.
    """

    method_name = "AdaLoRA"
    force_end_round = True  # the target is reached exactly at T - t_final
    need_interior_round = False  # a single pruning at T - t_final is a legitimate (if abrupt) schedule

    def _resolve_target(self) -> int:
        """round(target_rank x groups) ranks, or target_params; below the start, above the floor."""
        c = self.config
        floor_ranks = c.rank_floor * sum(layer.n_groups for layer in self.layers.values())
        if self.budget_unit == "rank":
            target_rank = c.target_rank if c.target_rank is not None else DEFAULT_TARGET_FRACTION * c.r
            target = round(target_rank * sum(layer.n_groups for layer in self.layers.values()))
            lowest = max(1, floor_ranks)
        else:
            target = c.target_params
            lowest = min(layer.group_size + layer.other_dim for layer in self.layers.values())
        if not lowest <= target < self.start_budget:
            raise ValueError(
                f"AdaLoRA's target budget ({target} {self.budget_unit}) must be below the start ({self.start_budget}) "
                f"and at least {lowest} (rank_floor and one rank): change target_rank / target_params or r."
            )
        return target

    def reallocate_round(self, t: int, record: BudgetRecord) -> None:
        """AdaLoRA: prune the lowest-scoring ranks until ``budget(t)`` holds."""
        self.prune_to_budget(t, record)

    def budget_at(self, t: int) -> int:
        """The budget in force at step ``t`` (AdaLoRA: the cubic schedule)."""
        return cubic_budget(self.schedule, t, self.start_budget, self.target_budget)
