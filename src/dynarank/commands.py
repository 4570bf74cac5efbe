"""The CLI commands that work on a finished run: eval, export, report, inspect, demo, bench.

``runs.py`` trains and writes run directories; this module reads them back (``load_trained``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from . import report
from .attach import elastic_layers, unwrap
from .data import causal_examples, classification_examples, load_table
from .export import export_peft
from .io import load_adapter
from .loop import DYNARANK_METHODS
from .models import infer_task, load_causal_lm, load_classifier, packaged_minilm_path, resolve_model_dir
from .runs import ADAPTER_INFO, new_run_dir, read_summary, resolve_target_modules, train_command, write_adapter_info
from .tasks import evaluate_causal_lm, evaluate_classifier


def _load_adapter_dir(path: Path, base: str | None):
    """(model, tokenizer, info) for a plain PEFT adapter directory (ours or anyone's)."""
    from peft import PeftModel

    info_file = path / ADAPTER_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    base = (
        base
        or info.get("model")
        or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    )
    if not base:
        raise ValueError(f"{path}: which base model does this adapter belong to? Pass --model.")
    model_dir = resolve_model_dir(base)
    info.setdefault("task", infer_task(model_dir))
    if info["task"] == "causal-lm":
        model, tokenizer = load_causal_lm(model_dir)
    else:
        if not info.get("label_names"):
            raise ValueError(f"{path} does not record its label names ({ADAPTER_INFO}); evaluate its run directory.")
        model, tokenizer = load_classifier(model_dir, info["label_names"])
    return PeftModel.from_pretrained(model, path), tokenizer, info


def load_trained(run_dir: Path, merged: bool = False):
    """(model, tokenizer, summary) of a run, rebuilt from its saved files."""
    from peft import PeftModel

    summary = read_summary(run_dir)

    def load(path):
        if summary.get("task") == "causal-lm":
            return load_causal_lm(path)
        return load_classifier(path, summary["label_names"])

    if summary["method"] == "full":
        model, tokenizer = load(run_dir / "model")
        return model, tokenizer, summary
    model, tokenizer = load(summary["model"])
    if summary["method"] in DYNARANK_METHODS:
        load_adapter(model, run_dir / "dynarank_adapter")
        return model, tokenizer, summary
    peft_model = PeftModel.from_pretrained(model, run_dir / "adapter")
    return (peft_model.merge_and_unload() if merged else peft_model), tokenizer, summary


def eval_command(args: argparse.Namespace) -> dict:
    path = Path(args.run_dir)
    if (path / "adapter_config.json").is_file() and not (path / "summary.json").is_file():
        model, tokenizer, summary = _load_adapter_dir(path, getattr(args, "model", None))
    else:
        model, tokenizer, summary = load_trained(path)
    rows = load_table(args.data)
    if summary.get("task") == "causal-lm":
        pairs = causal_examples(rows, args.prompt_column, args.response_column, path=args.data)
        return evaluate_causal_lm(model, tokenizer, pairs, args.max_length)
    examples = classification_examples(
        rows, args.text_column, args.label_column, summary["label_names"], path=args.data
    )
    return evaluate_classifier(model, tokenizer, examples, args.max_length)


def export_command(args: argparse.Namespace) -> Path:
    run_dir, out = Path(args.run_dir), Path(args.out)
    model, tokenizer, summary = load_trained(run_dir, merged=args.merged)
    if args.merged:
        if summary["method"] in DYNARANK_METHODS:
            unwrap(model, merge=True)
        new_run_dir(str(out), "export")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return out
    if summary["method"] in DYNARANK_METHODS:
        export_peft(model, out, server_safe=args.server_safe)
    elif args.server_safe or summary["method"] == "full":
        raise ValueError(f"a {summary['method']!r} run has no dynarank adapter to fold; export --merged instead.")
    else:
        new_run_dir(str(out), "export")
        shutil.copytree(run_dir / "adapter", out, dirs_exist_ok=True)
    write_adapter_info(out, summary)
    return out


def report_command(run_dir: Path) -> list[Path]:
    read_summary(run_dir)
    return report.draw(run_dir)


def inspect_command(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from .attach import attach
    from .config import DynaRankConfig

    model_dir = Path(args.model) if args.model else packaged_minilm_path()
    model, _ = load_classifier(model_dir, ["0", "1"])
    attach(
        model,
        DynaRankConfig(
            r=args.r,
            target_modules=resolve_target_modules(args.target_modules, model),
            granularity=args.granularity,
            head_layout=args.head_layout,
        ),
    )
    table = Table(title=f"{model_dir.name}: adapters (r={args.r}, {args.granularity}, {args.head_layout})")
    for column in ("module", "split", "groups x size", "ranks", "adapter params"):
        table.add_column(column)
    total = 0
    for name, layer in elastic_layers(model).items():
        total += layer.num_adapter_parameters()
        ranks = layer.ranks
        shown = str(ranks[0]) + " each" if len(set(ranks)) == 1 else str(ranks)
        table.add_row(
            name, layer.split, f"{layer.n_groups} x {layer.group_size}", shown, f"{layer.num_adapter_parameters():,}"
        )
    table.add_row("total", "", "", "", f"{total:,}")
    Console(width=150).print(table)


DEMO_BUDGET_RANK = 2  # the demo's budget: the parameters of plain LoRA at this rank on the same modules
DEMO_LR = 3e-3  # measured best for LoRA and ARD on the packaged tweets in ~100 steps (docs/benchmarks.md)


def demo_command(args: argparse.Namespace, train_defaults: dict) -> list[dict]:
    """ARD-LoRA and stock PEFT LoRA on the packaged MiniLM + tweets, at the same adapter-parameter budget.

    ARD starts at r0=8 per head (A shared by the heads of a projection) and is held to the parameters
    of plain LoRA at rank 2 (``target_params``); LoRA r=2 is the same budget from the first step.
    ``train_defaults``: the ``train`` command's defaults (the CLI passes its parser's).
    """
    root = Path(args.out) if args.out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    new_run_dir(str(root), "demo")
    defaults = {k: v for k, v in train_defaults.items() if k not in ("command", "verbose", "method", "out", "r")}
    defaults.update(max_steps=args.max_steps, n_train=args.n_train, lr=DEMO_LR)
    budget = DEMO_BUDGET_RANK * sum(m.in_features + m.out_features for m in _probe_layers(None, None))
    ard = train_command(
        argparse.Namespace(
            **{**defaults, "head_layout": "shared", "target_params": budget},
            method="ard",
            r=8,
            out=str(root / "ard"),
        ),
        quiet=False,
    )
    lora = train_command(
        argparse.Namespace(**defaults, method="lora", r=DEMO_BUDGET_RANK, out=str(root / f"lora-r{DEMO_BUDGET_RANK}")),
        quiet=False,
    )
    _print_comparison(ard, lora, budget)
    return [ard, lora]


def _probe_layers(model_dir: str | None, target_modules):
    from .attach import select_targets
    from .config import DynaRankConfig

    model, _ = load_classifier(model_dir or packaged_minilm_path(), ["0", "1"])
    names = select_targets(model, DynaRankConfig(target_modules=resolve_target_modules(target_modules, model)))
    return [model.get_submodule(n) for n in names]


def _print_comparison(ard: dict, lora: dict, budget: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ARD-LoRA vs plain LoRA (stock PEFT) at the same budget ({budget:,} adapter parameters)")
    for column in ("method", "adapter params (start -> end)", "accuracy", "macro-F1", "seconds"):
        table.add_column(column, justify="right")
    ard_start = ard["trainable_parameters_start"] - (ard["trainable_parameters"] - ard["adapter_parameters"])
    rows = (
        ("ARD-LoRA (r0=8, per head)", ard, f"{ard_start:,} -> {ard['adapter_parameters']:,}"),
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
    Console().print(table)


def bench_command(args: argparse.Namespace) -> int:
    """Run benchmarks/run.py of the source checkout this package was installed from."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"
    if not script.is_file():
        raise FileNotFoundError(
            "the benchmarks live in the source checkout (benchmarks/run.py); install dynarank "
            "from it with `pip install -e .` to run them."
        )
    command = [
        sys.executable,
        str(script),
        *(["--suite", *args.suite] if args.suite else []),
        *(["--quick"] if args.quick else []),
    ]
    return subprocess.run(command).returncode
