"""Quality vs trainable parameters: every method on the same data, schedule and evaluation, at equal
final adapter parameters.

Tasks (real packaged models and data, ../shared/DATA.md):

* ``minilm``: all-MiniLM-L6-v2 + a 2-way head on the packaged tweets (balanced binary sentiment:
  2,000 train; 500 validation tweets to choose the learning rate; 500 test tweets, the numbers
  reported), adapters on all six Linear types of every layer, 2 epochs (126 steps) of batch 32,
  length 64.
* ``smollm2``: SmolLM2-135M-Instruct on the packaged English dialog pairs (response-only loss;
  480 train pairs, 100 validation, 200 test), adapters on q/k/v/o of every layer, 1 epoch (60
  steps) of batch 8, length 64. Quality is the test loss (lower is better) and its perplexity.
  ARD's per-matrix and own-A variants are left out here (each SmolLM2 run costs ~5 minutes on 2 cores).
* ``smollm2-sentiment``: the same model generating the tweets' sentiment word (three-way; 480 / 100 / 200), length 96.
* ``smollm2-italian``: the same model on the packaged Italian dialog pairs, split and trained as the English ones
  (a causal-LM data set of the defaults study: benchmarks/defaults.py).

A budget is the adapter size of plain LoRA at rank r on the targets (MiniLM r = 1, 2, 6: 0.18%, 0.37%,
1.1% of the model; SmolLM2 r = 1, 4, 12: 0.09%, 0.34%, 1.0%). Every method is held to it:

    lora, dora, adalora    stock PEFT at r (DoRA adds its magnitude vectors; AdaLoRA prunes 1.5r -> r
                           ranks per matrix on average by masking, so it keeps 1.5r allocated; its
                           budget is in ranks, so what survives is reported, not the plain-LoRA count)
    adalora-physical       dynarank AdaLoRA-style: the same 1.5r start and schedule, pruned physically
                           to the parameter budget
    elalora                dynarank ElaLoRA at r per matrix, the budget as its parameter ceiling
    ard                    dynarank ARD-LoRA per head (A shared by the heads of a projection), r0 =
                           max(8, 2r), target_params = the budget
    ard-matrix             the same with one group per matrix
    ard-own                per head, each head with its own A rows (a rank costs d_in + d_head)
    ard-floor1             per head, shared A, no head below rank 1 (does not fit MiniLM's r=1 budget:
                           one rank in every head and matrix already costs more)
    full                   full fine-tuning (no budget; run once per seed)
    eva                    stock PEFT LoRA with EVA's data-driven init (init_lora_weights="eva", rho 2): the total
                           rank of LoRA at r, redistributed over the modules by explained variance; its final
                           parameter count is what it kept (a rank costs more in some modules than in others)

Ablations, run only when named, each at its base method's chosen learning rate:

    adalora-ortho0, adalora-physical-ortho0, elalora-ortho0
                           the SVD methods without the orthogonality penalty (weight 0 instead of 0.1)
    elalora-e30, elalora-ortho0-e30, adalora-physical-e30, adalora-physical-ortho0-e30
                           the singular values E trained at 30 times the adapters' rate (values_lr_ratio=30),
                           with the penalty and without it
    elalora-ortho0-lora, adalora-physical-ortho0-lora
                           without the penalty, the adapters started as plain LoRA's (A kaiming-uniform, B = 0)
                           with E = 1 (svd_init='lora') instead of P, Q ~ N(0, 0.02) and E = 0
    adalora-physical-ortho0-lora-scale1
                           the same for AdaLoRA-style with lora_alpha at its start rank (the update at scale 1,
                           plain LoRA's, instead of the fraction of the start the adapter ends at)
    elalora-switch-off     ElaLoRA whose groups may give up their last rank (switch_off=True)
    elalora-from-above     ElaLoRA started at stock AdaLoRA's 1.5r ranks per matrix and pruned into the
                           budget on the cubic schedule while it reallocates (target_params below the start)
    ard-data-scaled        ARD (per head, shared A) whose starting ranks come from the data with the defaults
                           (rank_init='data': the gradient statistic normalised per module, init_statistic=
                           'gradient-relative'; init_batches unset: one per 20 steps, 1 to 4, so 4 on MiniLM and 3
                           on SmolLM2; start at 1.5x the budget; A rows that read from the inputs what a default-drawn
                           row reads, init_scale='input'), at ARD's learning rate
    ard-data-relative      the same with A rows at the default draw's norm (init_scale='norm', the default before
                           5 Dec; every ard-data variant below but -scaled-gains has it)
    ard-data               the same with the gradient statistic not normalised (init_statistic='gradient', the
                           default before 'gradient-relative'); ard-data-activation: with the activation
                           statistic; ard-data-rho1.25 / -rho2: the gradient statistic from other starts;
                           ard-data-relative-rho2: the default statistic from 2x the budget; -rho1.01: from
                           just above it (almost nothing left to cut: the data's allocation, trained);
                           -l1-0: without the l1 term (ard_lambda=0: the budget's cap alone cuts)
    ard-data-margins       ard-data-relative with init_margin='gains': each group's alpha starts inside its rank's
                           interval, ordered by the measured gain of its last rank (the budget cuts the weakest first)
    ard-data-knapsack      ard-data-relative whose budget cap cuts by margin per parameter freed
                           (cap_order='margin-per-parameter': a shared slot's last user before its co-users)
    ard-data-scaled-gains  ard-data-scaled whose candidates are rated by what their rescaled rows deliver (gain x
                           the row's factor, init_scale='input-gains')
    ard-lora-start         ARD (per head, shared A) from plain LoRA's start: every head at the budget's rank, r0 = r,
                           random A (ARD's machinery with LoRA's allocation)

The learning rate is chosen per method from the same grid (adapters 1e-3 / 3e-3 / 1e-2 / 3e-2, full
fine-tuning 3e-5 / 1e-4 / 3e-4) on the validation set, at the middle budget and seed 0; a method whose best rate
is the grid's largest gets the next half-decade too (up to twice), whichever method it is. Every budget and seed
then runs at the chosen rate. Records go to results/quality_<task>.json (one per run; a run already there is
not repeated), the table to quality_<task>.md, the Pareto plot to quality_<task>.png.

    python benchmarks/quality.py --quick            # minilm, r=2, 1 seed, 60 steps, lr 1e-3: ~8 minutes
    python benchmarks/quality.py --quick --methods lora adalora elalora ard   # ~3 minutes (bench --quick)
    python benchmarks/quality.py --task minilm      # the full study: hours on 2 cores
    python benchmarks/quality.py --task smollm2
    python benchmarks/quality.py --task minilm --table-only
    python benchmarks/quality.py --task minilm --budgets 1 2 --methods adalora-ortho0 elalora-ortho0
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_data  # noqa: E402
from dynarank.config import ORTHO_WEIGHT  # noqa: E402
from records import PROJECTIONS, RecordStore, machine_info, projection, run_pool  # noqa: E402
from setups import peft_adalora_schedule, stock_adalora_sizes  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = [
    "full",
    "lora",
    "dora",
    "adalora",
    "adalora-physical",
    "elalora",
    "ard",
    "ard-matrix",
    "ard-own",
    "ard-floor1",
    "eva",
]


def from_above(r: int, budget: int) -> dict:
    """Start at stock AdaLoRA's initial rank (the budget stays the plain-LoRA count at r)."""
    return {"r": peft_adalora_schedule(r, 1)["init_r"]}


