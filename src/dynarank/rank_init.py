"""Data-driven starting ranks for ARD-LoRA (``ARDConfig(rank_init="data")``).

Before training, a bounded pass over K batches of the training data measures, for every adapted module, a matrix

    M = sum over tokens of  s x^T      # (d_out, d_in); x: the module's input
    s = -dL/dy                         # init_statistic='gradient' (or 'gradient-relative'): the loss gradient at
                                       #   the module's output
      | y                              # init_statistic='activation': the output itself (padding masked out)

(B = 0 on a fresh adapter, so y and dL/dy are the frozen base model's). ``rank_spectra.py`` turns M into candidate
ranks per group with their gains (singular values of the group's slice, or its share of the whole M's under shared
A; for 'gradient-relative' and 'activation' divided by the module's ||M||_F, so that modules compete by how
concentrated their statistic is rather than by its scale), keeps the best candidates per parameter until the
adapter holds ``init_rho x target_params``, points A at the kept directions (each row scaled to read from the inputs
what a default-drawn row reads, ``init_scale='input'``, or at the default draw's norm, ``'norm'``; B stays 0: the
function at step 0 is the base model's), and cuts the rest physically. ARD's alphas start at their ranks / r0
(``init_margin='equal'``), or inside their rank's interval ordered by the measured gain of each group's last rank
(``'gains'``: the budget's first cuts then take the ranks the data rated lowest), and ARD's budget then falls from this
start to ``target_params``. Without a budget there is no size to allocate: every group keeps its r ranks (the uniform
start's size; fewer where the statistic has fewer directions than r, as on a few short batches), A points along each
group's measured directions, and the alphas alone decide the size.

Under torch.distributed every worker measures its shard of each global batch and the statistics are summed across
workers (gradients then divided by the world size: a worker's loss is its shard's share of the batch mean, as DDP
training assumes), so every worker takes the same ranks.

The init runs once per run: it is recorded on the model (``RANK_INIT_ATTR``); the ARD controller keeps the record in
its checkpointed state, and a resumed run takes the layout from the checkpoint instead of measuring again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from itertools import islice

import torch
import torch.distributed as dist
from torch import nn

from .attach import ATTACHED_ATTR, CONTROLLED_ATTR, elastic_layers
from .config import ConfigError
from .defaults import task_of
from .layer import ElasticLoRALinear
from .naming import ARD_ATTR
from .rank_spectra import (
    LayerSpectrum,
    allocate,
    cut_to,
    input_energy,
    layer_spectrum,
    match_input_scale,
    write_directions,
)

logger = logging.getLogger(__name__)

RANK_INIT_ATTR = "dynarank_rank_init"  # the model attribute holding the init's record (a dict)
IGNORE_INDEX = -100
LossFn = Callable[[nn.Module, Mapping], torch.Tensor]
RELATIVE_STATISTICS = ("gradient-relative", "activation")  # gains divided by their module's ||M||_F


@dataclass
class RankInitRecord:
    """What the init did: how it measured, the budget it filled and the ranks it set."""

    statistic: str
    batches: (
        int  # batches measured (per worker; micro-batches where a run's batch is several: init_ranks' micro_batches)
    )
    tokens: int  # token positions the first adapted module each batch reaches saw (all workers)
    rho: float
    target_params: int | None
    start_budget: int  # floor(rho * target_params); without a budget, the uniform start's size
    start_params: int  # the adapter's size after the init (at most start_budget, or the floor's size)
    ranks: dict[str, list[int]]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


MAX_AUTO_BATCHES = 4  # init_batches=None measures at most this many batches...
AUTO_BATCH_STEPS = 20  # ...and one per this many optimizer steps of the run


def init_batch_count(init_batches: int | None, total_steps: int | None) -> int:
    """Batches the pass measures: ``init_batches`` when given; else one per AUTO_BATCH_STEPS steps of the run, between
    1 and MAX_AUTO_BATCHES (MAX_AUTO_BATCHES when the run's length is unknown). A measured batch is a forward and a
    backward through the whole model, about a training step (SmolLM2-135M, batch 8 x 64: 5.8 s against a step's
    5.4 s), so the pass stays near 1/20 of the training time however short the run."""
    if init_batches is not None:
        return init_batches
    if total_steps is None:
        return MAX_AUTO_BATCHES
    return max(1, min(MAX_AUTO_BATCHES, total_steps // AUTO_BATCH_STEPS))


def default_loss(model: nn.Module, batch: Mapping) -> torch.Tensor:
    """``model(**batch).loss``: a Hugging Face model given its labels."""
    return model(**batch).loss


def needs_rank_init(model: nn.Module) -> bool:
    """True if ``model`` was attached to start from measured ranks (``rank_init='data'``, or ``'auto'`` with a
    budget) and its ranks have not been initialised yet."""
    config = getattr(model, ATTACHED_ATTR, None)
    return bool(getattr(config, "data_start", False)) and getattr(model, RANK_INIT_ATTR, None) is None


def init_ranks(
    model: nn.Module,
    batches: Iterable[Mapping],
    *,
    loss_fn: LossFn = default_loss,
    optimizer: torch.optim.Optimizer | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    total_steps: int | None = None,
    micro_batches: int = 1,
) -> RankInitRecord:
    """Measure the statistic on the first ``init_batches`` of ``batches``, then set every group's starting rank and
    A directions (see the module docstring). Call it once, after ``attach`` and before ``build_controller``.

    Args:
        model: attached with ``DynaRankConfig(method="ard", target_params=N, ...)`` (rank_init 'auto' or 'data').
        batches: dicts the model accepts (with labels, for the default loss); under torch.distributed, this
            worker's shard of each global batch.
        loss_fn: the loss of a batch (gradient statistic), default ``model(**batch).loss``.
        optimizer: an optimizer that already holds the adapters (a Trainer's): the resized tensors replace the old
            ones in it.
        on_batch: called with (batches done, batches to do) after each batch (a progress bar).
        total_steps: the run's optimizer steps; with ``init_batches=None`` they set how many batches are measured
            (:func:`init_batch_count`).
        micro_batches: how many of ``batches`` make one of the run's batches (gradient accumulation: a Trainer's
            data loader yields micro-batches). ``init_batches`` counts the run's batches, so this many times as
            many of ``batches`` are measured.
    """
    config = getattr(model, ATTACHED_ATTR, None)
    if not getattr(config, "data_start", False):
        raise ConfigError(
            "rank_init", "init_ranks() needs a model attached with rank_init='data' (or 'auto' with target_params)."
        )
    if getattr(model, RANK_INIT_ATTR, None) is not None:
        raise ValueError("this model's ranks were initialised from data already; the init runs once per run.")
    if getattr(model, CONTROLLED_ATTR, False):
        raise ValueError(
            "init_ranks() runs before build_controller(): the controller sizes its budget schedule from the start it "
            "finds, and an optimizer built since would keep the tensors the init replaces. Attach again, then "
            "init_ranks(), build_controller() and the optimizer, in that order."
        )
    layers = elastic_layers(model)
    if any(len(set(layer.ranks)) != 1 or layer.max_rank != config.r for layer in layers.values()):
        raise ValueError("data-driven ranks start from a fresh adapter (every group at rank r): initialise first.")
    start = time.perf_counter()
    inputs: dict[str, torch.Tensor] | None = {} if config.init_scale != "norm" else None
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}.")
    n_batches = init_batch_count(config.init_batches, total_steps) * micro_batches
    stats, tokens, done = collect_statistics(
        model, batches, n_batches, config.init_statistic, loss_fn, on_batch, inputs=inputs
    )
    stats, tokens = _reduce(stats, tokens, config.init_statistic)
    if tokens == 0 or not any(bool(m.any()) for m in stats.values()):
        raise ValueError(
            f"the {config.init_statistic} statistic is zero for every adapted module over {done} batch(es): the data "
            "gives no signal to set ranks from (empty batches? a loss that does not depend on the adapted modules?)."
        )
    spectra = {
        name: layer_spectrum(layer, stats[name], config.init_statistic in RELATIVE_STATISTICS)
        for name, layer in layers.items()
    }
    for name, layer in layers.items():
        write_directions(layer, spectra[name])
    if inputs is not None:
        factors = _match_input_scales(layers, inputs)
        if config.init_scale == "input-gains":  # a candidate promises what its rescaled row can deliver
            for name, spectrum in spectra.items():
                spectrum.gains = spectrum.gains * factors[name].view(-1, spectrum.gains.shape[1])
    if config.target_params is not None:
        budget = int(config.init_rho * config.target_params)
    else:  # no budget: every rank kept, A along the measured directions (the alphas decide the size)
        budget = sum(layer.num_adapter_parameters() for layer in layers.values())
    keep, _ = allocate(layers, spectra, budget, config.rank_floor)
    for name, layer in layers.items():
        cut_to(layer, keep[name], optimizer)
    margins = tail_margins(layers, spectra, keep) if config.init_margin == "gains" else None
    _set_alphas(model, layers, config.r, margins)
    record = RankInitRecord(
        statistic=config.init_statistic,
        batches=done,
        tokens=tokens,
        rho=config.init_rho,
        target_params=config.target_params,
        start_budget=budget,
        start_params=sum(layer.num_adapter_parameters() for layer in layers.values()),
        ranks={name: layer.ranks for name, layer in layers.items()},
        seconds=time.perf_counter() - start,
    )
    setattr(model, RANK_INIT_ATTR, record.to_dict())
    size = (
        "no budget" if config.target_params is None else f"{record.start_params / config.target_params:.2f}x the budget"
    )
    logger.info(
        "dynarank: ranks initialised from %d batch(es) (%s statistic): %d adapter parameters (%s) in %.1f s",
        done,
        config.init_statistic,
        record.start_params,
        size,
        record.seconds,
    )
    return record


# init_margin='gains': the weakest last rank starts at r0 * alpha = r - 1/4. ARD's hard mask has a slot on while
# r0 * alpha - j > 1/2 (and the soft mask scales it by that clamped to [0, 1]), so every started rank is on, at
# least a quarter of a rank above its switch-off point; the ceil and round read-outs both give r.
MIN_MARGIN = 0.75


def tail_margins(
    layers: dict[str, ElasticLoRALinear], spectra: dict[str, LayerSpectrum], keep: dict[str, list[list[int]]]
) -> dict[str, list[float]]:
    """init_margin='gains': each group's margin r0 * alpha - (r - 1) in [MIN_MARGIN, 1], from where the measured gain
    per parameter of its last kept rank (the one ARD's budget cuts first; gain / ``rank_price``, as ``allocate``
    ranks candidates) stands among all groups' last ranks: the weakest at MIN_MARGIN, the strongest at 1, equal
    gains at equal margins. Groups without a rank get 0 (their alpha stays 0)."""
    tails = []  # (module, group, gain per parameter of the group's last kept candidate)
    for name, layer in layers.items():
        gains, price = spectra[name].gains, layer.costs.rank_price()
        tails += [(name, g, float(gains[g, kept[-1]]) / price) for g, kept in enumerate(keep[name]) if kept]
    values = torch.tensor([v for *_, v in tails], dtype=torch.float64)
    below = torch.searchsorted(values.sort().values, values)  # how many last ranks are weaker (ties: equal counts)
    share = below.double() / max(1, len(tails) - 1)
    margins = {name: [0.0] * layer.n_groups for name, layer in layers.items()}
    for (name, g, _), q in zip(tails, share.tolist()):
        margins[name][g] = MIN_MARGIN + (1.0 - MIN_MARGIN) * q
    return margins


def _set_alphas(
    model: nn.Module, layers: dict[str, ElasticLoRALinear], r0: int, margins: dict[str, list[float]] | None = None
) -> None:
    """ARD's alphas at the starting ranks: r0 * alpha_g = r_g - 1 + margin_g (margin 1 without ``margins``: alpha_g
    = r_g / r0, every rank on, as alpha = 1 is at rank r0). The ceil read-out gives r_g for any margin in (0, 1]."""
    from .controllers import prepare_parameters  # the controllers import this module's record name

    prepare_parameters(model)
    gates = getattr(model, ARD_ATTR)
    with torch.no_grad():
        for name, layer in layers.items():
            ranks = torch.tensor(layer.ranks, dtype=torch.float64)
            if margins is not None:
                ranks = torch.where(ranks > 0, ranks - 1 + torch.tensor(margins[name], dtype=torch.float64), ranks)
            gates.of(name).copy_(ranks.to(dtype=gates.alpha.dtype, device=gates.alpha.device) / r0)


def _bool(t) -> torch.Tensor | None:
    return t.bool() if torch.is_tensor(t) else None


def _scored(labels, shift: bool) -> torch.Tensor | None:
    """(B, T) bool: the positions whose output the loss scores (labels per token, -100 ignored): a position's own
    label, or (``shift``: a causal LM, which shifts the labels inside the model) the next position's."""
    if not torch.is_tensor(labels) or labels.dim() != 2:
        return None
    scored = labels != IGNORE_INDEX
    return torch.cat([scored[:, 1:], torch.zeros_like(scored[:, :1])], dim=1) if shift else scored


