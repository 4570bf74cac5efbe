"""What every rank controller shares: optimizer hooks, step counting, rank history, records.

A controller is bound to an optimizer and runs inside ``optimizer.step()`` through PyTorch's
step hooks, so a plain loop (``loss.backward(); opt.step(); opt.zero_grad()``), the
transformers Trainer and accelerate all drive it without extra calls, and it counts optimizer
steps (never micro-batches): a skipped step (fp16 overflow) runs no hook.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..attach import ATTACHED_ATTR, CONTROLLED_ATTR, count_trainable, elastic_layers
from ..config import ConfigError, DynaRankConfig
from ..defaults import budget_of, default_lr, task_of
from ..layer import ElasticLoRALinear
from . import binding

logger = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """What one optimizer step did to the ranks (consumed by logging, the report and tests)."""

    step: int
    phase: str
    resized: bool = False
    params_removed: int = 0
    params_added: int = 0
    total_rank: int = 0
    trainable_parameters: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class BudgetRecord(StepRecord):
    """A StepRecord that also reports the budget and both counts (ranks and parameters).

    Attributes:
        budget_unit: 'rank' or 'params', the unit the allocator honours.
        budget: the budget in force after this step, in ``budget_unit`` (None: no budget).
        adapter_parameters: A and B parameters of every adapted module (what the export costs).
        pruned / expanded: ranks physically removed / added by this step (every method that resizes).
        cut_by_alpha / cut_by_budget: ARD, at a resize: ranks its alphas' read-out removed, and ranks the
            parameter cap removed on top of those (their sum is ``pruned`` but when the collapse guard keeps a slot).
        held_by_budget: ARD, at a resize: ranks the read-out would remove that the floor at the target kept.
    """

    budget_unit: str = "rank"
    budget: int | None = None
    adapter_parameters: int = 0
    pruned: int = 0
    expanded: int = 0
    cut_by_alpha: int = 0
    cut_by_budget: int = 0
    held_by_budget: int = 0


class RankController:
    """Fixed ranks (method 'dynarank-lora'); base class of the rank-changing methods.

    Args:
        model: a model returned by :func:`dynarank.attach`.
        total_steps: optimizer steps the run will take (schedules need it).
        restoring: the controller is built to take a checkpoint's state next (:func:`checkpoint.restore_controller`):
            the model may already have the checkpoint's (resized) layout, so what is derived from the starting
            size (budgets) is not validated here; the saved state brings it.
    """

    def __init__(self, model: nn.Module, total_steps: int | None = None, *, restoring: bool = False) -> None:
        config: DynaRankConfig | None = getattr(model, ATTACHED_ATTR, None)
        if config is None:
            raise ValueError("the controller needs a model returned by dynarank.attach().")
        if total_steps is not None and (
            not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1
        ):
            raise ConfigError("total_steps", f"must be a positive integer, got {total_steps!r}.")
        self.model = model
        self.config = config
        self.restoring = restoring
        setattr(model, CONTROLLED_ATTR, True)  # its training forwards are this controller's (attach's warning)
        self.total_steps = total_steps
        self.layers: dict[str, ElasticLoRALinear] = elastic_layers(model)
        self.step = 0
        self.history: list[dict] = []  # {"step": t, "ranks": {module: [r_g, ...]}}
        self.records: list[StepRecord] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self._hooks: dict[int, list] = {}  # id of a bound optimizer -> its step hooks' handles
        self._warned: set[str] = set()
        self._sizes: tuple[int, dict] | None = None  # (layout version, cached sizes): read-outs of every step
        self._other_trainable: int | None = None  # trainable parameters that are neither adapters nor the controller's
        self._layer_sizes: dict[nn.Module, tuple[int, int, int]] = {}  # layer -> (layout version, parameters, rank)
        self._skipping = False  # the next optimizer step is one the caller skips
        self.setup_warnings: list[str] = []  # what the run's length or settings make doubtful, said before training
        self._restored_warnings: list[str] = []  # the warnings of the steps before a restored checkpoint
        # A data-parallel worker's weight of its shard's loss (n x its share of the global batch, set by the loop at
        # every step): the losses a controller records are weighted by it, so their mean over workers is the global
        # batch's loss. 1 in one process, and where the caller does not weight (DDP averages the shard means).
        self.loss_weight = 1.0
        self._stepped: set[int] = set()  # ids of the bound optimizers that stepped in the current iteration
        # A load into the model (model.load_state_dict) replaces the adapters whose saved slot layout differs: the
        # bound optimizers get the new tensors in the old ones' places (their state, if any, dropped), so that a resume
        # in the usual order (build everything, then load the model's state, then the optimizer's) trains them.
        # The model's hooks must not keep the controller alive, nor copy it with the model: binding.hook_on_model.
        self._before_load: dict[str, nn.Parameter] = {}
        self._dropped_by_load = 0  # optimizer state a load dropped, said at the next step
        binding.hook_on_model(self, model.register_load_state_dict_pre_hook, binding.note_parameters_before_load)
        binding.hook_on_model(self, model.register_load_state_dict_post_hook, binding.rebind_loaded_parameters)
        # What tells an optimizer that runs this controller from one that does not (binding.py): the steps of the
        # bound optimizers, and the warnings of a controller that does not run while its model trains, said once.
        self._bound_steps = 0
        self._said_not_driven: set[str] = set()
        binding.note_newest(model, self)
        self._unbound_hook = None  # warns at the first training forward with no optimizer bound (binding.py)
        if self.resizes_adapters:
            self._unbound_hook = binding.hook_on_model(self, model.register_forward_hook, binding.warn_if_unbound)
            binding.watch_optimizer_steps()
        self.record_ranks()

    # ------------------------------------------------------------------ parameters & optimizer
    def gate_parameters(self) -> list[nn.Parameter]:
        """Parameters of the controller itself (ARD's alphas); none for fixed ranks."""
        return []

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups: adapters and task head at ``lr``; controller parameters handled by the method."""
        gate_ids = {id(p) for p in self.gate_parameters()}
        main = [p for p in self.model.parameters() if p.requires_grad and id(p) not in gate_ids]
        return [{"params": main, "lr": lr, "weight_decay": weight_decay, "name": "adapter"}]

    def budget_in_lora_ranks(self) -> float | None:
        """This adapter's budget as plain LoRA's rank on its targets (dynarank.defaults.budget_of); None without one."""
        c = self.config
        knobs = {k: getattr(c, k, None) for k in ("target_params", "target_rank", "granularity")}
        return budget_of(c.method, c.r, knobs, ((m.in_features, m.out_features) for m in self.layers.values()))

    def default_lr(self) -> float:
        """The rate this method trains with when none is given (dynarank.defaults): the table of this kind of model,
        at the studied budget nearest this adapter's."""
        return default_lr(self.config.method, task_of(self.model), self.budget_in_lora_ranks())

    # Whether the method resizes the adapters (its bound optimizers' state must follow a resize; nothing drives it
    # unless an optimizer is bound, which is warned about). The fixed-rank controller does not.
    resizes_adapters: bool = False

    def build_optimizer(self, lr: float | None = None, weight_decay: float = 0.0, **kwargs) -> torch.optim.AdamW:
        """AdamW over :meth:`param_groups`, already bound to this controller (``lr`` None: :meth:`default_lr`).

        Called again, the new optimizer replaces the one built before (see :meth:`bind`)."""
        lr = self.default_lr() if lr is None else lr
        optimizer = torch.optim.AdamW(self.param_groups(lr, weight_decay), lr=lr, **kwargs)
        self.bind(optimizer)
        return optimizer

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Run this controller inside every ``optimizer.step()``.

        With several optimizers bound over different parameters (one for the adapters, one for a task head), an
        iteration is one step of each: the controller's step starts in the first one's step and ends in the last
        one's, so it counts iterations, not optimizer steps, whatever order they step in. An optimizer holding
        parameters that a bound one holds too replaces it (``build_optimizer()`` or ``bind`` called again, as a
        notebook cell run twice does): the old one is unbound, and its ``step()`` raises from then on, since the
        controller no longer runs in it and its tensors stop being the model's at the next resize. Binding an
        optimizer already bound does nothing.

        Raises:
            ValueError, before anything changes: the optimizer holds none of the model's trainable parameters (another
                model's), or the method resizes and the optimizer's state cannot follow a resize (Adafactor, 8-bit
                states: ``optim_state.unresizable_reason``).
        """
        if any(o is optimizer for o in self.optimizers):
            return
        self.check_optimizer(optimizer)
        held = binding.held_ids(optimizer)
        for old in [o for o in self.optimizers if not held.isdisjoint(binding.held_ids(o))]:
            self._unbind_one(old)
            binding.retire(old)
            logger.info("dynarank: a new optimizer over the same parameters replaces the one bound before.")
        binding.reinstate(optimizer)
        self.optimizers.append(optimizer)
        binding.bindings_changed()
        self._hooks[id(optimizer)] = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._pre_step(opt)),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self._post_step(opt)),
        ]

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """ValueError if ``optimizer`` cannot drive this controller (:meth:`bind`); nothing changes."""
        binding.check_optimizer(self.model, optimizer, self.config.method, self.resizes_adapters)

    def _unbind_one(self, optimizer: torch.optim.Optimizer) -> None:
        for hook in self._hooks.pop(id(optimizer), []):
            hook.remove()
        self.optimizers[:] = [o for o in self.optimizers if o is not optimizer]
        self._stepped.discard(id(optimizer))
        binding.bindings_changed()

    def forget_unbound_hook(self) -> None:
        """Remove the forward hook that warns when no optimizer is bound (it has warned)."""
        if self._unbound_hook is not None:
            self._unbound_hook.remove()
            self._unbound_hook = None

    def skip_next_step(self) -> None:
        """The next ``optimizer.step()`` is one the caller skips (it dropped the gradients): the controller counts
        it (its schedule keeps time) and learns nothing from it, as :meth:`skip_step`."""
        self._skipping = True

    def count_skipped_step(self) -> StepRecord:
        """This iteration's ``optimizer.step()`` never ran, so neither did the controller's step hooks: a gradient
        scaler that finds inf / NaN skips the call (torch.amp.GradScaler with a non-fused optimizer, as under fp16
        mixed precision). Counted as :meth:`skip_step` counts a step the loop skips: the schedule keeps time with
        the loop, nothing is learned."""
        if not self.optimizers:
            raise RuntimeError("count_skipped_step() needs a bound optimizer (bind one, or build_optimizer()).")
        if self.resizes_adapters:
            binding.refuse_inference_mode()
        self._skipping = False
        self._stepped.clear()
        return self.skip_step(self.optimizers[0])

    def _pre_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._bound_steps += 1
        if self.resizes_adapters:
            binding.refuse_inference_mode()  # before the optimizer changes anything
        if self._dropped_by_load:
            self.warn_once(
                "state-dropped-by-load",
                f"loading the model reshaped {self._dropped_by_load} adapter tensors that already had optimizer "
                "state, which cannot fit their new shapes and was dropped: load the optimizer's state after the "
                "model's.",
            )
            self._dropped_by_load = 0
        if not self._stepped and not self._skipping:  # the iteration's first optimizer step: every gradient is there
            self.before_step(optimizer)

    def _post_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._stepped.add(id(optimizer))
        if not {id(o) for o in self.optimizers} <= self._stepped:
            return  # the iteration ends when every bound optimizer has stepped
        self._stepped.clear()
        if self.total_steps is not None and self.step >= self.total_steps:
            self.warn_once(
                "past-the-end",
                f"optimizer step {self.step + 1} is past the run's total_steps={self.total_steps}: the rank schedule "
                "is over, so the ranks stay as they are (give build_controller the run's whole length).",
            )
        if self._skipping:
            self._skipping = False
            self.skip_step(optimizer)
        else:
            self.after_step(optimizer)

    def unbind(self) -> None:
        """Unbind every optimizer: the controller runs in none of their steps."""
        for hooks in self._hooks.values():
            for hook in hooks:
                hook.remove()
        self._hooks.clear()
        self.optimizers.clear()
        self._stepped.clear()
        binding.bindings_changed()

    # ------------------------------------------------------------------ the per-step protocol
    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients exist here: methods add regulariser gradients, read importance."""

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Give the controller a task loss a loop computed itself (once per forward pass, or once per optimizer step).

        Only ARD reads it (its lambda calibration, ard_calibration.py); every other method ignores it, so one
        training loop that calls it works for every method. Nothing is read from the device here."""

    def after_step(self, optimizer: torch.optim.Optimizer) -> StepRecord:
        """Parameters are updated here: methods resize. Counts the optimizer step."""
        self.step += 1
        record = StepRecord(step=self.step, phase="train")
        return self._finish(record)

    def skip_step(self, optimizer: torch.optim.Optimizer) -> StepRecord:
        """Count an optimizer step the training loop skipped (non-finite loss or gradient).

        The schedule keeps time with the loop (its phases, rounds and end fall where ``total_steps``
        puts them); nothing is learned from the step: its gradients are dropped first.
        """
        optimizer.zero_grad(set_to_none=True)
        return self.after_step(optimizer)

    # Whether a method that holds part of the update apart (the SVD methods' E) folds it into the adapters by itself
    # after the last scheduled step. A loop that checkpoints that step first, and calls finish() after, turns it off
    # (the training loop, the Trainer callback): their last checkpoint then holds the same kind of state as every other,
    # and resumes.
    fold_after_last_step: bool = True

    def finish(self) -> None:
        """End of training (also when it stops early): methods fold what they still hold apart."""

    def _finish(self, record: StepRecord) -> StepRecord:
        record.total_rank = self.total_rank()
        record.trainable_parameters = self.trainable_parameters()
        if record.resized or (self.total_steps is not None and self.step == self.total_steps):
            self.record_ranks()
        self.records.append(record)
        return record

    # ------------------------------------------------------------------ read-outs
    def ranks(self) -> dict[str, list[int]]:
        """Current rank of every group, by module."""
        return {name: layer.ranks for name, layer in self.layers.items()}

    def _cached(self) -> dict:
        """Sizes that change only when a layer's layout does (read at every step: computed once per layout).

        The version is the sum of the layers' layout versions, which only ever grow. The trainable count is the
        adapters' and the controller's own parameters plus the rest of the model's, counted once (forget_sizes)."""
        layers = self.layers.values()
        version = sum(layer.layout_version for layer in layers)
        if self._sizes is None or self._sizes[0] != version:
            adapters = rank = 0
            for layer in layers:  # a resize touches a few layers: the others' sizes are their last ones
                entry = self._layer_sizes.get(layer)
                if entry is None or entry[0] != layer.layout_version:
                    entry = (layer.layout_version, layer.num_adapter_parameters(), sum(layer.ranks))
                    self._layer_sizes[layer] = entry
                adapters += entry[1]
                rank += entry[2]
            if self._other_trainable is None:
                self._other_trainable = count_trainable(self.model) - adapters - self._own_parameter_count()
            self._sizes = (
                version,
                {
                    "total_rank": rank,
                    "adapter_parameters": adapters,
                    "trainable_parameters": self._other_trainable + adapters + self._own_parameter_count(),
                },
            )
        return self._sizes[1]

    def _own_parameter_count(self) -> int:
        """Trainable parameters the controller keeps in the model besides the adapters (ARD's alphas, E)."""
        return 0

    def forget_sizes(self) -> None:
        """Drop the cached sizes: call after changing the model's trainable parameters without a resize."""
        self._sizes = None
        self._other_trainable = None
        self._layer_sizes = {}

    def total_rank(self) -> int:
        return self._cached()["total_rank"]

    def adapter_parameters(self) -> int:
        """A and B parameters of every adapted module (what an export costs; no task head, no gates)."""
        return self._cached()["adapter_parameters"]

    def trainable_parameters(self) -> int:
        """Trainable parameters of the model (adapters, task head, the controller's own), as of the last resize."""
        return self._cached()["trainable_parameters"]

    def held_bytes(self) -> int:
        """Bytes of tensors the controller keeps beside the model and the optimizer (the SVD methods' importance scores
        and gathers); none here."""
        return 0

    def record_ranks(self) -> None:
        snapshot = {
            "step": self.step,
            "ranks": self.ranks(),
            "total_rank": self.total_rank(),
            "adapter_parameters": self.adapter_parameters(),
        }
        if self.history and self.history[-1]["step"] == self.step:
            self.history[-1] = snapshot
        else:
            self.history.append(snapshot)

    def warn_before_training(self, message: str) -> None:
        """A warning about the run as configured (logged now, before the first step; kept in ``setup_warnings``)."""
        self.setup_warnings.append(message)
        logger.warning("dynarank: %s", message)

    def warn_once(self, key: str, message: str, record: StepRecord | None = None) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        logger.warning("dynarank: %s", message)
        if record is not None:
            record.warnings.append(message)

    def run_warnings(self) -> list[str]:
        """Every warning of the run so far, in order: those said before training and those of its steps (a restored
        controller: the checkpoint's, then its own steps')."""
        return [*self._restored_warnings, *self.setup_warnings, *(w for rec in self.records for w in rec.warnings)]

    def settings_used(self) -> dict:
        """Every setting the run trains with: the config's fields (defaults included, as attached) and what the
        controller resolved from them and the run's length (JSON-ready; a run's summary records it)."""
        return {"config": self.config.to_dict(), **self._resolved()}

    def _resolved(self) -> dict:
        return {}

    # ------------------------------------------------------------------ state for checkpoints
    def state_dict(self) -> dict:
        """The controller's JSON state, with the method and the run length it belongs to (checked on load)."""
        return {
            "method": self.config.method,
            "total_steps": self.total_steps,
            "step": self.step,
            "history": self.history,
            "warned": sorted(self._warned),
            "warnings": self.run_warnings(),
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensor state a checkpoint stores beside :meth:`state_dict` (safetensors); none here."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` saved (after the model and :meth:`load_state_dict`)."""

    # What load_state_dict needs from a state (a method's controller adds its own).
    required_state: tuple[str, ...] = ("step", "history")

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (the model's state is loaded first, and :meth:`load_state_tensors`
        after). Everything is checked first (:meth:`check_state`): a refused state leaves the controller as it was."""
        self.check_state(state)
        self._load_state(state)

    def check_state(self, state: dict) -> None:
        """ValueError, before anything changes, if ``state`` is not this controller's to load: saved by another
        method, or for a run of another length (the schedule is placed in it), or missing what the method needs. A
        state saved before the method and the run length were recorded is taken without those two checks."""
        if not isinstance(state, dict):
            raise ValueError(f"a controller state is the dict state_dict() returns, got {type(state).__name__}.")
        method = self.config.method
        if "method" in state and state["method"] != method:
            raise ValueError(
                f"this controller state was saved by method {state['method']!r}, and this controller's model is "
                f"attached for {method!r}: load it into a controller of the method it was saved by."
            )
        if "total_steps" in state and state["total_steps"] != self.total_steps:
            raise ValueError(
                f"this controller state was saved by a run of total_steps={state['total_steps']}, and this controller "
                f"was built with total_steps={self.total_steps}: the rank schedule is placed in the run's length, so "
                "build the controller with the saved run's total_steps (resume with the settings it started with)."
            )
        missing = [key for key in self.required_state if key not in state]
        if missing:
            raise ValueError(
                f"this controller state lacks {', '.join(map(repr, missing))}, which a {method!r} controller needs: "
                "was it saved by another method's controller?"
            )

    def _load_state(self, state: dict) -> None:
        """Take a checked state (:meth:`check_state`); a method's controller adds its own part."""
        self.step = int(state["step"])
        self.history = list(state["history"])
        self._warned = set(state.get("warned", []))
        self._restored_warnings = [str(w) for w in state.get("warnings", [])]  # a checkpoint written before: none