def data_start(statistic: str = "gradient-relative", scale: str = "norm", **changed) -> dict:
    """ARD's data-driven start with this statistic and rows' scale (the variants before 5 Dec pin 'norm', the
    default then, so that their records stay what they ran)."""
    return {"rank_init": "data", "init_statistic": statistic, "init_scale": scale, **changed}


# Ablation -> (base method, changed settings, or a function of the budget (its r, its parameters) that gives them).
# The SVD methods share the key "ortho_weight": dynarank's config field, and the loop hands it to stock PEFT
# AdaLoRA as orth_reg_weight.
# The ratio of E's rate to the adapters' that the "-e30" ablations train with, from probes on the dialogs (SmolLM2,
# r=4, seed 0, no penalty): ElaLoRA's validation loss at 1e-2 1.284 at ratio 1, 1.128 at 10, 1.114 at 30
# (docs/defaults.md).
VALUES_RATIO = 30.0
ABLATIONS = {
    "adalora-ortho0": ("adalora", {"ortho_weight": 0.0}),
    "adalora-physical-ortho0": ("adalora-physical", {"ortho_weight": 0.0}),
    "elalora-ortho0": ("elalora", {"ortho_weight": 0.0}),
    # The singular values E at VALUES_RATIO times the adapters' rate (values_lr_ratio), with and without the penalty.
    "elalora-e30": ("elalora", {"values_lr_ratio": VALUES_RATIO}),
    "elalora-ortho0-e30": ("elalora", {"ortho_weight": 0.0, "values_lr_ratio": VALUES_RATIO}),
    "adalora-physical-e30": ("adalora-physical", {"values_lr_ratio": VALUES_RATIO}),
    "adalora-physical-ortho0-e30": ("adalora-physical", {"ortho_weight": 0.0, "values_lr_ratio": VALUES_RATIO}),
    # The adapters started as plain LoRA's (A kaiming-uniform, B = 0) with E = 1 (svd_init='lora'), no penalty.
    "elalora-ortho0-lora": ("elalora", {"ortho_weight": 0.0, "svd_init": "lora"}),
    "adalora-physical-ortho0-lora": ("adalora-physical", {"ortho_weight": 0.0, "svd_init": "lora"}),
    # ... and with lora_alpha at its start rank (scale 1, plain LoRA's; its records ran lora_alpha = r, the same 1.0)
    "adalora-physical-ortho0-lora-scale1": (
        "adalora-physical",
        {"ortho_weight": 0.0, "svd_init": "lora", "alpha_at": "start"},
    ),
    "elalora-switch-off": ("elalora", {"switch_off": True}),
    "elalora-from-above": ("elalora", from_above),
    # ARD's total-variation strength (the default is ard_beta=0.1, the method "ard").
    "ard-beta0": ("ard", {"ard_beta": 0.0}),
    "ard-beta1": ("ard", {"ard_beta": 1.0}),
    "ard-beta10": ("ard", {"ard_beta": 10.0}),
    # ARD as the paper defines it: no parameter cap, the l1 strength alone sets the size (r0 from the budget's r).
    "ard-free-x0.3": ("ard", {"target_params": None, "ard_lambda": 0.3}),
    "ard-free": ("ard", {"target_params": None}),
    "ard-free-data": ("ard", {"target_params": None, "rank_init": "data"}),
    "ard-free-x3": ("ard", {"target_params": None, "ard_lambda": 3.0}),
    "ard-free-x10": ("ard", {"target_params": None, "ard_lambda": 10.0}),
    # ARD started from data-driven ranks (rank_init='data'; docs/ard.md), and its statistic, rows' scale and start size.
    "ard-data": ("ard", data_start("gradient")),
    "ard-data-activation": ("ard", data_start("activation")),
    "ard-data-relative": ("ard", data_start()),
    "ard-data-relative-rho2": ("ard", data_start(init_rho=2.0)),
    "ard-data-relative-rho1.01": ("ard", data_start(init_rho=1.01)),
    "ard-data-relative-l1-0": ("ard", data_start(ard_lambda=0.0)),
    "ard-data-scaled": ("ard", data_start(scale="input")),
    "ard-data-scaled-gains": ("ard", data_start(scale="input-gains")),
    "ard-data-margins": ("ard", data_start(init_margin="gains")),
    "ard-data-knapsack": ("ard", data_start(cap_order="margin-per-parameter")),
    "ard-data-rho1.25": ("ard", data_start("gradient", init_rho=1.25)),
    "ard-data-rho2": ("ard", data_start("gradient", init_rho=2.0)),
    # ARD from plain LoRA's start: every head at the budget's rank r (r0 = r, random A), held one parameter below
    # LoRA's size (ARD's budget must be below its start: the cap cuts one rank of one head): what ARD's alphas,
    # priors and floor cost or give against LoRA when the allocation is LoRA's.
    "ard-lora-start": ("ard", lambda r, budget: {"r": max(1, r), "target_params": budget - 1}),
}
ADAPTER_LRS, FULL_LRS = [1e-3, 3e-3, 1e-2, 3e-2], [3e-5, 1e-4, 3e-4]
# A grid whose best point is its largest rate is extended by one half-decade (x ~3.16), at most this many
# times, for every method alike: a best rate at the edge means the grid, not the method, set the result.
GRID_EXTENSIONS = 2
MINILM = {"model": "minilm", "model_params": 22_713_216}  # the encoder (sentence-embedding) parameters
SMOLLM2 = {"model": "smollm2", "model_params": 134_515_008}
CLASSIFY = {"kind": "classify", "metric": "accuracy", "higher_is_better": True}
CAUSAL = {"kind": "causal-lm", "metric": "loss", "higher_is_better": False}  # kind: dynarank.defaults' tables
TASKS = {
    # name: data set (study_data.py), model, budgets (LoRA ranks), the budget the learning rate is tuned at, schedule
    "minilm": {
        **MINILM,
        **CLASSIFY,
        "data": "tweets2",
        "budgets": [1, 2, 6],
        "tune_budget": 2,
        "steps": 126,
        "batch_size": 32,
        "max_length": 64,
    },
    "minilm-tweets3": {
        **MINILM,
        **CLASSIFY,
        "data": "tweets3",
        "budgets": [1, 2, 6],
        "tune_budget": 2,
        "steps": 132,
        "batch_size": 32,
        "max_length": 64,
    },
    "minilm-topics": {
        **MINILM,
        **CLASSIFY,
        "data": "topics",
        "budgets": [1, 2, 6],
        "tune_budget": 2,
        "steps": 160,
        "batch_size": 16,
        "max_length": 64,
    },
    "smollm2": {
        **SMOLLM2,
        **CAUSAL,
        "data": "dialogs",
        "budgets": [1, 4, 12],
        "tune_budget": 4,
        "steps": 60,
        "methods": ["full", "lora", "dora", "adalora", "adalora-physical", "elalora", "ard", "eva"],
        "batch_size": 8,
        "max_length": 64,
    },
    "smollm2-italian": {
        **SMOLLM2,
        **CAUSAL,
        "data": "dialogs_italian",
        "budgets": [1, 4, 12],
        "tune_budget": 4,
        "steps": 60,
        "methods": ["lora", "adalora", "adalora-physical", "elalora", "ard"],
        "batch_size": 8,
        "max_length": 64,
    },
    "smollm2-sentiment": {
        **SMOLLM2,
        **CAUSAL,
        "data": "sentiment_lm",
        "budgets": [1, 4, 12],
        "tune_budget": 4,
        "steps": 60,
        "methods": ["full", "lora", "dora", "adalora", "adalora-physical", "elalora", "ard"],
        "batch_size": 8,
        "max_length": 96,
    },
}
SMOLLM2_TARGETS = r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"


