"""ARD-LoRA's calibration of lambda (lambda_mode 'relative' or 'gradient'): the task loss observed during warm-up,
or the task gradient on the alphas, turned at the end of warm-up into a price per group (p_g: lambda_g = ard_lambda *
p_g, beta_g = ard_beta * p_g).

:class:`ARDCalibration` is a part of ``ARDController`` (ard.py), which owns the alphas, the prices and the step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import StepRecord


class ARDCalibration:
    """Loss observation during warm-up and the calibration of the per-group prices at its end."""

    @property
    def observes_loss(self) -> bool:
        """Whether a loss given to :meth:`observe_loss` is still recorded (during warm-up)."""
        return self.step < self.settings.warmup_steps

    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Record the task loss of a (micro-)batch; calibrates lambda_mode='relative'.

        Hugging Face models that return ``outputs.loss`` are observed automatically; a loop that computes its own
        loss calls this once per forward pass (or once per optimizer step, with the step's loss). A step for which
        this is called is observed through these calls alone: what the model's output gave for it is dropped, so a
        loss is never counted twice (DynaRankTrainer observes the loss the Trainer trains on this way).
        """
        if not self.observes_loss:
            return
        if self._explicit_step != self.step:  # the step's first explicit loss: it replaces the forward hook's
            while self._losses and self._losses[-1][0] == self.step:
                self._losses.pop()
            self._explicit_step = self.step
        self._record_loss(loss)

    def _record_loss(self, loss: torch.Tensor | float) -> None:
        value = (float(loss.detach()) if torch.is_tensor(loss) else float(loss)) * self.loss_weight
        if math.isfinite(value):
            self._losses.append((self.step, value))

    def _observe_model_output(self, module: nn.Module, args, output) -> None:
        """The forward hook on the model: the ``outputs.loss`` of a training forward pass, one that records a graph
        to train on. An evaluation (under no_grad / inference_mode, as the Trainer's and the training loop's run)
        is not one; neither is a step whose loss the caller observes itself. Training mode is not asked for: a
        model from ``from_pretrained`` is in eval mode, and a plain loop may train it so. A gradient-checkpointing
        recomputation reruns the checkpointed layers, never the model's forward, so it is not seen here."""
        if not self.observes_loss or self._explicit_step == self.step:
            return
        loss = getattr(output, "loss", None) if not isinstance(output, dict) else output.get("loss")
        if torch.is_tensor(loss) and loss.dim() == 0 and loss.requires_grad and torch.is_grad_enabled():
            self._record_loss(loss)

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
        return self.gates.alpha.device if backend == "nccl" else torch.device("cpu")

    def _calibrate(self, record: StepRecord) -> None:
        """Turn the relative strength into a price per group: lambda_g = ard_lambda * p_g, beta_g = ard_beta * p_g.

        'relative': p_g = r0 * dL * cost_g / P. A switched-off slot pushes its alpha up with about
        2 * r0 * (the loss it carries); dL * cost_g / P is the loss improvement of warm-up shared over
        the adapter's parameters (P at full rank), priced at the group's cost per rank. So strength 1
        keeps a slot when it carries about half its parameter share of what warm-up gained.
        'gradient': p_g = median_g(|dL/dalpha_g| / cost_g) * cost_g, the task gradient on alpha
        measured over the second half of warm-up (degenerates when warm-up converges: the gradient of
        an on slot at its optimum is ~0).
        """
        mode = self.settings.lambda_mode
        if mode == "absolute":
            return
        per_layer = [layer.costs.rank_price() for layer in self.layers.values()]
        costs = torch.tensor(
            [c for c, layer in zip(per_layer, self.layers.values()) for _ in range(layer.n_groups)], dtype=torch.float64
        )
        if mode == "relative":
            gained = self._loss_improvement()
            if gained is None:
                self.warn_once(
                    "no-loss",
                    "no task loss was observed during warm-up: the model returned no outputs.loss. Under a "
                    "transformers Trainer that computes the loss itself (compute_loss, label_smoothing_factor, TRL), "
                    "train with dynarank.DynaRankTrainer or with_dynarank(YourTrainerClass), which observe the loss "
                    "the Trainer trains on; in a custom loop call controller.observe_loss(loss) once per step. "
                    "lambda is calibrated on the alpha gradient instead.",
                    record,
                )
                mode = "gradient"
            else:
                total = sum(self.settings.r0 * c * layer.n_groups for c, layer in zip(per_layer, self.layers.values()))
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
            per_cost = self.grad_sums.detach().cpu() / count / costs.float()
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
        alpha = self.gates.alpha
        self.prices = torch.tensor([unit * float(c) for c in costs], dtype=alpha.dtype).to(alpha.device)
        self.start_alpha = alpha.detach().clone()
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
