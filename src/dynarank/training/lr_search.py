"""``lr="auto"``: a short, bounded learning-rate range test on the training data, run before training.

The fixed defaults (dynarank.defaults) are right on average over the data sets they were chosen on, but a method's
best rate moves with the data set (docs/defaults.md: the SVD methods' best causal-LM rate is 3e-2 on one data set and
1e-2 on another; ARD's best classification rate 1e-2 on the topics, 3e-3 on the tweets). The range test asks the
user's own data:

    candidates  the method's default rate for the task and its two neighbours on the half-decade ladder
                (..., 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, ...): e.g. 3e-3 -> 1e-3, 3e-3, 1e-2
    held out    HOLDOUT_FRACTION of the training examples (MIN_HOLDOUT..MAX_HOLDOUT), drawn with the run's seed;
                the user's evaluation data is never read
    probe       each candidate trains a copy of the model from the same start (seed, initialisation, data order) on
                the other training examples for the first PROBE_FRACTION of the run's steps (at least
                MIN_PROBE_STEPS, at most the run): the run's own schedule (its length, warm-up, a controller's
                phases), stopped there, the rate still high
    choice      the lowest mean loss on the held-out examples (a probe that diverges scores +inf); ties go to the
                lower rate. The run then trains from the same start on every training example at that rate.

Why the run's schedule stopped early, not the whole schedule squeezed into the probe: a squeezed schedule decays the
rate to 0 within the probe, which hides what a rate too high does over a longer run: on the dialogs (SmolLM2, ARD, 60
steps), where a run at 3e-2 diverges, squeezed probes chose 3e-2 for seed 1; the first 20 steps of the run's own
schedule score 3e-2 at 2.867 and 1e-2 at 1.385 and choose 1e-2 (docs/defaults.md).

Cost: about len(candidates) x PROBE_FRACTION of the run's steps (0.75x with the values below; more for a run under
4 x MIN_PROBE_STEPS), all before the first step; measured: 44-57% of the whole run's time (docs/defaults.md).
The search is deterministic (bitwise on CPU): the same seed picks the same rate; a resumed run reads the choice from
its checkpoint instead of searching again.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from ..config import ConfigError
from ..defaults import default_lr, source
from ..distributed import world
from .tasks import IGNORE_INDEX, NonFiniteError, batches

AUTO = "auto"
PROBE_FRACTION = 0.25  # of the run's optimizer steps, per candidate
MIN_PROBE_STEPS = 20  # a probe shorter than this sees too little of the schedule to tell rates apart
HOLDOUT_FRACTION, MIN_HOLDOUT, MAX_HOLDOUT = 0.1, 32, 512  # training examples scored, never trained on by a probe
NEIGHBOURS = 1  # rungs of the ladder on each side of the default


@dataclass
class RateSearch:
    """What the range test did: written to the run's summary (``lr_search``) and its checkpoints."""

    candidates: list[float]
    held_out_loss: list[float]  # per candidate; inf: the probe diverged
    chosen: float
    centre: float  # the method's default rate for the task
    centre_source: str
    probe_steps: int
    held_out_examples: int
    probe_examples: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def lr_source(self) -> str:
        losses = ", ".join(f"{lr:g}: {loss:.4g}" for lr, loss in zip(self.candidates, self.held_out_loss))
        return (
            f"auto: lowest held-out loss of a {self.probe_steps}-step probe per rate around the default of "
            f"{self.centre_source} ({losses})"
        )


def rung(k: int) -> float:
    """The k-th rate of the half-decade ladder: 10^(k/2) for even k, 3 x 10^((k-1)/2) for odd k (1e-2, 3e-2, ...)."""
    return float(f"{10.0 ** (k // 2) * (3 if k % 2 else 1):.0e}")


def candidates_around(rate: float, neighbours: int = NEIGHBOURS) -> list[float]:
    """``rate``'s rung and ``neighbours`` rungs either side, ascending: 3e-3 -> [1e-3, 3e-3, 1e-2]."""
    k = round(2 * math.log10(rate / 3) + 1) if rate > 0 else 0  # nearest rung: 3 x 10^e -> 2e + 1, 10^e -> 2e
    nearest = min((k - 1, k, k + 1), key=lambda j: abs(math.log(rung(j) / rate)))
    return [rung(j) for j in range(nearest - neighbours, nearest + neighbours + 1)]