# Training-loop variants: a method (or ablation) with one of these suffixes trains with the loop's setting changed.
CLIPPED = "+clip"  # the gradient norm clipped to 1 before each update (TrainSpec.max_grad_norm; no clipping without)
AUTO = "+auto"  # lr='auto': the range test picks the rate around the method's default (the record's lr is that default)
LOOP_VARIANTS = (CLIPPED, AUTO)


def loop_variant(method: str) -> tuple[str, str | None]:
    """(the method or ablation, its loop variant's suffix or None)."""
    for suffix in LOOP_VARIANTS:
        if method.endswith(suffix):
            return method.removesuffix(suffix), suffix
    return method, None


def base_method(method: str) -> str:
    """The method an ablation or a loop variant changes (a method is its own base)."""
    method = loop_variant(method)[0]
    return ABLATIONS[method][0] if method in ABLATIONS else method


def auto_centre(method: str, task_name: str, budget_r: int) -> float:
    """The rate a '+auto' run searches around: its method's default for the task's kind at the budget (plain LoRA's
    rank; the record's lr). Full fine-tuning has no budget."""
    from dynarank.defaults import default_lr

    base = base_method(method)
    return default_lr(base, TASKS[task_name]["kind"], None if base == "full" else budget_r)


def variants() -> list[str]:
    """Every name --methods takes: the methods, their ablations, and each of those with the loop's variants."""
    names = [*METHODS, *ABLATIONS]
    return [*names, *(n + suffix for suffix in LOOP_VARIANTS for n in names)]


def record_key(r: dict) -> tuple:
    return (r["task"], r["method"], r["budget_r"], r["lr"], r["seed"], r["steps"])


# ---------------------------------------------------------------------------------------------- one run
def train_spec(method: str, r: int, budget: int, lr: float, seed: int, steps: int, task: dict, target: str):
    from dynarank.training.loop import TrainSpec

    plain, suffix = loop_variant(method)
    if suffix is not None:
        spec = train_spec(plain, r, budget, lr, seed, steps, task, target)
        if suffix == CLIPPED:
            spec.max_grad_norm = 1.0
        else:
            spec.lr, spec.lr_source = "auto", "auto"
        return spec
    if method in ABLATIONS:
        base, changed = ABLATIONS[method]
        spec = train_spec(base, r, budget, lr, seed, steps, task, target)
        spec.dynarank = {**spec.dynarank, **(changed(r, budget) if callable(changed) else changed)}
        return spec
    common = dict(
        lr=lr,
        max_steps=steps,
        seed=seed,
        batch_size=task["batch_size"],
        max_length=task["max_length"],
        target_modules=target,
    )
    if method.startswith("ard"):
        layout = {
            "ard": {"head_layout": "shared"},
            "ard-matrix": {"granularity": "matrix"},
            "ard-own": {},
            "ard-floor1": {"head_layout": "shared", "rank_floor": 1},
        }[method]
        # the uniform start (r0 for every head), pinned: what these records ran before 'auto' made the data start
        # the default with a budget (ard-data-scaled is that default)
        knobs = {**layout, "target_params": budget, "rank_init": "uniform"}
        return TrainSpec(method="ard", r=max(8, 2 * r), dynarank=knobs, **common)
    # The SVD methods with the orthogonality penalty at the papers' weight, pinned: what their records ran (the
    # library's default weight is the defaults study's choice between this and the "-ortho0" ablation, per kind).
    # E at the adapters' rate (values_lr_ratio 1), pinned likewise: the "-e30" ablations train it 30 times faster;
    # and the papers' start (svd_init 'adalora'), pinned likewise: the "-lora" ablations start as plain LoRA; and
    # AdaLoRA-style's lora_alpha at its target (alpha_at 'target'), pinned likewise: "-scale1" puts it at the start.
    if method == "elalora":  # a parameter budget: a rank costs more in the MLP
        knobs = {"target_params": budget, "ortho_weight": ORTHO_WEIGHT, "values_lr_ratio": 1.0, "svd_init": "adalora"}
        return TrainSpec(method=method, r=r, dynarank=knobs, **common)
    if method == "adalora-physical":  # stock AdaLoRA's start, pruned to the parameter budget (phases: defaults)
        knobs = {"target_params": budget, "ortho_weight": ORTHO_WEIGHT, "values_lr_ratio": 1.0, "svd_init": "adalora"}
        knobs["alpha_at"] = "target"
        return TrainSpec(method=method, r=stock_adalora_sizes(r)["r"], dynarank=knobs, **common)
    return TrainSpec(method=method, r=max(1, r), **common)  # full fine-tuning ignores r


