"""The methods a run can train: dynarank's own, and the baselines it is compared with in the same harness.

    dynarank-lora, ard, elalora, adalora-physical   dynarank's methods (``dynarank.config.METHODS``)
    lora, dora, adalora                              stock PEFT LoRA, DoRA and AdaLoRA
    eva                                              stock PEFT LoRA with EVA's data-driven ranks and init
    full                                             full fine-tuning

A baseline takes the knobs listed in :data:`BASELINE_KNOBS` and refuses every other (:func:`check_knobs`), as a
dynarank method's config refuses the knobs of other methods: nothing is silently ignored.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

from torch import nn

from ..attach import select_targets
from ..config import (
    CONFIG_CLASSES,
    METHODS,
    ORTHO_WEIGHT,
    ConfigError,
    DynaRankConfig,
    fields_of,
    methods_using,
    stock_adalora_start_rank,
)
from ..controllers.schedules import stock_adalora_phases
from ..distributed import world

DYNARANK_METHODS = METHODS  # dynarank's own: dynarank-lora, ard, elalora, adalora-physical
PEFT_METHODS = ("lora", "dora", "adalora", "eva")  # the stock PEFT baselines
DATA_INIT_BASELINES = ("eva",)  # baselines whose adapter is set from the training data before the first step
EVA_RHO = 2.0  # PEFT's default: a module may take up to rho * r ranks
EVA_MAX_BATCHES = 1000  # EVA cycles the batches until its components converge; at most this many distinct ones
BASELINES = PEFT_METHODS + ("full",)
ALL_METHODS = DYNARANK_METHODS + BASELINES
# The config fields each baseline takes. Stock PEFT LoRA and DoRA: the rank and the modules to adapt; stock AdaLoRA
# also the orthogonality penalty's weight (PEFT's orth_reg_weight, dynarank's ortho_weight). Full fine-tuning trains
# every weight: it has no adapter, so no rank and no target modules.
BASELINE_KNOBS: dict[str, tuple[str, ...]] = {
    "lora": ("r", "target_modules"),
    "dora": ("r", "target_modules"),
    "adalora": ("r", "target_modules", "ortho_weight"),
    "eva": ("r", "target_modules"),
    "full": (),
}
_IN_WORDS = {"r": "the rank", "target_modules": "the modules to adapt", "ortho_weight": "the orthogonality weight"}
TASK_HEADS = ("classifier", "score")  # trained in full by the stock baselines (PEFT's modules_to_save)


def knobs_of(method: str) -> tuple[str, ...]:
    """The config fields ``method`` takes (a dynarank method: its config class's; a baseline: BASELINE_KNOBS)."""
    if method in DYNARANK_METHODS:
        return tuple(name for name in fields_of(CONFIG_CLASSES[method]) if name != "method")
    return BASELINE_KNOBS[method]


def knob_users(name: str) -> list[str]:
    """Every method (dynarank's and the baselines) that takes config field ``name``."""
    return methods_using(name) + [m for m in BASELINES if name in BASELINE_KNOBS[m]]


def check_knobs(method: str, knobs: dict[str, Any]) -> None:
    """Refuse (ConfigError naming the fields) a method that is unknown, a knob ``method`` does not use, or (dynarank
    methods) a value its config refuses."""
    if method not in ALL_METHODS:
        raise ConfigError("method", f"{method!r} is not known; choose one of {', '.join(ALL_METHODS)}.")
    if method in DYNARANK_METHODS:
        DynaRankConfig(method=method, **knobs)
        return
    foreign = [name for name in knobs if name not in BASELINE_KNOBS[method]]
    if not foreign:
        if knobs:  # the values, checked as the first dynarank method that has these fields checks them
            next(c for c in CONFIG_CLASSES.values() if set(knobs) <= set(fields_of(c)))(**knobs)
        return
    takes = [_IN_WORDS[name] for name in BASELINE_KNOBS[method]]
    takes_text = " and ".join(filter(None, [", ".join(takes[:-1]), *takes[-1:]])) or "no adapter setting"
    users = sorted({m for name in foreign for m in knob_users(name)}, key=ALL_METHODS.index)
    it = "them" if len(foreign) > 1 else "it"
    raise ConfigError(
        tuple(foreign),
        f"not used by method {method!r}, a baseline that takes {takes_text} "
        f"({'used by ' + ', '.join(users) if users else 'no method uses ' + it}): drop {it}, or choose a method that "
        f"uses {it}.",
    )


def stock_adalora_schedule(r: int, total_steps: int) -> dict[str, int]:
    """Stock PEFT AdaLoRA as the loop builds it: ranks pruned from 1.5 r to r per matrix on average, between 10% and
    80% of the run (PEFT's init_r, target_r, tinit, tfinal, deltaT)."""
    return {"init_r": stock_adalora_start_rank(r), "target_r": r, **stock_adalora_phases(total_steps)}


def _stock_adalora_fits(total_steps: int) -> bool:
    """Whether stock AdaLoRA's phases leave a step to prune in (PEFT's tinit < total_step - tfinal)."""
    phases = stock_adalora_phases(total_steps)
    return phases["tinit"] < total_steps - phases["tfinal"]


def build_baseline(model: nn.Module, method: str, r: int, target_modules, total_steps: int, knobs: dict) -> nn.Module:
    """``model`` prepared for a baseline: every weight trainable ('full'), or wrapped by stock PEFT."""
    check_knobs(method, knobs)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    heads = [n for n in TASK_HEADS if hasattr(model, n)]
    if method == "adalora":
        if not _stock_adalora_fits(total_steps):  # PEFT would refuse in its own words, naming its own fields
            phases = stock_adalora_phases(total_steps)
            shortest = next(t for t in range(total_steps + 1, total_steps + 1000) if _stock_adalora_fits(t))
            raise ConfigError(
                "total_steps",
                f"a run of {total_steps} step(s) is too short for stock AdaLoRA's phases (PEFT's tinit = 10% and tfinal"
                f" = 20% of the run, at least 1 step each: {phases['tinit']} + {phases['tfinal']} leave no step to "
                f"prune in): train at least {shortest} steps.",
            )
        # The task type matters: without one, get_peft_model returns a bare PeftModel whose forward calls the wrapped
        # model directly and so never adds AdaLoRA's orthogonality penalty (AdaLoraModel.forward does). The penalty's
        # weight is dynarank's (the papers' 0.1, or the ortho_weight knob), so that both implementations train alike.
        config = AdaLoraConfig(
            task_type="SEQ_CLS" if heads else "CAUSAL_LM",
            lora_alpha=r,
            orth_reg_weight=knobs.get("ortho_weight", ORTHO_WEIGHT),
            target_modules=target_modules,
            total_step=total_steps,
            modules_to_save=heads or None,
            **stock_adalora_schedule(r, total_steps),
        )
    elif method == "eva":
        from peft import EvaConfig

        # EVA's budget is the total rank r x modules, redistributed by explained variance (each module up to
        # EVA_RHO x r, some to 0); lora_alpha follows each module's new rank (adjust_scaling_factors).
        config = LoraConfig(
            r=r,
            lora_alpha=r,
            target_modules=target_modules,
            modules_to_save=heads or None,
            init_lora_weights="eva",
            eva_config=EvaConfig(rho=EVA_RHO),
        )
    else:
        config = LoraConfig(
            r=r, lora_alpha=r, target_modules=target_modules, use_dora=method == "dora", modules_to_save=heads or None
        )
    trains = {p: p.requires_grad for p in model.parameters()}  # get_peft_model freezes the base in place
    with warnings.catch_warnings():
        # PEFT's advice to EVA's users about its own memory option: the harness builds EVA as its records ran it
        warnings.filterwarnings("ignore", message=".*eva initialization used with low_cpu_mem_usage=False")
        try:
            wrapped = get_peft_model(model, config)
        except ValueError as exc:
            if "No modules were targeted" not in str(exc) and "not found in the base model" not in str(exc):
                raise
            # PEFT's own message names its fields: say it as the rank methods do, with the model's Linear modules
            select_targets(model, DynaRankConfig(method="dynarank-lora", r=r, target_modules=target_modules))
            raise
    try:
        _check_start_ranks(wrapped.base_model.model, method, r)
    except ConfigError:
        wrapped.unload()  # the model as it came: its own modules, and the weights it trained
        for p, flag in trains.items():
            p.requires_grad_(flag)
        raise
    # PEFT resolves 'all-linear' to a set of names and saves it in set order, which follows the process's string
    # hashing: sorted, the same run writes the same adapter_config.json.
    for peft_config in wrapped.peft_config.values():
        if isinstance(peft_config.target_modules, (set, frozenset)):
            peft_config.target_modules = sorted(peft_config.target_modules)
    return wrapped


def _largest_start_rank(method: str, d_in: int, d_out: int) -> int:
    """The largest r at which ``method`` can start on a (d_out, d_in) weight: a rank the matrix can hold
    (min(d_in, d_out)); stock AdaLoRA starts at 1.5 r, and stock EVA's PCA takes rho x r components of the d_in
    input features."""
    holds = min(d_in, d_out)
    if method == "adalora":
        return max((r for r in range(1, holds + 1) if stock_adalora_start_rank(r) <= holds), default=0)
    if method == "eva":
        return _eva_lower_r(d_in, EVA_RHO, holds + 1)  # the d_in input rows its PCA reads cover the components
    return holds


def _check_start_ranks(model: nn.Module, method: str, r: int) -> None:
    """ConfigError unless every matrix stock PEFT adapted in ``model`` can hold the rank ``method`` starts it at, as
    dynarank's methods refuse a rank their groups cannot hold (PEFT builds the larger factors without a word)."""
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        return
    limits = {name: _largest_start_rank(method, m.in_features, m.out_features) for name, m in layers.items()}
    name = min(limits, key=limits.get)
    if r <= limits[name]:
        return
    d_in, d_out, largest = layers[name].in_features, layers[name].out_features, limits[name]
    starts = {
        "adalora": ", and stock AdaLoRA starts at 1.5 r",
        "eva": f", and stock EVA's PCA takes {EVA_RHO:g} x r components of its {d_in} input features",
    }
    if largest == min(d_in, d_out):
        advice = "Lower it."
    elif largest:
        advice = f"Lower it to {largest} at most."
    else:
        advice = "No r fits there: leave that module out of the targets."
    raise ConfigError(
        "r",
        f"{r} is larger than the model can use at {name}: the matrix there is {d_out} x {d_in}, so its rank cannot "
        f"exceed {min(d_in, d_out)}{starts.get(method, '')}. {advice}",
    )


def data_init_baseline(model: nn.Module, method: str, batches: Iterable[Mapping]) -> None:
    """Set a data-initialised baseline's adapter from the training batches (stock EVA: ranks and A from an
    incremental PCA of each module's inputs, cycling the batches until the components converge)."""
    from peft import initialize_lora_eva_weights

    if method not in DATA_INIT_BASELINES:
        raise ValueError(f"{method!r} does not initialise from data.")
    loader = []
    for batch in islice(batches, EVA_MAX_BATCHES):
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        if batch.get("labels") is not None and batch["labels"].dim() < 2:  # a class per example: no token mask
            del batch["labels"]
        loader.append(batch)
    _check_eva_rows(model, loader)
    initialize_lora_eva_weights(  # under torch.distributed, each step's PCA takes every worker's inputs of it
        model,
        dataloader=loader,
        prepare_layer_inputs_fn=_eva_layer_inputs,
        show_progress_bar=False,
        gather_distributed_inputs=True,
    )


def _eva_token_rows(batch: Mapping) -> int:
    """The input rows a batch gives each (B, T, d) module in EVA's PCA: its counted token positions (the attention
    mask, and labels other than PEFT's label mask value where the batch has token labels), as PEFT counts them."""
    import torch
    from peft import EvaConfig

    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    counted = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if batch.get("labels") is not None:
        counted = counted & (batch["labels"] != EvaConfig().label_mask_value)
    return int(counted.sum())


def _gathered_rows(counts: list[list[int]], device) -> list[list[int]]:
    """Per step, each of ``counts`` (one list per kind of row, an entry per batch): this worker's, or under
    torch.distributed the sum over the workers of their batch of that step (PEFT gathers them for each module's PCA:
    gather_distributed_inputs)."""
    import torch
    import torch.distributed as dist

    if world()[1] == 1:
        return counts
    summed = torch.zeros(len(counts), EVA_MAX_BATCHES, dtype=torch.long)  # zero-padded: one shape on every worker
    for kind, per_step in enumerate(counts):
        summed[kind, : len(per_step)] = torch.tensor(per_step, dtype=torch.long)
    summed = summed.to(device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(summed)
    return summed.tolist()


def _eva_reads_tokens(x) -> bool:
    """Whether a module input is per token, (B, T, d): EVA's PCA takes its counted token positions; any other shape
    (a pooled (B, d) input) gives it every row."""
    return x.dim() == 3


def _eva_rows_per_example(model: nn.Module, batch: Mapping) -> dict[str, int | None]:
    """Each module stock EVA's PCA reads (PEFT's choice: an adapted layer it supports), with the rows an example of a
    batch gives it: None where they are the example's counted tokens, else its input's rows per example (BERT's
    pooler: 1, the [CLS] row). Measured on one forward of ``batch``, as PEFT runs it (eval mode, adapter off)."""
    import torch
    from peft.tuners.lora.eva import UNSUPPORTED_LORA_MODULES

    examples = int(batch["input_ids"].shape[0])
    rows: dict[str, int | None] = {}

    def record(name: str):
        def hook(module, args, output) -> None:
            x = args[0]
            rows[name] = None if _eva_reads_tokens(x) else x.numel() // x.shape[-1] // examples

        return hook

    modules = model.base_model.model.named_modules()
    read = [(n, m) for n, m in modules if hasattr(m, "base_layer") and not isinstance(m, UNSUPPORTED_LORA_MODULES)]
    handles = [m.register_forward_hook(record(n)) for n, m in read]
    device, training = next(model.parameters()).device, model.training
    try:
        model.eval()
        with torch.no_grad(), model.disable_adapter():
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return rows


def _eva_lower_r(rows: int, rho: float, r: int) -> int:
    """The largest rank below ``r`` whose components (rho x r) ``rows`` input rows cover, or 0."""
    return max((lower for lower in range(1, r) if round(rho * lower) <= rows), default=0)


def _check_eva_rows(model: nn.Module, loader: list[Mapping]) -> None:
    """ConfigError unless, for every module EVA's PCA reads, some step gives it at least its components (rho x r) of
    input rows: PEFT skips a module's step with fewer rows, and with no step large enough it cycles the batches
    forever. A per-token module's rows are the batch's counted tokens, a per-example one's (BERT's pooler) its
    examples. Under torch.distributed a step's rows are the global batch's (every worker's shard of it), as PEFT
    gathers them: all workers decide alike."""
    config = next(iter(model.peft_config.values()))
    rho, r = config.eva_config.rho, config.r
    needed = round(r * rho)
    per_example = _eva_rows_per_example(model, loader[0]) if loader else {}  # none: PEFT refuses the empty loader
    counts = [[_eva_token_rows(batch) for batch in loader], [int(batch["input_ids"].shape[0]) for batch in loader]]
    tokens, examples = _gathered_rows(counts, next(model.parameters()).device)
    most = {n: max(tokens) if k is None else k * max(examples) for n, k in per_example.items()}
    short = min(most, key=most.get, default=None)  # the module with the fewest rows
    if short is None or most[short] >= needed:
        return
    lower = _eva_lower_r(most[short], rho, r)
    workers = world()[1]
    batch = "training batch" if workers == 1 else f"global training batch (its shards on {workers} workers)"
    if per_example[short] is None:
        raise ConfigError(
            ("batch_size", "max_length", "r"),
            f"stock EVA needs a batch of at least {needed} token rows ({rho:g} x r, r = {r}: its components per "
            f"module), and the largest {batch} gives {most[short]}: raise the batch size (or the max length, if it "
            f"cuts the texts)" + (f", or lower r to {lower}." if lower else "."),
        )
    each = per_example[short]
    rows = "one row" if each == 1 else f"{each} rows"
    fits = -(-needed // each)  # the examples a batch needs for the components, rounded up
    lower_r = f", lower r to {lower}," if lower else ""
    raise ConfigError(
        ("batch_size", "r", "target_modules"),
        f"stock EVA's PCA at {short} reads {rows} per example (not per token) and needs at least {needed} "
        f"({rho:g} x r, r = {r}: its components); the largest {batch} gives it {most[short]}: raise the batch size "
        f"to {fits}{lower_r} or leave that module out of the target modules.",
    )


def _eva_layer_inputs(layer_input, positions, layer_name: str):
    """A module's input rows for EVA's PCA: the counted token positions (PEFT's default, ``positions`` = (N, 2)
    indices of the attention mask and labels) of a (B, T, d) input; every row of an input of another shape (a pooled
    (B, d) one, which PEFT's default cannot index)."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if _eva_reads_tokens(x):
        return x[positions.T.unbind()]
    return x.reshape(-1, x.shape[-1]).contiguous()  # PEFT hashes it with view(-1)


def stock_step(model: nn.Module, method: str):
    """The per-step call a baseline documents (stock AdaLoRA's ``update_and_allocate(step)``), or None."""
    return model.base_model.update_and_allocate if method == "adalora" else None


def stock_allocator_bytes(model: nn.Module) -> int:
    """Stock PEFT AdaLoRA's importance EMAs (three tensors per scored parameter), or 0."""
    allocator = getattr(getattr(model, "base_model", None), "rankallocator", None)
    if allocator is None:
        return 0
    emas = (getattr(allocator, kind, {}) for kind in ("ipt", "exp_avg_ipt", "exp_avg_unc"))
    return sum(t.numel() * t.element_size() for ema in emas for t in ema.values())