def probe_steps(total: int) -> int:
    return min(total, max(MIN_PROBE_STEPS, math.ceil(PROBE_FRACTION * total)))


def split_held_out(n: int, seed: int, batch_size: int) -> tuple[list[int], list[int]]:
    """(probe examples, held-out examples), both ascending; the held-out ones drawn with ``seed``."""
    held = min(MAX_HOLDOUT, max(MIN_HOLDOUT, round(HOLDOUT_FRACTION * n)))
    if n - held < max(batch_size, MIN_HOLDOUT):
        raise ConfigError(
            "lr",
            f"'auto' holds out {held} of the {n} training examples to score its probes and needs at least "
            f"{max(batch_size, MIN_HOLDOUT)} left to train them on: give a rate, or more data.",
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 17)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def subset(encoded: dict, idx: list[int]) -> dict:
    return {key: [values[i] for i in idx] for key, values in encoded.items()}


@torch.no_grad()
def held_out_loss(model: nn.Module, encoded: dict, idx: list[int], pad_id: int, batch_size: int) -> float:
    """The mean loss over the held-out examples as training computes it: per example (classification) or per
    predicted token (a causal LM: labels shifted by one, IGNORE_INDEX skipped); inf if it is not finite."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for ids, mask, labels, _ in batches(encoded, idx, batch_size, pad_id):
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        n = int((labels[:, 1:] != IGNORE_INDEX).sum()) if labels.dim() > 1 else labels.numel()
        total += float(loss) * n
        count += n
    model.train(was_training)
    mean = total / max(1, count)
    return mean if math.isfinite(mean) else math.inf


def _agreed(losses: list[float], device: torch.device) -> list[float]:
    """Every worker's probes saw the same data and updates; the mean over workers makes the choice one choice."""
    if world()[1] == 1:
        return losses
    import torch.distributed as dist

    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor(losses, dtype=torch.float64, device=backend_device)
    dist.all_reduce(value)
    return (value / world()[1]).tolist()


def search_rate(
    model: nn.Module,
    encoded: dict,
    pad_id: int,
    spec,
    train_probe: Callable[[nn.Module, dict, object, int], nn.Module],
    total_steps: int,
) -> RateSearch:
    """Run the range test for ``spec`` (a TrainSpec whose lr is 'auto') on copies of ``model``.

    ``train_probe(model, encoded, spec, stop_after)`` trains one probe (the training loop on the run's schedule,
    stopped after ``stop_after`` steps; no checkpoints, no evaluation) and returns the trained model."""
    t0 = time.perf_counter()
    centre = default_lr(spec.method, spec.task, spec.budget_r)
    rates = candidates_around(centre)
    steps = probe_steps(total_steps)
    fit, held = split_held_out(len(encoded["input_ids"]), spec.seed, spec.batch_size)
    fit_set = subset(encoded, fit)
    losses = []
    quiet = logging.getLogger("dynarank")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a probe's schedule warnings describe the probe, not the run
    try:
        for lr in rates:
            # The run's own schedule (its length, warm-up, a controller's phases), stopped after the probe's steps.
            probe_spec = replace(spec, lr=lr, lr_source="probe", max_steps=total_steps)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    trained = train_probe(copy.deepcopy(model), fit_set, probe_spec, steps)
                losses.append(held_out_loss(trained, encoded, held, pad_id, max(spec.batch_size, 32)))
            except NonFiniteError:  # the probe stopped on non-finite steps: this rate diverges
                losses.append(math.inf)
            trained = None
    finally:
        quiet.setLevel(level)
    losses = _agreed(losses, next(model.parameters()).device)
    best = min(range(len(rates)), key=lambda i: (losses[i], rates[i]))
    if not math.isfinite(losses[best]):
        raise NonFiniteError(
            f"lr 'auto': every candidate rate ({', '.join(f'{r:g}' for r in rates)}) diverged in its probe; check "
            "the data and the model, or give a rate."
        )
    return RateSearch(
        candidates=rates,
        held_out_loss=losses,
        chosen=rates[best],
        centre=centre,
        centre_source=source(spec.task),
        probe_steps=steps,
        held_out_examples=len(held),
        probe_examples=len(fit),
        seconds=time.perf_counter() - t0,
    )