def run_one(task_name: str, method: str, r: int, lr: float, seed: int, steps: int, threads: int, command: str):
    """Train and evaluate one (method, budget, lr, seed) in this process; returns the record."""
    import torch

    from dynarank.training.estimate import lora_parameters
    from dynarank.training.loop import BERT_ENCODER_LINEAR, train_causal_lm, train_classifier
    from dynarank.training.models import load_causal_lm, load_classifier, packaged_minilm_path, packaged_smollm2_path
    from dynarank.training.tasks import evaluate_causal_lm, evaluate_classifier

    torch.set_num_threads(threads)
    task = TASKS[task_name]
    train, val, test = getattr(study_data, task["data"])()
    torch.manual_seed(seed)  # the classification head is initialised at load time: make it follow the seed
    if task["model"] == "minilm":
        model, tokenizer = load_classifier(packaged_minilm_path(), train.label_names)
        target, fit, evaluate = BERT_ENCODER_LINEAR, train_classifier, evaluate_classifier
    else:
        model, tokenizer = load_causal_lm(packaged_smollm2_path())
        target, fit, evaluate = SMOLLM2_TARGETS, train_causal_lm, evaluate_causal_lm
    budget = lora_parameters(model, target, r)
    spec = train_spec(method, r, budget, lr, seed, steps, task, target)
    trajectory: list[int] = []

    def on_step(info: dict) -> None:
        trajectory.append(info["trainable_parameters"])

    t0 = time.perf_counter()
    done = fit(model, tokenizer, train, spec, on_step=on_step)
    trained, controller, result = done.model, done.controller, done.metrics
    head = sum(
        p.numel()
        for n, p in trained.named_parameters()
        if p.requires_grad and ("classifier" in n or "score" in n) and method != "full"
    )
    gates = sum(p.numel() for n, p in trained.named_parameters() if p.requires_grad and "dynarank_" in n)
    motion = {}
    if controller is not None:
        adapter = controller.adapter_parameters()
        start = controller.history[0]["adapter_parameters"]
        ranks = controller.ranks()
        motion["rank_changes"] = getattr(controller, "rank_changes", 0)
        if hasattr(controller, "cuts"):  # ARD: who cut, per resize and in total; how often ranks reversed
            motion["cuts"] = dict(controller.cuts)
            motion["cuts_by_resize"] = [
                (rec.step, rec.cut_by_alpha, rec.cut_by_budget) for rec in controller.records if rec.resized
            ]
            motion["reversals"] = controller.motion.reversals()
            motion["reversing_fraction"] = controller.motion.reversing_fraction()
    else:
        adapter = result["trainable_parameters"] - head
        start = result["trainable_parameters_start"] - head
        ranks = None
    extra = head + gates if controller is not None else head
    record = {
        "task": task_name,
        "method": method,
        "budget_r": r,
        "budget_parameters": budget,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "r": spec.r,
        "dynarank": spec.dynarank,
        "test": evaluate(trained, tokenizer, test, spec.max_length),
        "val": evaluate(trained, tokenizer, val, spec.max_length),
        "adapter_parameters": adapter,
        "adapter_parameters_start": start,
        "adapter_parameters_mean_over_training": statistics.mean(t - extra for t in trajectory) if trajectory else 0,
        "adapter_parameters_peak": max(t - extra for t in trajectory) if trajectory else 0,
        "state_bytes_start": result["state_bytes_start"],
        "state_bytes_end": result["state_bytes_end"],
        "state_bytes_peak": result.get("state_bytes_peak"),
        "state_bytes_mean": result.get("state_bytes_mean"),
        **motion,
        "peak_rss_mb": result["peak_rss_mb"],
        "seconds_per_step": result["seconds_per_step"],
        "seconds": time.perf_counter() - t0,
        "threads": threads,
        "ranks": ranks if ranks is not None else peft_ranks(trained),
        "init_seconds": result.get("init_seconds"),
        "rank_init": {k: v for k, v in result["rank_init"].items() if k != "ranks"} if "rank_init" in result else None,
        "lr_used": result["lr"],
        "lr_search": result.get("lr_search"),
        "warnings": sorted(set(result.get("warnings", []))),
        "command": command,
        "machine": machine_info(),  # records from other kinds of host agree to noise, not bitwise
    }
    if base_method(method) == "adalora":  # stock PEFT masks E: its allocated parameters never fall
        record["adapter_parameters_allocated"] = adapter
        record["adapter_parameters"] = peft_adalora_surviving_parameters(trained)
    return record


def peft_ranks(model) -> dict[str, list[int]] | None:
    """Rank of every stock PEFT LoRA module (EVA changes them), as one group per module; None for other models."""
    import torch

    found = {}
    for name, module in model.named_modules():
        a = getattr(module, "lora_A", None)
        if isinstance(a, torch.nn.ModuleDict) and "default" in a and getattr(module, "lora_E", None) is None:
            found[name] = [a["default"].weight.shape[0]]
    return found or None


def peft_adalora_surviving_parameters(model) -> int:
    """A and B parameters of the ranks stock PEFT AdaLoRA kept (its E entries that are not masked to 0).

    Its budget is in ranks: a rank kept in an MLP matrix costs more than one in an attention matrix, so
    the surviving parameter count is not the plain-LoRA budget."""
    import torch

    total = 0
    for module in model.modules():
        e = getattr(module, "lora_E", None)
        if isinstance(e, torch.nn.ParameterDict):
            for key, values in e.items():
                kept = int((values.detach() != 0).sum())
                total += kept * (module.lora_A[key].shape[1] + module.lora_B[key].shape[0])
    return total


# ---------------------------------------------------------------------------------------------- plan
def next_rate(lr: float) -> float:
    """The next half-decade point of the 1-3-10 grid (3e-2 -> 1e-1 -> 3e-1)."""
    return float(f"{lr * (10 / 3 if f'{lr:e}'.startswith('3') else 3):.0e}")


