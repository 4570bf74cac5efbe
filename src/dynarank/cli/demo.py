"""``dynarank demo``: ARD-LoRA and stock PEFT LoRA on the packaged MiniLM + tweets, at the same adapter-parameter
budget, and a table comparing them."""

from __future__ import annotations

from typing import Any

from ..training.estimate import lora_parameters
from ..training.loop import default_target_modules
from ..training.models import load_classifier, packaged_minilm_path
from .run_dir import new_directory
from .train import train_command
from .train_options import TrainOptions

DEMO_BUDGET_RANK = 2  # the demo's budget: the parameters of plain LoRA at this rank on the same modules


def demo_command(out: str | None = None, **run: Any) -> list[dict]:
    """ARD-LoRA and stock PEFT LoRA on the packaged MiniLM + tweets, at the same adapter-parameter budget.

    ARD, given nothing but the budget (its defaults: per head, A shared by the heads of a projection, ranks up to the
    studied start r0=8 at this budget), is held to the parameters of plain LoRA at rank 2 (``target_params``) and,
    with that budget, starts from ranks measured on the first training batches (``rank_init='auto'``); LoRA r=2 is
    the same budget from the first step. ``run``: ``train`` options of
    both runs (``max_steps``, ``n_train``); ``out``: the folder of the two run directories.
    """
    root = new_directory(out, "demo")
    budget = _budget()
    shared = dict(run)  # each method at its own default learning rate (dynarank.defaults)
    ard = TrainOptions(
        method="ard",
        out=str(root / "ard"),
        knobs={"target_params": budget},  # every other setting ARD's default (docs/defaults.md)
        **shared,
    )
    lora = TrainOptions(
        method="lora", out=str(root / f"lora-r{DEMO_BUDGET_RANK}"), knobs={"r": DEMO_BUDGET_RANK}, **shared
    )
    summaries = [train_command(ard), train_command(lora)]
    _print_comparison(*summaries, budget)
    return summaries


def _budget() -> int:
    """Plain LoRA's adapter parameters at DEMO_BUDGET_RANK on the modules the demo adapts."""
    model, _ = load_classifier(packaged_minilm_path(), ["0", "1"])
    return lora_parameters(model, default_target_modules(model), DEMO_BUDGET_RANK)


def _start_of(ard: dict) -> str:
    """How ARD's run started: measured ranks (the default with a budget) or every head at r0."""
    return "data start" if ard.get("rank_init") else f"r0={ard['r']}"


def _print_comparison(ard: dict, lora: dict, budget: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ARD-LoRA vs plain LoRA (stock PEFT) at the same budget ({budget:,} adapter parameters)")
    for column in ("method", "adapter params (start -> end)", "accuracy", "macro-F1", "seconds"):
        table.add_column(column, justify="right")
    ard_start = ard["trainable_parameters_start"] - (ard["trainable_parameters"] - ard["adapter_parameters"])
    rows = (
        (f"ARD-LoRA ({_start_of(ard)})", ard, f"{ard_start:,} -> {ard['adapter_parameters']:,}"),
        (f"LoRA r={lora['r']}", lora, f"{budget:,}"),
    )
    for name, run, params in rows:
        table.add_row(
            name,
            params,
            f"{run['eval']['accuracy']:.4f}",
            f"{run['eval']['macro_f1']:.4f}",
            f"{run['wall_seconds']:.0f}",
        )
    console = Console()
    console.print(table)
    console.print(
        "One seed. The 3-seed study of every method at equal parameters is in docs/benchmarks.md "
        "(python benchmarks/quality.py)."
    )
