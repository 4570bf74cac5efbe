"""ARD-LoRA: a learnable scale alpha per rank group sets its rank; l1 + total variation shrink it.

Per group g (a head, or a whole matrix) with base rank r0, the mask of ard_gates.py, and

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
optimizer step (so gradient accumulation counts it once), never to the user's loss. Phases over T
optimizer steps (a schedules.BudgetSchedule): warm-up (alpha frozen; its task gradient is measured to
calibrate lambda), active (alpha learns; every ``resize_every`` steps each group is physically cut to
its rank), final (ranks fixed, A/B fine-tune).

Every per-step quantity is a flat (N,) tensor over all groups of the model, on the alphas' device: a
step costs a few vector operations and one wait for the device, whatever the number of modules.

With a parameter budget (``target_params``) the adapter's size is capped at every resize by

    budget(t) = floor(target + (start - target) * (1 - p)^3),   p = progress of the active phase,

removing the ranks with the lowest margin r0 * alpha_g - j (the tail slot of the group whose
alpha most wants to drop it) until the cap holds; it is held at the target from below, keeping
the slots the read-out would cut, highest margin first, while the adapter fits under the target
(a removed slot never returns, so without the floor a read-out that fell below the target ended
the run there): a group with a held slot keeps its rank to the end, every slot on, those that
were off restarting from a zero group-side column; and the l1 strength is steered toward the budget: lambda_scale *=
clip(wanted / budget(t), 1/2, 2), where ``wanted`` is the size the alphas' read-out asks for. So
the alphas rank the slots, and the budget decides how many survive.

This module is the controller and its step protocol (the regulariser's gradient on alpha, the projection, the
phases, the read-outs and the checkpoint state); the calibration of lambda at the end of warm-up is
ard_calibration.py, the resize step under the budget ard_resize.py.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from ..config import ConfigError
from ..rank_init import RANK_INIT_ATTR
from . import binding
from .ard_calibration import ARDCalibration
from .ard_gates import ARD_ATTR, ARDGates, mask_gate
from .ard_resize import STEER_LIMIT as STEER_LIMIT  # re-exported: the steering's limit lives with the resize
from .ard_resize import ARDResizing
from .ard_settings import ARDSettings
from .ard_signatures import check_signatures
from .base import BudgetRecord, RankController, StepRecord
from .rank_motion import RankMotion

MIN_ACTIVE_STEPS = 30  # fewer active steps than this: warned before training (docs/ard.md)


class ARDController(ARDCalibration, ARDResizing, RankController):
    """Learn per-group ranks with ARD-LoRA and resize the adapters as they fall.

    Args:
        model: a model returned by ``dynarank.attach(model, DynaRankConfig(method="ard", ...))``.
        total_steps: optimizer steps of the run (the Trainer callback passes it).
    """

    resizes_adapters = True

    def __init__(self, model: nn.Module, total_steps: int | None = None, *, restoring: bool = False) -> None:
        if total_steps is None:
            raise ConfigError(
                "total_steps",
                "ARD-LoRA needs the run's length in optimizer steps (its warm-up, resize and final phases are "
                "fractions of the run); a data set of unknown length needs it given.",
            )
        super().__init__(model, total_steps, restoring=restoring)
        # rank_init='data': the ranks the init set (dynarank.rank_init), recorded with the controller's state
        self.rank_init: dict | None = getattr(model, RANK_INIT_ATTR, None)
        unmeasured = self.config.data_start and self.rank_init is None and not restoring
        if unmeasured and self.config.rank_init == "data":
            raise ConfigError(
                "rank_init",
                "'data' needs the starting ranks measured before the controller is built: call "
                "dynarank.init_ranks(model, batches) first (dynarank train and DynaRankCallback do it).",
            )
        self._resolve_settings()
        self.start_params = self.adapter_parameters()
        if not restoring:
            self._check_budget()  # before the model is touched: a bad budget leaves it as it was
            self._check_run_length()
        if unmeasured:  # 'auto' with a budget, built by hand without the data pass: the uniform start
            self.warn_before_training(
                f"rank_init='auto' starts from measured ranks when dynarank.init_ranks(model, batches) runs before "
                f"the controller is built; it did not, so every group starts at r = {self.config.r} (rank_init="
                f"'uniform'; dynarank train and DynaRankCallback run the pass)."
            )
        if getattr(model, ARD_ATTR, None) is None:
            model.add_module(ARD_ATTR, ARDGates(self.layers))
        self.gates: ARDGates = getattr(model, ARD_ATTR)
        self.forget_sizes()  # the alphas are trainable parameters of the model now
        alpha = self.gates.alpha.detach()
        n = alpha.numel()
        # p_g, the price of a unit of |alpha_g| or of TV_g (1 until lambda_mode calibrates it at the end of warm-up)
        self.prices = torch.ones(n, dtype=alpha.dtype, device=alpha.device)
        self.grad_sums = torch.zeros(n, dtype=torch.float32, device=alpha.device)  # sum of |dL/dalpha| to calibrate
        self._grad_count = 0
        self.previous = alpha.clone()  # alpha(t-1): the value the previous update started from
        self.anchor = alpha.clone()  # alpha at the last resize (tv_form='anchor')
        self.start_alpha = alpha.clone()
        self.held = torch.zeros(n, dtype=torch.bool, device=alpha.device)  # groups whose rank the budget's floor fixed
        # The alphas' own optimizer (the paper's dual optimizers): their gradient is consumed in the pre-step hook,
        # so whatever optimizer the caller steps never sees it (no weight decay, no LR schedule, no group to set up).
        self.alpha_optimizer = torch.optim.AdamW([self.gates.alpha], lr=self.settings.lr_alpha, weight_decay=0.0)
        self._layout_changed()
        self.motion = RankMotion()  # read-out rank changes and reversals (oscillation alarm)
        s = self.settings
        for name, layer in self.layers.items():
            layer.set_gate(mask_gate(self.gates, name, s.r0, s.rank_floor, soft_only=s.mask == "soft"))
        self._losses: list[tuple[int, float]] = []
        self._explicit_step: int | None = None  # a step whose loss the caller observes itself (observe_loss)
        # held weakly (binding.hook_on_model): a dropped controller's hook goes with it, a copy of the model has none
        self._loss_hook = binding.hook_on_model(self, model.register_forward_hook, ARDController._observe_model_output)
        self.unit = None
        self.lambda_scale = 1.0  # budget mode: the steering factor on every lambda
        # ranks over the run: removed by the alphas' read-out, removed by the cap, held by the floor at the target
        self.cuts = {"alpha": 0, "budget": 0, "held": 0}

    def _resolve_settings(self) -> None:
        """The run's settings; after a data init lr_alpha follows the alphas' starting range (ARDSettings.resolve)."""
        alpha_range = 1.0
        if self.rank_init is not None:
            started = [r for ranks in self.rank_init["ranks"].values() for r in ranks if r > 0]
            alpha_range = sum(started) / len(started) / self.config.r if started else 1.0
        self.settings = ARDSettings.resolve(self.config, self.total_steps, alpha_range)
        self.schedule = self.settings.schedule

    def _layout_changed(self) -> None:
        """Per-group live ranks (CPU) and the alphas' caps (ranks / r0, on their device), after a resize."""
        self.group_ranks = torch.tensor([r for layer in self.layers.values() for r in layer.ranks], dtype=torch.long)
        alpha = self.gates.alpha
        self.caps = (self.group_ranks.to(alpha.dtype) / self.settings.r0).to(alpha.device)

    def _home(self) -> torch.Tensor:
        """The alphas (detached); the controller's vectors follow them to their device (a model moved later)."""
        alpha = self.gates.alpha.detach()
        if self.prices.device != alpha.device:
            for key in ("prices", "grad_sums", "previous", "anchor", "start_alpha", "caps", "held"):
                setattr(self, key, getattr(self, key).to(alpha.device))
        return alpha

    # ------------------------------------------------------------------ strengths and read-outs
    @property
    def lambdas(self) -> dict[str, torch.Tensor]:
        """lambda_g of every group, by module (the budget's steering factor included)."""
        return self.gates.split(self._lambda_vector())

    @property
    def betas(self) -> dict[str, torch.Tensor]:
        """beta_g, the TV strength of every group, by module."""
        return self.gates.split(self.prices * self.settings.ard_beta)

    def _lambda_vector(self) -> torch.Tensor:
        return self.prices * (self.settings.ard_lambda * self.lambda_scale)

    def mask_gate(self, name: str):
        """The rank mask of module ``name`` from its alphas (what the layers use until the final phase)."""
        s = self.settings
        return mask_gate(self.gates, name, s.r0, s.rank_floor, soft_only=s.mask == "soft")

    def _readout_vector(self) -> torch.Tensor:
        """Rank of every group as read from its alpha (before the physical cut), (N,) long, on the alphas' device."""
        s, alpha = self.settings, self._home()
        scaled = s.r0 * alpha.float()
        raw = torch.ceil(scaled - 1e-6) if s.readout == "ceil" else torch.round(scaled)
        caps = self.group_ranks.to(raw.device, raw.dtype)
        return torch.minimum(raw.clamp(min=s.rank_floor), caps).long()

    def readout(self, name: str) -> list[int]:
        """Rank of every group of a module as read from its alphas (before the physical cut)."""
        start, stop = self.gates.spans[name]
        return self._readout_vector()[start:stop].tolist()

    # ------------------------------------------------------------------ checks before training
    def _check_run_length(self) -> None:
        """Warn when the active phase is too short for the alphas to learn ranks (docs/ard.md)."""
        s = self.settings
        active = s.final_start - s.warmup_steps
        if active < MIN_ACTIVE_STEPS:
            self.warn_before_training(
                f"ARD-LoRA's active phase is {active} optimizer steps (warm-up {s.warmup_steps}, final phase "
                f"{self.total_steps - s.final_start} of {self.total_steps}): with fewer than {MIN_ACTIVE_STEPS} the "
                f"alphas have {s.resize_every}-step resizes to learn the ranks in and the cut is abrupt; train longer, "
                "or start nearer the answer (a smaller r)."
            )

    # ------------------------------------------------------------------ optimizer groups
    def gate_parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters())

    def _own_parameter_count(self) -> int:
        gates = getattr(self, "gates", None)
        return gates.alpha.numel() if gates is not None else 0

    def param_groups(self, lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
        """The caller's optimizer groups: adapters and task head. The alphas are stepped by the controller itself."""
        return super().param_groups(lr if lr is not None else self.default_lr(), weight_decay)

    def build_optimizer(self, lr: float | None = None, weight_decay: float = 0.0, **kwargs) -> torch.optim.AdamW:
        return super().build_optimizer(lr if lr is not None else self.default_lr(), weight_decay, **kwargs)

    def default_lr(self) -> float:
        """The paper preset's 1e-4, else the method's default (dynarank.defaults, at this adapter's budget)."""
        return self.settings.lr if self.settings.lr is not None else super().default_lr()

    # ------------------------------------------------------------------ phases
    def phase(self, step: int | None = None) -> str:
        """Phase of the optimizer step that starts after ``step`` completed steps (default: the current one)."""
        return self.schedule.phase((self.step if step is None else step) + 1)

    # ------------------------------------------------------------------ the step protocol
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Update the alphas with their own optimizer from task gradient + lambda_g * sign(alpha_g)
        + 2 beta_g (alpha_g - reference_g) (active phase), and remember alpha(t) as the next step's alpha(t-1);
        the caller's optimizer then finds no gradient on them."""
        phase = self.phase()
        alpha = self._home()
        current = alpha.clone()  # alpha(t): what this step's update starts from
        grad = self.gates.alpha.grad
        if grad is not None and not bool(torch.isfinite(grad).all()):  # the step's one wait for the device
            self.warn_once("nonfinite-grad", "non-finite gradient on the alphas; this step leaves them as they are.")
            grad = None
        if grad is not None and phase == "warmup" and self.step >= self.settings.warmup_steps // 2:
            self.grad_sums += grad.detach().abs().float()
            self._grad_count += 1
        if grad is not None and phase == "active":
            reference = self.previous if self.settings.tv_form == "step" else self.anchor
            l1 = self._lambda_vector() * torch.sign(alpha)
            tv = 2.0 * (self.prices * self.settings.ard_beta) * (alpha - reference)
            grad.add_(l1 + tv)
            for group in self.alpha_optimizer.param_groups:
                group["lr"] = self.settings.lr_alpha
            self.alpha_optimizer.step()
        self.gates.alpha.grad = None  # also when frozen: nothing for the caller's optimizer to step
        self.previous = current

    def skip_step(self, optimizer: torch.optim.Optimizer) -> StepRecord:
        """A step the loop skipped moves no alpha: the next step's alpha(t-1) is the current value."""
        self.previous = self._home().clone()
        self.gates.alpha.grad = None
        return super().skip_step(optimizer)

    def after_step(self, optimizer: torch.optim.Optimizer) -> StepRecord:
        self.step += 1
        record = BudgetRecord(step=self.step, phase=self.phase(self.step - 1), budget_unit="params")
        self._project_alphas()
        if self.step == self.settings.warmup_steps:
            self._calibrate(record)
        if self.schedule.phase(self.step) == "active":
            self.motion.track(self._readout_vector())
        if self.schedule.is_round(self.step, force_end=True):
            self._resize(record)
            check_signatures(self, record)
        return self._finish(record)

    # ------------------------------------------------------------------ pieces of the step
    @torch.no_grad()
    def _project_alphas(self) -> None:
        """Keep 0 <= alpha <= capacity / r0 (a rank can only be as large as its physical slots), and at it for a
        group whose rank the budget's floor fixed; an alpha an update made non-finite goes back to its value before
        that update."""
        alpha = self.gates.alpha
        self._home()
        finite = torch.isfinite(alpha)
        if not bool(finite.all()):
            alpha.copy_(torch.where(finite, alpha, self.previous))
            bad = [name for name, part in self.gates.split(finite).items() if not bool(part.all())]
            self.warn_once("nonfinite-alpha", f"alphas of {bad[0]} became non-finite; restored their last value.")
        alpha.copy_(torch.where(self.held, self.caps, torch.minimum(alpha.clamp(min=0.0), self.caps)))

    def _finish(self, record: StepRecord) -> StepRecord:
        if isinstance(record, BudgetRecord):
            record.adapter_parameters = self.adapter_parameters()
            record.budget = self.budget_at()
        return super()._finish(record)

    @property
    def rank_changes(self) -> int:
        """Read-out rank changes summed over groups and active steps."""
        return self.motion.rank_changes

    # ------------------------------------------------------------------ checkpoint state
    def _resolved(self) -> dict:
        """The start the run took ('data' after the pass, else 'uniform') and the resolved settings (the preset
        applied; warm-up, final phase and resize interval in steps; the alphas' rate)."""
        return {"start": "data" if self.rank_init is not None else "uniform", "resolved": asdict(self.settings)}

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(
            {
                "prices": self.prices.tolist(),
                "grad_sums": self.grad_sums.tolist(),
                "grad_count": self._grad_count,
                "losses": self._losses,
                "unit": self.unit,
                "previous": self.previous.tolist(),
                "anchor": self.anchor.tolist(),
                "start_alpha": self.start_alpha.tolist(),
                "held": self.held.tolist(),
                **self.motion.state_dict(),
                "lambda_scale": self.lambda_scale,
                "start_params": self.start_params,
                "cuts": dict(self.cuts),
                "rank_init": self.rank_init,
            }
        )
        return state

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The alphas' optimizer state (the alphas themselves are model parameters)."""
        state = self.alpha_optimizer.state.get(self.gates.alpha, {})
        return {f"alpha_optimizer.{k}": v.detach() for k, v in state.items() if torch.is_tensor(v)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        prefix = "alpha_optimizer."
        saved = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        alpha = self.gates.alpha
        self.alpha_optimizer = torch.optim.AdamW([alpha], lr=self.settings.lr_alpha, weight_decay=0.0)
        if saved:
            self.alpha_optimizer.state[alpha] = {
                k: v.to(alpha.device) if v.dim() else v.clone() for k, v in saved.items()
            }

    # What _load_state reads without a default; the rank motion's own included (rank_motion.RankMotion).
    required_state = (
        *RankController.required_state,
        *("prices", "grad_sums", "grad_count", "losses", "unit", "previous", "anchor", "start_alpha", "rank_changes"),
    )
    _group_vectors = ("prices", "grad_sums", "previous", "anchor", "start_alpha", "held")  # one entry per group

    def check_state(self, state: dict) -> None:
        """Also refused: a state whose per-group vectors do not have one entry per group of this model."""
        super().check_state(state)
        groups = self.gates.alpha.numel()
        for key in self._group_vectors:
            value = state.get(key)
            shape = tuple(torch.as_tensor(value).shape) if value is not None else (groups,)
            if shape != (groups,):
                raise ValueError(f"controller state {key!r} has shape {shape}, not one entry per group ({groups}).")

    def _load_state(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved, checked (the alphas themselves are model parameters)."""
        super()._load_state(state)
        if state.get("rank_init") is not None:  # the starting ranks came from data: lr_alpha follows them
            self.rank_init = state["rank_init"]
            setattr(self.model, RANK_INIT_ATTR, self.rank_init)  # the init has run: nothing runs it again
            self._resolve_settings()
        alpha = self.gates.alpha

        def vector(key: str, dtype: torch.dtype = alpha.dtype) -> torch.Tensor:
            return torch.tensor(state[key], dtype=dtype).to(alpha.device)  # its length checked (check_state)

        self.prices = vector("prices")
        self.grad_sums = vector("grad_sums", torch.float32)
        self._grad_count = int(state["grad_count"])
        self._losses = [(int(t), float(v)) for t, v in state["losses"]]
        self.unit = state["unit"]
        self.previous, self.anchor, self.start_alpha = vector("previous"), vector("anchor"), vector("start_alpha")
        self.held = vector("held", torch.bool) if "held" in state else torch.zeros_like(self.held)
        self.motion.load_state_dict(state)
        self.lambda_scale = float(state.get("lambda_scale", 1.0))
        self.start_params = int(state.get("start_params", self.start_params))
        self.cuts = {"alpha": 0, "budget": 0, "held": 0, **state.get("cuts", {})}
        self._layout_changed()
        if self.step >= self.settings.warmup_steps and self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self.step >= self.settings.final_start:
            self._drop_gates()