def tuning_state(store: RecordStore, task_name: str, method: str, steps: int) -> tuple[list[float], float | None]:
    """(rates still to run, chosen rate): the base grid, extended while its best validation score sits at
    its largest rate (GRID_EXTENSIONS times at most); the chosen rate is None until every needed run exists.
    An ablation takes its base method's rate (and its base's runs to find it)."""
    method = base_method(method)
    task = TASKS[task_name]
    grid = list(FULL_LRS if method == "full" else ADAPTER_LRS)
    budget = task["tune_budget"] if method != "full" else 0
    sign = 1 if task["higher_is_better"] else -1
    for extension in range(GRID_EXTENSIONS + 1):
        found = [store.get((task_name, method, budget, lr, 0, steps)) for lr in grid]
        missing = [lr for lr, r in zip(grid, found) if r is None]
        if missing:
            return missing, None
        best = max(found, key=lambda r: sign * r["val"][task["metric"]])["lr"]
        if best != grid[-1] or extension == GRID_EXTENSIONS:
            return [], best
        grid.append(next_rate(grid[-1]))
    raise AssertionError("unreachable")


def chosen_lr(store: RecordStore, task_name: str, method: str, steps: int) -> float | None:
    """The rate with the best validation score at the tuning budget, seed 0 (None: not tuned yet)."""
    return tuning_state(store, task_name, method, steps)[1]


def tuning_jobs(store: RecordStore, task_name: str, methods: list[str], steps: int) -> list[tuple]:
    """The learning-rate runs still missing (call again after they ran: an extension may follow)."""
    task = TASKS[task_name]
    jobs = []
    for method in dict.fromkeys(base_method(m) for m in methods):
        for lr in tuning_state(store, task_name, method, steps)[0]:
            jobs.append((method, 0 if method == "full" else task["tune_budget"], lr, 0))
    return jobs


def main_jobs(store, task_name: str, methods: list[str], seeds: list[int], steps: int, budgets) -> list[tuple]:
    jobs = []
    for seed in seeds:
        for method in methods:
            lr = chosen_lr(store, task_name, method, steps)
            for r in [0] if method == "full" else budgets:
                jobs.append((method, r, lr, seed))
    return jobs


# ---------------------------------------------------------------------------------------------- tables
def summarise(runs: list[dict], task_name: str, lrs: dict[str, float] | None) -> list[dict]:
    task = TASKS[task_name]
    metric = task["metric"]
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if lrs is not None and r["lr"] != lrs.get(r["method"]):
            continue
        groups.setdefault((r["method"], r["budget_r"]), []).append(r)
    for (method, budget), group in groups.items():
        group = sorted(group, key=lambda g: g["seed"])  # by_seed[i] is the run of seeds[i]
        values = [g["test"][metric] for g in group]
        row = {
            "method": method,
            "budget_r": budget,
            "lr": group[0]["lr"],
            "seeds": [g["seed"] for g in group],
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "by_seed": values,
            "adapter_parameters": statistics.mean(g["adapter_parameters"] for g in group),
            "adapter_parameters_start": statistics.mean(g["adapter_parameters_start"] for g in group),
            "adapter_parameters_mean": statistics.mean(g["adapter_parameters_mean_over_training"] for g in group),
            # None where a record predates the peak's recording (not counted as 0)
            "adapter_parameters_peak": (
                statistics.mean(g["adapter_parameters_peak"] for g in group)
                if all("adapter_parameters_peak" in g for g in group)
                else None
            ),
            "final_by_seed": [g["adapter_parameters"] for g in group],
            "allocated": statistics.mean(g.get("adapter_parameters_allocated", g["adapter_parameters"]) for g in group),
            "budget_parameters": group[0]["budget_parameters"],
            "state_bytes_start": statistics.mean(g["state_bytes_start"] for g in group),
            "state_bytes_end": statistics.mean(g["state_bytes_end"] for g in group),
            "seconds_per_step": statistics.mean(g["seconds_per_step"] for g in group),
            "peak_rss_mb": max(g["peak_rss_mb"] for g in group),
        }
        if metric == "accuracy":
            row["macro_f1"] = statistics.mean(g["test"]["macro_f1"] for g in group)
        else:
            row["perplexity"] = statistics.mean(g["test"]["perplexity"] for g in group)
        rows.append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["budget_r"], order.get(r["method"], 99)))
    judge(rows, task)
    return rows


def judge(rows: list[dict], task: dict) -> None:
    """Targets: ARD / ElaLoRA at least match stock LoRA and AdaLoRA at the same budget; share of full FT."""
    sign = 1 if task["higher_is_better"] else -1
    full = next((r for r in rows if r["method"] == "full"), None)
    for row in rows:
        peers = [r for r in rows if r["budget_r"] == row["budget_r"] and r["method"] in ("lora", "adalora")]
        row["vs_baselines"] = {p["method"]: sign * (row["mean"] - p["mean"]) for p in peers}
        if full is not None:
            row["share_of_full"] = row["mean"] / full["mean"] if sign > 0 else full["mean"] / row["mean"]


def paired(rows: list[dict], task: dict, baselines: tuple[str, ...] = ("adalora", "lora")) -> list[dict]:
    """Each method against each baseline at the same budget, seed by seed (same data order and init seed).

    Over the seeds both have: mean of (method - baseline), signed so that positive is better, its
    standard error std/sqrt(n), and how many seeds the method won, tied and lost. Seed-to-seed noise
    shared by both runs cancels in the differences, so this resolves smaller gaps than two means do.
    """
    sign = 1 if task["higher_is_better"] else -1
    found = []
    for base in baselines:
        for row in rows:
            peer = next((r for r in rows if r["method"] == base and r["budget_r"] == row["budget_r"]), None)
            if peer is None or row["method"] == base or row["method"] == "full":
                continue
            theirs = dict(zip(peer["seeds"], peer["by_seed"]))
            diffs = [sign * (v - theirs[s]) for s, v in zip(row["seeds"], row["by_seed"]) if s in theirs]
            if len(diffs) < 2:
                continue
            found.append(
                {
                    "method": row["method"],
                    "baseline": base,
                    "budget_r": row["budget_r"],
                    "n": len(diffs),
                    "mean": statistics.mean(diffs),
                    "stderr": statistics.stdev(diffs) / len(diffs) ** 0.5,
                    "won": sum(d > 0 for d in diffs),
                    "tied": sum(d == 0 for d in diffs),
                    "lost": sum(d < 0 for d in diffs),
                }
            )
    return found