def _both(padding: torch.Tensor | None, scored: torch.Tensor | None) -> torch.Tensor | None:
    """The positions both masks keep; either alone where the other is missing (or laid out otherwise)."""
    if padding is None:
        return scored
    if scored is None or scored.shape != padding.shape:
        return padding
    return padding & scored


def _token_masks(model: nn.Module, batch: Mapping) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Per side of the model: (the positions the activation statistic counts, the positions that are not padding),
    each (B, T) bool or None. One side ('encoder') for a decoder-only or encoder-only model; an encoder-decoder's
    'decoder' side has the decoder's positions (its attention mask, and the labels, which its inputs are shifted
    from: a position counts by its own label) where its 'encoder' side has the input's."""
    config = getattr(model, "config", None)
    attention, labels = _bool(batch.get("attention_mask")), batch.get("labels")
    if getattr(config, "is_encoder_decoder", False):
        decoder = _bool(batch.get("decoder_attention_mask"))
        return {"encoder": (attention, attention), "decoder": (_both(decoder, _scored(labels, False)), decoder)}
    causal = task_of(model) == "causal-lm"
    return {"encoder": (_both(attention, _scored(labels, causal)), attention)}


def _rows(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(..., d) -> (N, d) float32, keeping the masked positions when ``t`` is laid out like the mask."""
    if mask is not None and t.shape[:-1] == mask.shape:
        t = t[mask.to(t.device)]
    return t.reshape(-1, t.shape[-1]).float()


INPUT_SAMPLE = 128  # input rows per module kept for init_scale='input' (a scale, not a spectrum: a sample will do)


def _sample_rows(x: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor:
    """(n <= INPUT_SAMPLE, d) float32: evenly spaced rows of ``x`` among the positions that are not padding (a fixed
    choice, no randomness; a copy, so the batch's activations are not kept alive)."""
    laid_out = attention is not None and x.shape[:-1] == attention.shape
    rows = x[attention.to(x.device)] if laid_out else x.reshape(-1, x.shape[-1])
    if rows.shape[0] > INPUT_SAMPLE:
        rows = rows[torch.linspace(0, rows.shape[0] - 1, INPUT_SAMPLE, device=rows.device).long()]
    return rows.float().clone()


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Mapping],
    n_batches: int,
    statistic: str,
    loss_fn: LossFn = default_loss,
    on_batch: Callable[[int, int], None] | None = None,
    inputs: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """(M per module (d_out, d_in) float32, token positions used, batches used) over the first ``n_batches``.

    Runs in eval mode (no dropout, no randomness drawn) and leaves no gradient on any parameter: the gradient at the
    outputs is taken with ``torch.autograd.grad``. Under a gradient statistic a batch whose loss is not finite is
    skipped (logged; the activation statistic, which sums in the forward, keeps it). ``inputs``, if given, receives
    per module a sample of the last measured batch's input rows (:data:`INPUT_SAMPLE` evenly spaced
    positions that are not padding, float32 (n, d_in)): what ``init_scale='input'`` measures the directions on.
    """
    layers = elastic_layers(model)
    device = next(model.parameters()).device
    stats = {n: torch.zeros(l.out_features, l.in_features, device=l.shared_weight.device) for n, l in layers.items()}
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (module, input, output) of this batch's forward
    state = {"masks": {}, "tokens": 0, "batch_tokens": 0, "counted": False}
    sample: dict[str, torch.Tensor] = {}  # this batch's input rows per module
    two_sided = getattr(getattr(model, "config", None), "is_encoder_decoder", False)

    def capture(name: str):
        side = "decoder" if two_sided and "decoder" in name.split(".")[:-1] else "encoder"

        def hook(module, args, output):
            x = args[0].detach()
            counted, attention = state["masks"].get(side, (None, None))
            if inputs is not None:  # kept if the batch is measured (its loss finite)
                sample[name] = _sample_rows(x, attention)
            mask = counted if statistic == "activation" else None
            if not state["counted"]:  # positions measured: what the first adapted module the batch reaches sees
                state["batch_tokens"], state["counted"] = _rows(x, mask).shape[0], True
            if statistic == "activation":
                stats[name].addmm_(_rows(output.detach(), mask).t(), _rows(x, mask))
                return None
            if not output.requires_grad:  # nothing upstream needs a gradient: a leaf of its own is enough
                output = output.detach().requires_grad_()
            seen.append((name, x, output))
            return output

        return hook

    handles = [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
    # every module's own mode, put back as it was (a frozen BatchNorm or an embedding left in eval inside a model in
    # training: model.train(True) would turn them all to training)
    modes, done = {module: module.training for module in model.modules()}, 0
    model.eval()
    try:
        for i, batch in enumerate(islice(batches, n_batches)):
            batch = _to_device(batch, device)
            state["masks"], state["batch_tokens"], state["counted"] = _token_masks(model, batch), 0, False
            sample.clear()
            if _measure(model, batch, statistic, loss_fn, seen, stats):
                done += 1
                state["tokens"] += state["batch_tokens"]
                if inputs is not None:
                    inputs.update(sample)
            else:
                logger.warning("dynarank: rank init: batch %d has a non-finite loss; skipped.", i + 1)
            seen.clear()
            if on_batch is not None:
                on_batch(i + 1, n_batches)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return stats, state["tokens"], done


def _measure(model, batch, statistic, loss_fn, seen, stats) -> bool:
    """One batch: the forward (the hooks accumulate activations) or forward + gradients at the outputs."""
    if statistic == "activation":
        with torch.no_grad():
            loss_fn(model, batch)  # the forward is what counts: the hooks sum y x^T
        return True
    with torch.enable_grad():
        loss = loss_fn(model, batch)
        if not isinstance(loss, torch.Tensor):
            keys = f" (the batch holds {sorted(batch)})" if isinstance(batch, Mapping) else ""
            raise ValueError(
                f"init_ranks(): the loss of a batch is {type(loss).__name__}, not a tensor{keys}: the model returned "
                "no loss. The default loss is model(**batch).loss, which a Hugging Face model computes only when the "
                "batch holds its labels: pass batches with labels (for a causal LM, labels = input_ids), or "
                "loss_fn=lambda model, batch: ... that returns the batch's loss."
            )
        if not bool(torch.isfinite(loss)):
            return False
        if not loss.requires_grad:
            raise ValueError("the loss does not depend on the adapted modules: no gradient statistic to measure.")
        grads = torch.autograd.grad(loss, [out for _, _, out in seen], allow_unused=True)
    for (name, x, _), grad in zip(seen, grads):
        if grad is not None:
            # s = -dL/dy; the sign does not change M's singular values or vectors' spans.
            stats[name].addmm_(_rows(grad, None).t(), _rows(x, None), alpha=-1.0)
    return True


def _match_input_scales(
    layers: dict[str, ElasticLoRALinear], inputs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """init_scale='input': every written direction rescaled to read what a default-drawn A row reads
    (``rank_spectra.match_input_scale``), from the sampled inputs of every worker (their sums reduced: every worker
    writes the same factors). Returns each layer's factors (float64, in ``input_energy``'s order)."""
    energies = {}
    for name, layer in layers.items():
        x = inputs.get(name)
        if x is None:  # a module the last batch did not reach
            x = torch.zeros(0, layer.in_features)
        energies[name] = input_energy(layer, x)
    flat = torch.cat([torch.cat(pair) for pair in energies.values()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # NCCL reduces on the device the layers are on (not the current CUDA device: a worker may not have set it)
        buffer = flat.to(next(iter(layers.values())).shared_weight.device) if dist.get_backend() == "nccl" else flat
        dist.all_reduce(buffer)
        flat = buffer.cpu()
    offset, factors = 0, {}
    for name, layer in layers.items():
        n = energies[name][0].numel()
        proj, norm = flat[offset : offset + n], flat[offset + n : offset + 2 * n]
        factors[name] = match_input_scale(layer, proj, norm)
        offset += 2 * n
    return factors


def _reduce(stats: dict[str, torch.Tensor], tokens: int, statistic: str) -> tuple[dict[str, torch.Tensor], int]:
    """Sum every worker's statistics (gradients: their mean, DDP's convention); a no-op in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats, tokens
    nccl = dist.get_backend() == "nccl"
    n = dist.get_world_size()
    for name, m in stats.items():  # the same order on every worker
        buffer = m if nccl or m.device.type == "cpu" else m.cpu()
        dist.all_reduce(buffer)
        if statistic != "activation":  # a gradient statistic
            buffer /= n
        stats[name] = buffer.to(m.device)
    count = torch.tensor([tokens], dtype=torch.long, device=next(iter(stats.values())).device if nccl else "cpu")
    dist.all_reduce(count)
    return stats, int(count.item())
