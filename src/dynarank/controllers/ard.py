"""ARD-LoRA: a learnable scale alpha per rank group sets its rank; l1 + total variation shrink it.

Per group g (a head, or a whole matrix) with base rank r0 and slots j = 0..r_g-1:

    x_gj   = r0 * alpha_g - j
    soft   = clamp(x_gj, 0, 1)                      # the differentiable mask
    hard   = [x_gj > 1/2]; slots j < floor always on
    m_gj   = hard + soft - stop_grad(soft)          # mask='hard': straight-through
    rank_g = max(floor, ceil(r0 * alpha_g))         # readout='ceil' ('round': round(r0 * alpha_g))

Why the switch sits at 1/2: the clamp passes gradient only to the slot with 0 <= x_gj <= 1.
Just above the switch that slot is on and at its optimum (gradient ~0, so l1 pulls alpha
down); just below, it is off and its gradient measures what turning it back on is worth, which
pushes alpha up when the slot is useful. alpha therefore settles at (needed rank - 1/2), which
ceil reads without bias, and the contested slot is kept for the final phase.

    L = L_task + sum_g (lambda_g * |alpha_g| + beta_g * TV_g)
    TV_g = (alpha_g(t) - alpha_g(t-1))^2            # tv_form='step' (the paper)
         | (alpha_g(t) - alpha_g(last resize))^2    # tv_form='anchor'

alpha_g(t) is the value the update of optimizer step t starts from; alpha_g(t-1) the value the
previous update started from (held since that step's pre-hook). lambda_g = ard_lambda * p_g and
beta_g = ard_beta * p_g share the price p_g of the group (lambda_mode: the calibrated unit times
the group's rank cost, or 1 in 'absolute'), so the TV strength does not depend on the l1 strength:
ard_lambda = 0 leaves TV acting alone. The regulariser's gradient is added to alpha.grad once per
optimizer step (so gradient accumulation counts it once), never to the user's loss. Phases over T optimizer steps:
warm-up (alpha frozen; its task gradient is measured to calibrate lambda), active (alpha
learns; every ``resize_every`` steps each group is physically cut to its rank), final (ranks
fixed, A/B fine-tune).

With a parameter budget (``target_params``) the adapter's size is capped at every resize by

    budget(t) = floor(target + (start - target) * (1 - p)^3),   p = progress of the active phase,

removing the ranks with the lowest margin r0 * alpha_g - j (the tail slot of the group whose
alpha most wants to drop it) until the cap holds; and the l1 strength is steered toward the
budget: lambda_scale *= clip(wanted / budget(t), 1/2, 2), where ``wanted`` is the size the
alphas' read-out asks for. So the alphas keep ranking the slots, and the budget decides how
many survive.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..layer import ElasticLoRALinear
from .ard_budget import cap_to_budget, prefix_cost, steer_factor
from .ard_settings import ARDSettings
from .base import BudgetRecord, RankController, StepRecord
from .rank_motion import RankMotion
from .schedules import BudgetSchedule, cubic_budget

COLLAPSE_FRACTION = 0.8
EXPLOSION_FRACTION = 0.8
OSCILLATION_FRACTION = 0.25
STEER_LIMIT = 2.0  # budget mode: the l1 strength changes by at most this factor per resize


class ARDGates(nn.Module):
    """The alphas, one (G,) vector per adapted module; a submodule of the model so that
    ``.to(device)`` and distributed wrappers see them."""

    def __init__(self, layers: dict[str, ElasticLoRALinear]) -> None:
        super().__init__()
        self.alpha = nn.ParameterDict(
            {
                _key(name): nn.Parameter(
                    torch.ones(layer.n_groups, device=layer.shared_weight.device, dtype=layer.shared_weight.dtype)
                )
                for name, layer in layers.items()
            }
        )

    def of(self, name: str) -> nn.Parameter:
        return self.alpha[_key(name)]


def _key(module_name: str) -> str:
    return module_name.replace(".", "__")


def rank_cost(layer: ElasticLoRALinear) -> float:
    """Parameters one rank of one group costs (the l1 price of that group's alpha, per r0 unit)."""
    if layer.layout == "shared":
        return layer.group_size + layer.other_dim / layer.n_groups
    return layer.group_size + layer.other_dim


class ARDController(RankController):
    """Learn per-group ranks with ARD-LoRA and resize the adapters as they fall.

    Args:
        model: a model returned by ``dynarank.attach(model, DynaRankConfig(method="ard", ...))``.
        total_steps: optimizer steps of the run (the Trainer callback passes it).
    """

    def __init__(self, model: nn.Module, total_steps: int | None = None) -> None:
        if total_steps is None:
            raise ValueError(
                "ARD-LoRA needs total_steps (its warm-up, resize and final phases are fractions of the run). "
                "Pass total_steps=..., or --max-steps for a data set of unknown length."
            )
        super().__init__(model, total_steps)
        self.settings = ARDSettings.resolve(self.config, total_steps)
        self.start_params = self.adapter_parameters()
        self._check_budget()  # before the model is touched: a bad budget leaves it as it was
        if getattr(model, "dynarank_ard", None) is None:
            model.add_module("dynarank_ard", ARDGates(self.layers))
        self.gates: ARDGates = model.dynarank_ard
        # p_g, the price of a unit of |alpha_g| or of TV_g (1 until lambda_mode calibrates it at the end of warm-up)
        self.prices = {name: torch.ones(layer.n_groups) for name, layer in self.layers.items()}
        self._grad_sums = {name: torch.zeros(layer.n_groups) for name, layer in self.layers.items()}
        self._grad_count = 0
        self._previous = self._alpha_snapshot()  # alpha(t-1): the value the previous update started from
        self._anchor = self._alpha_snapshot()  # alpha at the last resize (tv_form='anchor')
        self._start_alpha = self._alpha_snapshot()
        self.motion = RankMotion()  # read-out rank changes and reversals (oscillation alarm)
        for name, layer in self.layers.items():
            layer.set_gate(self.mask_gate(self.gates.of(name)))
        self._losses: list[tuple[int, float]] = []
        self._loss_hook = model.register_forward_hook(self._observe_model_output)
        self.unit = None
        self.lambda_scale = 1.0  # budget mode: the steering factor on every lambda
        self.cuts = {"alpha": 0, "budget": 0}  # ranks removed over the run: by the alphas' read-out, by the cap

    # ------------------------------------------------------------------ mask
    def mask_gate(self, alpha: nn.Parameter):
        """The gate of one module: its groups' rank masks from ``alpha`` (hard, straight-through gradient; or soft)."""
        s = self.settings

        def gate(layer: ElasticLoRALinear) -> torch.Tensor:
            j = torch.arange(layer.max_rank, device=alpha.device, dtype=alpha.dtype)
            x = s.r0 * alpha.unsqueeze(1) - j  # (G, r_max)
            floor = j < s.rank_floor
            soft = torch.where(floor, torch.ones_like(x), x.clamp(0.0, 1.0))
            if s.mask == "soft":
                return soft
            hard = (floor | (x > 0.5)).to(x.dtype)
            return hard + soft - soft.detach()

        return gate

    def readout(self, name: str) -> list[int]:
        """Rank of every group of a module as read from its alphas (before the physical cut)."""
        s, layer = self.settings, self.layers[name]
        scaled = s.r0 * self.gates.of(name).detach().float().cpu()
        raw = torch.ceil(scaled - 1e-6) if s.readout == "ceil" else torch.round(scaled)
        caps = torch.tensor(layer.ranks, dtype=raw.dtype)
        return torch.minimum(raw.clamp(min=s.rank_floor), caps).long().tolist()

    # ------------------------------------------------------------------ parameter budget
    def _check_budget(self) -> None:
        target = self.settings.target_params
        if target is None:
            return
        floor = self.settings.rank_floor
        lowest = sum(layer.num_adapter_parameters_at([floor] * layer.n_groups) for layer in self.layers.values())
        lowest = max(lowest, min(layer.group_size + layer.other_dim for layer in self.layers.values()))
        if not lowest <= target < self.start_params:
            raise ValueError(
                f"ARD's target_params ({target:,}) must be below the adapter's size at r={self.settings.r0} "
                f"({self.start_params:,}) and at least {lowest:,} (rank_floor={floor} everywhere, one rank in all): "
                "change target_params, or raise r to start from more capacity."
            )

    def budget_at(self, t: int | None = None) -> int | None:
        """The parameter cap at step ``t`` (None without a budget): cubic from the start to the target."""
        s = self.settings
        if s.target_params is None:
            return None
        schedule = BudgetSchedule(
            total_steps=self.total_steps,
            t_init=s.warmup_steps,
            t_final=self.total_steps - s.final_start,
            interval=s.resize_every,
        )
        return cubic_budget(schedule, self.step if t is None else t, self.start_params, s.target_params)

    def _cost(self, ranks: dict[str, list[int]]) -> int:
        return prefix_cost(self.layers, ranks)

    def _steer_lambda(self, wanted: int, budget: int) -> None:
        """Scale every lambda by the size the alphas ask for over the budget (clipped per resize)."""
        self.lambda_scale *= steer_factor(wanted, budget, STEER_LIMIT)

    def _cap_to_budget(self, readouts: dict[str, list[int]], budget: int) -> None:
        """Lower ``readouts`` in place to the budget, lowest-margin tail slots first (ard_budget.py)."""
        r0 = self.settings.r0
        scaled = {name: (r0 * self.gates.of(name).detach().float().cpu()).tolist() for name in self.layers}
        cap_to_budget(self.layers, readouts, scaled, self.settings.rank_floor, budget)

    # ------------------------------------------------------------------ optimizer groups
    def gate_parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters())

    def param_groups(self, lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
        lr = lr if lr is not None else (self.settings.lr or 1e-3)
        groups = super().param_groups(lr, weight_decay)
        groups.append(
            {"params": self.gate_parameters(), "lr": self.settings.lr_alpha, "weight_decay": 0.0, "name": "ard_alpha"}
        )
        return groups

    def build_optimizer(self, lr: float | None = None, weight_decay: float = 0.0, **kwargs) -> torch.optim.AdamW:
        return super().build_optimizer(lr if lr is not None else (self.settings.lr or 1e-3), weight_decay, **kwargs)

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        gate_ids = {id(p) for p in self.gate_parameters()}
        for group in optimizer.param_groups:
            ids = {id(p) for p in group["params"]}
            if ids & gate_ids and ids - gate_ids:
                raise ValueError("the ARD alphas must be in their own optimizer group: use controller.param_groups().")
            if ids & gate_ids and group.get("weight_decay", 0.0):
                raise ValueError("the ARD alpha group must have weight_decay=0 (decay would act as a second l1).")
        if not any(id(p) in gate_ids for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("the optimizer does not hold the ARD alphas: build it from controller.param_groups().")
        super().bind(optimizer)

    # ------------------------------------------------------------------ phases
    def phase(self, step: int | None = None) -> str:
        t = self.step if step is None else step
        if t < self.settings.warmup_steps:
            return "warmup"
        return "active" if t < self.settings.final_start else "final"

    def _alpha_snapshot(self) -> dict[str, torch.Tensor]:
        return {name: self.gates.of(name).detach().clone() for name in self.layers}

    @property
    def lambdas(self) -> dict[str, torch.Tensor]:
        """lambda_g of every group, by module (the budget's steering factor included)."""
        scale = self.settings.ard_lambda * self.lambda_scale
        return {name: price * scale for name, price in self.prices.items()}

    @property
    def betas(self) -> dict[str, torch.Tensor]:
        """beta_g, the TV strength of every group, by module."""
        return {name: price * self.settings.ard_beta for name, price in self.prices.items()}

    def tv_reference(self, name: str) -> torch.Tensor:
        """alpha(t-1) ('step') or alpha at the last resize ('anchor') of a module's groups."""
        return (self._previous if self.settings.tv_form == "step" else self._anchor)[name]

    # ------------------------------------------------------------------ the step protocol
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Add lambda_g * sign(alpha_g) + 2 beta_g (alpha_g - reference_g) to the alphas' gradients (active phase);
        then remember alpha(t) as the next step's alpha(t-1)."""
        phase = self.phase()
        calibrating = phase == "warmup" and self.step >= self.settings.warmup_steps // 2
        lambdas, betas = (self.lambdas, self.betas) if phase == "active" else ({}, {})
        for name in self.layers:
            alpha = self.gates.of(name)
            if alpha.grad is None:
                continue
            if not torch.isfinite(alpha.grad).all():
                self.warn_once("nonfinite-grad", f"non-finite gradient on the alphas of {name}; step skipped for them.")
                alpha.grad = None
                continue
            if calibrating:
                self._grad_sums[name] += alpha.grad.detach().abs().float().cpu()
            if phase != "active":
                alpha.grad = None  # frozen: AdamW skips parameters without a gradient
                continue
            value = alpha.detach()
            l1 = lambdas[name].to(alpha.device, alpha.dtype) * torch.sign(value)
            tv = 2.0 * betas[name].to(alpha.device, alpha.dtype) * (value - self.tv_reference(name))
            alpha.grad.add_(l1 + tv)
        if calibrating:
            self._grad_count += 1
        self._previous = self._alpha_snapshot()
        for group in optimizer.param_groups:
            if group.get("name") == "ard_alpha":
                group["lr"] = self.settings.lr_alpha  # owned here: an LR scheduler must not decay it

    def skip_step(self, optimizer: torch.optim.Optimizer) -> StepRecord:
        """A step the loop skipped moves no alpha: the next step's alpha(t-1) is the current value."""
        self._previous = self._alpha_snapshot()
        return super().skip_step(optimizer)

    def after_step(self, optimizer: torch.optim.Optimizer) -> StepRecord:
        self.step += 1
        s = self.settings
        record = BudgetRecord(step=self.step, phase=self.phase(self.step - 1), budget_unit="params")
        self._project_alphas()
        if self.step == s.warmup_steps:
            self._calibrate(record)
        in_active = s.warmup_steps < self.step <= s.final_start
        if in_active:
            self.motion.track({name: self.readout(name) for name in self.layers})
        if in_active and ((self.step - s.warmup_steps) % s.resize_every == 0 or self.step == s.final_start):
            self._resize(record)
            self._check_signatures(record)
        return self._finish(record)

    # ------------------------------------------------------------------ pieces of the step
    @torch.no_grad()
    def _project_alphas(self) -> None:
        """Keep 0 <= alpha <= capacity / r0 (a rank can only be as large as its physical slots)."""
        for name, layer in self.layers.items():
            alpha = self.gates.of(name)
            if not torch.isfinite(alpha).all():
                alpha.copy_(self._previous[name])
                self.warn_once("nonfinite-alpha", f"alphas of {name} became non-finite; restored their last value.")
            caps = torch.tensor(layer.ranks, device=alpha.device, dtype=alpha.dtype) / self.settings.r0
            alpha.copy_(torch.minimum(alpha.clamp(min=0.0), caps))

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Record the task loss of a (micro-)batch; calibrates lambda_mode='relative'.

        Hugging Face models that return ``outputs.loss`` are observed automatically; a loop that
        computes its own loss calls this once per forward pass.
        """
        if self.step < self.settings.warmup_steps:
            value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
            if math.isfinite(value):
                self._losses.append((self.step, value))

    def _observe_model_output(self, module: nn.Module, args, output) -> None:
        loss = getattr(output, "loss", None) if not isinstance(output, dict) else output.get("loss")
        if torch.is_tensor(loss) and loss.dim() == 0:
            self.observe_loss(loss)

    def _loss_improvement(self) -> float | None:
        """Task loss at the start of warm-up minus at its end (means over a tenth of warm-up each)."""
        if not self._losses:
            return None
        k = max(1, self.settings.warmup_steps // 10)
        first = [v for t, v in self._losses if t < k]
        last = [v for t, v in self._losses if t >= self.settings.warmup_steps - k]
        if not first or not last:
            return None
        gained = sum(first) / len(first) - sum(last) / len(last)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every worker saw its own shard's losses: agree on the mean, so all take the same lambda.
            value = torch.tensor([gained], dtype=torch.float64, device=self._collective_device())
            torch.distributed.all_reduce(value)
            gained = float(value) / torch.distributed.get_world_size()
        return gained

    def _collective_device(self) -> torch.device:
        backend = torch.distributed.get_backend()
        return next(iter(self.gates.parameters())).device if backend == "nccl" else torch.device("cpu")

    def _calibrate(self, record: StepRecord) -> None:
        """Turn the relative strength into one lambda per group.

        'relative': lambda_g = strength * r0 * dL * cost_g / P. A switched-off slot pushes its
        alpha up with about 2 * r0 * (the loss it carries); dL * cost_g / P is the loss
        improvement of warm-up shared over the adapter's parameters (P at full rank), priced
        at the group's cost per rank. So strength 1 keeps a slot when it carries about half
        its parameter share of what warm-up gained.
        'gradient': lambda_g = strength * median_g(|dL/dalpha_g| / cost_g) * cost_g, the task
        gradient on alpha measured over the second half of warm-up (degenerates when warm-up
        converges: the gradient of an on slot at its optimum is ~0).
        """
        mode = self.settings.lambda_mode
        if mode == "absolute":
            return
        costs = {name: rank_cost(layer) for name, layer in self.layers.items()}
        if mode == "relative":
            gained = self._loss_improvement()
            if gained is None:
                self.warn_once(
                    "no-loss",
                    "no task loss was observed during warm-up (call controller.observe_loss"
                    "(loss) in a custom loop); lambda is calibrated on the alpha gradient instead.",
                    record,
                )
                mode = "gradient"
            else:
                total = sum(self.settings.r0 * c * self.layers[n].n_groups for n, c in costs.items())
                unit = self.settings.r0 * max(gained, 0.0) / total
                if gained <= 0:
                    self.warn_once(
                        "no-progress",
                        f"the task loss did not fall during warm-up ({gained:+.3g}); lambda is calibrated on the "
                        "alpha gradient instead. Check the learning rate.",
                        record,
                    )
                    mode = "gradient"
        if mode == "gradient":
            count = max(self._grad_count, 1)
            per_cost = torch.cat([self._grad_sums[n] / count / costs[n] for n in self.layers])
            unit = float(per_cost.median())
            if unit == 0.0 or not math.isfinite(unit):
                self.warn_once(
                    "no-alpha-gradient",
                    "the alphas received no task gradient during warm-up: ranks cannot be learned "
                    "(is the adapter trained? is warmup_frac too short?).",
                    record,
                )
                unit = 0.0
        self.unit = unit
        for name, layer in self.layers.items():
            self.prices[name] = torch.full((layer.n_groups,), unit * costs[name])
        self._start_alpha = self._alpha_snapshot()
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None

    def _finish(self, record: StepRecord) -> StepRecord:
        if isinstance(record, BudgetRecord):
            record.adapter_parameters = self.adapter_parameters()
            record.budget = self.budget_at()
        return super()._finish(record)

    def _resize(self, record: StepRecord) -> None:
        """Cut every group to its read-out rank (and under the budget), carrying the optimizer state of
        the kept slots."""
        readouts = {name: self.readout(name) for name in self.layers}
        live = sum(sum(layer.ranks) for layer in self.layers.values())
        wanted = sum(sum(r) for r in readouts.values())
        budget = self.budget_at()
        if budget is not None:
            self._steer_lambda(self._cost(readouts), budget)
            self._cap_to_budget(readouts, budget)
        kept = sum(sum(r) for r in readouts.values())
        record.cut_by_alpha, record.cut_by_budget = live - wanted, wanted - kept  # ranks, before the collapse guard
        self.cuts["alpha"] += record.cut_by_alpha
        self.cuts["budget"] += record.cut_by_budget
        if not any(sum(r) for r in readouts.values()):
            # Nothing would be left to train (and a loss without a graph would crash the loop):
            # keep the one slot whose alpha is largest and report the collapse.
            alive = [
                (float(self.gates.of(n).detach()[g]), n, g)
                for n, layer in self.layers.items()
                for g, r in enumerate(layer.ranks)
                if r > 0
            ]
            _, best, group = max(alive)
            readouts[best][group] = 1
            self.warn_once(
                "collapse-all",
                "rank collapse: every group reached rank 0; one slot is kept. lambda is "
                f"far too high (ard_lambda={self.settings.ard_lambda:g}): lower it.",
                record,
            )
        for name, layer in self.layers.items():
            cut = {g: list(range(k, r)) for g, (k, r) in enumerate(zip(readouts[name], layer.ranks)) if k < r}
            if cut:
                record.params_removed += layer.remove_slots(cut, optimizer=self.optimizers)
                record.resized = True
        self._project_alphas()
        self._anchor = self._alpha_snapshot()
        if self.step >= self.settings.final_start:
            # Ranks are fixed from here on: every physical slot is on, A and B fine-tune.
            for layer in self.layers.values():
                layer.set_gate(None)

    # ------------------------------------------------------------------ failure signatures
    def _check_signatures(self, record: StepRecord) -> None:
        s = self.settings
        progress = (self.step - s.warmup_steps) / max(1, s.final_start - s.warmup_steps)
        ranks = [r for name in self.layers for r in self.layers[name].ranks]
        n = max(1, len(ranks))
        at_floor = sum(r <= s.rank_floor for r in ranks) / n
        budgeted = s.target_params is not None  # the budget, not lambda, sets the size: no collapse/explosion
        if not budgeted and progress <= 0.5 and at_floor >= COLLAPSE_FRACTION:
            self.warn_once(
                "collapse",
                f"rank collapse: {at_floor:.0%} of groups at the floor ({s.rank_floor}) after "
                f"{progress:.0%} of the active phase; lambda is too high (ard_lambda={s.ard_lambda:g}): "
                "lower it.",
                record,
            )
        pinned = 0
        for name, layer in self.layers.items():
            scaled = self.gates.of(name).detach().cpu() * s.r0
            full = torch.tensor(layer.ranks) >= s.r0  # never cut and ...
            pinned += int((full & (scaled > s.r0 - 0.5)).sum())  # ... its top slot still switched on
        pinned /= n
        if not budgeted and progress >= 0.5 and pinned >= EXPLOSION_FRACTION:
            self.warn_once(
                "explosion",
                f"rank explosion: {pinned:.0%} of groups pinned at their capacity and pushing up after "
                f"{progress:.0%} of the active phase; lambda is too low (ard_lambda={s.ard_lambda:g}) or "
                "r too small: raise ard_lambda or r.",
                record,
            )
        moved = max(float((self.gates.of(n_).detach() - self._start_alpha[n_]).abs().max()) for n_ in self.layers)
        if progress >= 0.5 and moved * s.r0 < 1.0:
            self.warn_once(
                "frozen",
                f"alpha has not moved one rank step after {progress:.0%} of the active phase "
                f"(max change {moved:.2g}); lr_alpha={s.lr_alpha:g} is too small for this run: raise it "
                "or leave lr_alpha=None.",
                record,
            )
        flips = self.motion.reversing_fraction()
        if flips >= OSCILLATION_FRACTION:
            self.warn_once(
                "oscillation",
                f"oscillating ranks: {flips:.0%} of groups changed direction twice or more across "
                f"resizes; "
                + (
                    "use mask='hard' (measured: no oscillation with the hard mask), or raise ard_beta by orders of "
                    f"magnitude (now {s.ard_beta:g})."
                    if s.mask == "soft"
                    else f"raise ard_beta (now {s.ard_beta:g}) or lower lr_alpha."
                ),
                record,
            )

    @property
    def rank_changes(self) -> int:
        """Read-out rank changes summed over groups and active steps."""
        return self.motion.rank_changes

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(
            {
                "prices": {k: v.tolist() for k, v in self.prices.items()},
                "grad_sums": {k: v.tolist() for k, v in self._grad_sums.items()},
                "grad_count": self._grad_count,
                "losses": self._losses,
                "unit": self.unit,
                "previous": {k: v.tolist() for k, v in self._previous.items()},
                "anchor": {k: v.tolist() for k, v in self._anchor.items()},
                "start_alpha": {k: v.tolist() for k, v in self._start_alpha.items()},
                **self.motion.state_dict(),
                "lambda_scale": self.lambda_scale,
                "start_params": self.start_params,
                "cuts": dict(self.cuts),
            }
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (the alphas themselves are model parameters)."""
        super().load_state_dict(state)

        def tensors(key: str) -> dict[str, torch.Tensor]:
            return {k: torch.tensor(v, dtype=torch.float32) for k, v in state[key].items()}

        device = next(iter(self.gates.parameters())).device
        self.prices = tensors("prices")
        self._grad_sums = tensors("grad_sums")
        self._grad_count = int(state["grad_count"])
        self._losses = [(int(t), float(v)) for t, v in state["losses"]]
        self.unit = state["unit"]
        self._previous = {k: v.to(device) for k, v in tensors("previous").items()}
        self._anchor = {k: v.to(device) for k, v in tensors("anchor").items()}
        self._start_alpha = {k: v.to(device) for k, v in tensors("start_alpha").items()}
        self.motion.load_state_dict(state)
        self.lambda_scale = float(state.get("lambda_scale", 1.0))
        self.cuts = {"alpha": 0, "budget": 0, **state.get("cuts", {})}
        self.start_params = int(state.get("start_params", self.start_params))
        if self.step >= self.settings.warmup_steps and self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self.step >= self.settings.final_start:
            for layer in self.layers.values():
                layer.set_gate(None)