def paired_table(pairs: list[dict], task_name: str) -> str:
    if not pairs:
        return ""
    metric = TASKS[task_name]["metric"]
    lines = [
        f"\n## Paired by seed\n\nTest {metric} of each method minus the baseline's at the same budget and seed "
        "(positive is better), over the seeds both ran: mean ± standard error, and seeds won / tied / lost.\n",
        "| budget (LoRA r) | method | vs | seeds | difference (mean ± s.e.) | won / tied / lost |",
        "|---|---|---|---|---|---|",
    ]
    for p in pairs:
        lines.append(
            f"| {p['budget_r']} | {p['method']} | {p['baseline']} | {p['n']} | {p['mean']:+.4f} ± {p['stderr']:.4f} | "
            f"{p['won']} / {p['tied']} / {p['lost']} |"
        )
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], task_name: str, commands: list[str], lrs: dict[str, float]) -> str:
    task = TASKS[task_name]
    metric = task["metric"]
    second = "macro_f1" if metric == "accuracy" else "perplexity"
    lines = [
        f"| budget (LoRA r) | method | lr | seeds | test {metric} (mean ± std) | {second} | "
        "adapter params at end (% of model) | at start | mean over training | "
        "params + AdamW state start -> end | s/step | peak RSS | vs LoRA / AdaLoRA | share of full FT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = " / ".join(f"{m} {v:+.4f}" for m, v in r["vs_baselines"].items() if m != r["method"]) or "-"
        alloc = f" ({r['allocated']:,.0f} allocated)" if r["allocated"] != r["adapter_parameters"] else ""
        share = f"{100 * r['share_of_full']:.1f}%" if "share_of_full" in r else "-"
        lines.append(
            f"| {r['budget_r'] or '-'} | {r['method']} | {r['lr']:g} | {len(r['seeds'])} | "
            f"{r['mean']:.4f} ± {r['std']:.4f} | {r.get(second, float('nan')):.4f} | "
            f"{r['adapter_parameters']:,.0f}{alloc} ({100 * r['adapter_parameters'] / task['model_params']:.2f}%) | "
            f"{r['adapter_parameters_start']:,.0f} | {r['adapter_parameters_mean']:,.0f} | "
            f"{r['state_bytes_start'] / 1e6:.2f} MB -> {r['state_bytes_end'] / 1e6:.2f} MB | "
            f"{r['seconds_per_step']:.2f} | {r['peak_rss_mb']:,.0f} MB | {vs} | {share} |"
        )
    lines += [
        "",
        "vs LoRA / AdaLoRA: the method's mean minus stock PEFT LoRA's and stock AdaLoRA's at the same budget, "
        "signed so that positive is better. Adapter params exclude the task head (trained in full by every "
        "method) and ARD's alphas (one per group). Stock AdaLoRA's count is what survives its masks; it keeps "
        "the allocated count in memory. s/step: two runs shared the 2 cores, one thread each. Peak RSS: the "
        "largest peak resident memory of the run's process over the seeds (model, data, activations and all).",
    ]
    if any(r["method"].endswith(AUTO) for r in rows):
        lines[-1] += (
            f" A '{AUTO}' row's lr is the default its range test searched around (lr='auto'), not the rate it trained"
            " at: the rates chosen per seed are in defaults.md's lr='auto' table and the records' lr_used."
        )
    cmd = "\n".join(f"    {c}" for c in commands)
    chosen = ", ".join(f"{m} {lr:g}" for m, lr in lrs.items())
    return (
        f"# Quality vs parameters: {task_name}\n\nCommands that produced these records "
        f"(results/quality_{task_name}.json):\n\n{cmd}\n\nLearning rates chosen on the validation set: {chosen}.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def plot(rows: list[dict], task_name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = TASKS[task_name]
    fig, ax = plt.subplots(figsize=(8, 5))
    for method in METHODS:
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["adapter_parameters"])
        if not pts:
            continue
        if method == "full":
            ax.axhline(pts[0]["mean"], color="grey", linestyle=":", label=f"full fine-tuning ({pts[0]['mean']:.3f})")
            continue
        ax.errorbar(
            [r["adapter_parameters"] for r in pts],
            [r["mean"] for r in pts],
            yerr=[r["std"] for r in pts],
            marker="o",
            capsize=3,
            label=method,
            linestyle="-" if method.startswith("ard") else "--",
        )
    # A run that diverged would squash the rest: keep the axis on the working runs and name the others.
    full = next((r["mean"] for r in rows if r["method"] == "full"), None)
    footnote: list[str] = []  # the diverged runs, wrapped below the axes (inside them, a long list squashed them)
    if full is not None and task["higher_is_better"]:
        working = [r["mean"] - r["std"] for r in rows if r["mean"] >= 0.9 * full]
        low = min(working) - 0.01
        off = [r for r in rows if r["mean"] < low]
        ax.set_ylim(bottom=low)
        if off:
            text = "; ".join(f"{r['method']} r={r['budget_r']}: {r['mean']:.3f}" for r in off)
            footnote = textwrap.wrap(f"below the axis (diverged): {text}", 150)
    ax.set_xscale("log")
    ax.set_xlabel("adapter parameters at the end of training (log)")
    ax.set_ylabel(f"test {task['metric']} (mean ± std over seeds)")
    ax.set_title(f"{task_name}: quality vs parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if footnote:
        fig.text(0.01, 0.01, "\n".join(footnote), fontsize=6, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.02 + 0.022 * len(footnote), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rank_table(runs: list[dict], lrs: dict[str, float]) -> str:
    """Where the rank methods put their ranks: mean final rank per group, and the share of groups at 0,
    by projection type (mean over seeds)."""
    rows = {}
    for r in runs:
        if r["ranks"] is None or r["lr"] != lrs.get(r["method"]):
            continue
        by_kind: dict[str, list[int]] = {}
        for module, groups in r["ranks"].items():
            by_kind.setdefault(projection(module), []).extend(groups)
        rows.setdefault((r["budget_r"], r["method"]), []).append(by_kind)
    if not rows:
        return ""
    kinds = list(PROJECTIONS)
    lines = [
        "| budget (LoRA r) | method | " + " | ".join(kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    for (budget, method), seeds in sorted(rows.items()):
        cells = []
        for kind in kinds:
            values = [statistics.mean(s[kind]) for s in seeds if kind in s]
            off = [sum(v == 0 for v in s[kind]) / len(s[kind]) for s in seeds if kind in s]
            cells.append(f"{statistics.mean(values):.2f} ({100 * statistics.mean(off):.0f}% off)" if values else "-")
        lines.append(f"| {budget} | {method} | " + " | ".join(cells) + " |")
    return (
        "\n## Where the ranks went\n\nMean final rank per group (a head, or the matrix for per-matrix methods) "
        "and the share of groups switched off, by projection type, mean over seeds.\n\n" + "\n".join(lines) + "\n"
    )


def write_tables(store: RecordStore, task_name: str, steps: int, stem: str, methods: list[str], out: Path) -> str:
    lrs = {m: lr for m in methods if (lr := chosen_lr(store, task_name, m, steps)) is not None}
    runs = [r for r in store.runs if r["task"] == task_name and r["steps"] == steps]
    rows = summarise(runs, task_name, lrs or None)
    store.data["summary"] = rows
    store.data["chosen_lr"] = lrs
    pairs = paired(rows, TASKS[task_name])
    store.data["paired"] = pairs
    store.save()
    text = (
        markdown(rows, task_name, store.data["commands"], lrs) + paired_table(pairs, task_name) + rank_table(runs, lrs)
    )
    text += data_init_table(rows, runs, task_name, lrs) + free_table(rows, runs, task_name)
    (out / f"{stem}.md").write_text(text)
    plot(rows, task_name, out / f"{stem}.png")
    return text


def lora_points(runs: list[dict], task_name: str) -> list[tuple[float, float, float, int]]:
    """Plain LoRA's curve: per budget, (mean adapter parameters, mean test metric, its rate, seeds) at the rate
    with the best mean validation score among the rates run with 2+ seeds there (the study tunes LoRA at its
    middle budget only, and that rate can diverge at a larger one)."""
    task = TASKS[task_name]
    sign = 1 if task["higher_is_better"] else -1
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["method"] == "lora":
            groups.setdefault((r["budget_r"], r["lr"]), []).append(r)
    best: dict[int, list[dict]] = {}
    for (budget, _lr), group in groups.items():
        if len(group) < 2:
            continue
        score = sign * statistics.mean(g["val"][task["metric"]] for g in group)
        if budget not in best or score > sign * statistics.mean(g["val"][task["metric"]] for g in best[budget]):
            best[budget] = group
    return sorted(
        (
            statistics.mean(g["adapter_parameters"] for g in group),
            statistics.mean(g["test"][task["metric"]] for g in group),
            group[0]["lr"],
            len(group),
        )
        for group in best.values()
    )


def lora_curve(points: list[tuple], params: float) -> float | None:
    """The LoRA curve at ``params`` adapter parameters, linear between its points (None outside them)."""
    for (x0, y0, *_), (x1, y1, *_) in zip(points, points[1:]):
        if x0 <= params <= x1:
            return y0 + (y1 - y0) * (params - x0) / (x1 - x0)
    return None


def free_table(rows: list[dict], runs: list[dict], task_name: str) -> str:
    """ARD without a budget (the ard-free variants): where each strength lands against plain LoRA's accuracy- or
    loss-vs-parameters curve at its mean final size (positive: above the curve, i.e. better at that size)."""
    free = [r for r in rows if r["method"].startswith("ard-free")]
    if not free:
        return ""
    sign = 1 if TASKS[task_name]["higher_is_better"] else -1
    points = lora_points(runs, task_name)
    curve_text = "; ".join(f"{y:.4f} at {x:,.0f} (lr {lr:g}, {n} seeds)" for x, y, lr, n in points)
    lines = [
        "\n## ARD without a budget\n\nEach strength's mean final size against plain LoRA's curve (test "
        f"{TASKS[task_name]['metric']}, linear between LoRA's budgets, each at its best validation rate among those "
        f"run: {curve_text}); positive = better than LoRA at that size.\n",
        "| method | lr | seeds | test (mean ± s.e.) | final params (range) | mean over the run | peak | "
        "LoRA curve there | difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in free:
        n = len(r["seeds"])
        curve = lora_curve(points, r["adapter_parameters"])
        there = "outside LoRA's budgets run" if curve is None else f"{curve:.4f}"
        if curve is None and points and r["adapter_parameters"] < points[0][0]:  # below LoRA's smallest budget:
            curve = points[0][1]  # against that larger LoRA (doing as well with less is above the curve)
            there = f"{curve:.4f} (LoRA's smallest budget, {points[0][0]:,.0f} parameters)"
        diff = "-" if curve is None else f"{sign * (r['mean'] - curve):+.4f}"
        peak = "-" if r["adapter_parameters_peak"] is None else f"{r['adapter_parameters_peak']:,.0f}"
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {n} | {r['mean']:.4f} ± {r['std'] / n**0.5:.4f} | "
            f"{r['adapter_parameters']:,.0f} ({min(r['final_by_seed']):,}-{max(r['final_by_seed']):,}) | "
            f"{r['adapter_parameters_mean']:,.0f} | {peak} | {there} | {diff} |"
        )
    return "\n".join(lines) + "\n"


def data_init_table(rows: list[dict], runs: list[dict], task_name: str, lrs: dict[str, float]) -> str:
    """ARD from data-driven ranks (and stock EVA): paired by seed against LoRA, EVA and uniform-start ARD; the
    adapter + AdamW state at its peak and averaged over the run, as multiples of plain LoRA's at the same budget;
    the init pass's share of the run's time."""
    ours = [r for r in rows if r["method"].startswith("ard-data") or r["method"] in ("eva", "ard")]
    if not any(r["method"] != "ard" for r in ours):
        return ""
    pairs = [
        p for p in paired(rows, TASKS[task_name], ("lora", "eva", "ard")) if p["method"] in {r["method"] for r in ours}
    ]
    lines = [
        "\n## Data-driven starting ranks\n\nState = adapter + task head + AdamW moments (+ ARD's alphas), in "
        "multiples of plain LoRA's at the same budget (LoRA's is constant). Init share: the data pass's seconds "
        "over the run's (two runs shared the cores).\n",
        "| budget (LoRA r) | method | seeds | params end / budget | params mean / budget | state peak / LoRA | "
        "state mean / LoRA | init share | batches measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in ours:
        lora = next((r for r in rows if r["method"] == "lora" and r["budget_r"] == row["budget_r"]), None)
        group = [g for g in runs if g["method"] == row["method"] and g["budget_r"] == row["budget_r"]]
        group = [g for g in group if g["lr"] == lrs.get(row["method"], g["lr"])]
        peak = statistics.mean(g["state_bytes_peak"] or 0 for g in group)
        mean = statistics.mean(g["state_bytes_mean"] or 0 for g in group)
        # the data pass itself (ARD's rank init); EVA's: its setup, attaching included
        share = statistics.mean(
            ((g.get("rank_init") or {}).get("seconds", g.get("init_seconds")) or 0) / g["seconds"] for g in group
        )
        base = lora["state_bytes_end"] if lora else float("nan")
        lines.append(
            f"| {row['budget_r']} | {row['method']} | {len(group)} | "
            f"{row['adapter_parameters'] / row['budget_parameters']:.2f} | "
            f"{row['adapter_parameters_mean'] / row['budget_parameters']:.2f} | {peak / base:.2f} | "
            f"{mean / base:.2f} | {100 * share:.1f}% | {_batches_measured(group)} |"
        )
    if pairs:
        lines += [
            "",
            "| budget (LoRA r) | method | vs | seeds | difference (mean ± s.e.) | won / tied / lost |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {p['budget_r']} | {p['method']} | {p['baseline']} | {p['n']} | {p['mean']:+.4f} ± {p['stderr']:.4f} | "
            f"{p['won']} / {p['tied']} / {p['lost']} |"
            for p in pairs
        ]
    return "\n".join(lines) + "\n"


def _batches_measured(group: list[dict]) -> str:
    """The data pass's batch counts of a group of runs ('-' for a method without one)."""
    counts = sorted({(g.get("rank_init") or {}).get("batches") for g in group} - {None})
    return " / ".join(str(c) for c in counts) or "-"


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="minilm")
    parser.add_argument("--quick", action="store_true", help="minilm, r=2, seed 0, 60 steps, lr 1e-3 (no tuning)")
    parser.add_argument("--methods", nargs="+", choices=variants(), help="default: the task's methods (no ablations)")
    parser.add_argument("--budgets", type=int, nargs="+", help="LoRA ranks that define the budgets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--lr",
        type=float,
        help="run the methods at this rate (no tuning); a record at another rate is another configuration. A '+auto' "
        "variant ignores it (its record's rate is the default it searched around), and needs none",
    )
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the task's)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one process each)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: 2 // jobs)")
    parser.add_argument("--tune-only", action="store_true", help="only the learning-rate runs")
    parser.add_argument("--table-only", action="store_true", help="redraw table and plot from the records")
    parser.add_argument(
        "--fresh", action="store_true", help="forget this study's earlier records (default: resume, skipping them)"
    )
    parser.add_argument(
        "--supersede",
        nargs="+",
        choices=variants(),
        help="move these methods' earlier records to quality_<task>_superseded.json and run them again "
        "(after a change to the method; --reason says which)",
    )
    parser.add_argument("--reason", default="", help="with --supersede: what changed (kept with the old records)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    task = TASKS[args.task]
    args.methods = args.methods or task.get("methods", METHODS)
    steps = args.steps or (60 if args.quick else task["steps"])
    budgets = args.budgets or ([task["tune_budget"]] if args.quick else task["budgets"])
    seeds = [0] if args.quick else args.seeds
    threads = args.threads or max(1, 2 // args.jobs)
    stem = f"quality_{args.task}" + ("_quick" if args.quick else "")
    store = RecordStore(args.out / f"{stem}.json", record_key, fresh=args.fresh)
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])
    if args.supersede:
        if not args.reason:
            parser.error("--supersede needs --reason: what changed in the method")
        moved = store.move_out(
            lambda r: r["method"] in args.supersede, args.out / f"{stem}_superseded.json", args.reason
        )
        print(f"{moved} earlier records of {', '.join(args.supersede)} moved to {stem}_superseded.json", flush=True)

    def done(job: tuple, record: dict) -> None:
        store.add(record)
        metric = record["test"][task["metric"]]
        print(
            f"{record['method']:17s} r={record['budget_r']} lr={record['lr']:g} seed={record['seed']} "
            f"test {task['metric']} {metric:.4f} val {record['val'][task['metric']]:.4f} "
            f"params {record['adapter_parameters']:,} (budget {record['budget_parameters']:,}) "
            f"{record['seconds']:.0f}s",
            flush=True,
        )

    def submit(jobs: list[tuple]) -> int:
        """Run the jobs not yet recorded; returns how many succeeded."""
        todo = [j for j in jobs if not store.has((args.task, j[0], j[1], j[2], j[3], steps))]
        print(f"{len(todo)} runs to do ({args.jobs} at a time, {threads} thread(s) each)", flush=True)
        failed = run_pool(
            run_one,
            [(args.task, *j[:4], steps, threads, command) for j in todo],
            args.jobs,
            lambda job, rec: done(job, rec),
        )
        return len(todo) - len(failed)

    if not args.table_only:
        store.note_command(command)
        if args.quick:
            submit([(m, 0 if m == "full" else budgets[0], 5e-5 if m == "full" else 1e-3, 0) for m in args.methods])
        else:
            if args.lr is not None or all(loop_variant(m)[1] == AUTO for m in args.methods):

                def rate(m: str, r: int) -> float:
                    return auto_centre(m, args.task, r) if loop_variant(m)[1] == AUTO else args.lr

                submit(
                    [(m, 0 if m == "full" else r, rate(m, r), s) for s in seeds for m in args.methods for r in budgets]
                )
            else:
                while jobs := tuning_jobs(store, args.task, args.methods, steps):
                    if not submit(jobs):
                        break  # every run of this round failed: do not loop on it
                if not args.tune_only:
                    submit(main_jobs(store, args.task, args.methods, seeds, steps, budgets))
    if args.quick:
        runs = [r for r in store.runs if r["steps"] == steps]
        rows = summarise(runs, args.task, None)
        text = markdown(rows, args.task, store.data["commands"], {}) + data_init_table(rows, runs, args.task, {})
        (args.out / f"{stem}.md").write_text(text)
        plot(rows, args.task, args.out / f"{stem}.png")
    else:
        recorded = {r["method"] for r in store.runs}  # loop variants only where they ran
        names = [m for m in variants() if loop_variant(m)[1] is None or m in recorded]
        text = write_tables(store, args.task, steps, stem, names, args.out)  # all recorded
    print(text)
    print(f"results: {args.out / (stem + '.md')}")


if __name__ == "__main__":
    main()
