"""The CLI commands that work on a finished run: eval, export, report, inspect, demo, bench.

``runs.py`` trains and writes run directories; this module reads them back (``load_trained``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from ..attach import elastic_layers, unwrap
from ..export import export_peft
from ..files import RunFileError, naming, read_yaml
from ..safe_load import load_peft_adapter, peft_config
from ..storage import load_adapter
from ..training.data import causal_examples, classification_examples, label_name, load_table
from ..training.loop import DYNARANK_METHODS
from ..training.models import (
    check_max_length,
    infer_task,
    load_causal_lm,
    load_classifier,
    packaged_minilm_path,
    require_safetensors,
    resolve_model_dir,
)
from ..training.tasks import evaluate_causal_lm, evaluate_classifier
from . import report
from .train import (
    ADAPTER_INFO,
    new_run_dir,
    read_adapter_info,
    read_summary,
    resolve_target_modules,
    train_command,
    write_adapter_info,
)

DEFAULT_MAX_LENGTH = 64  # eval's truncation when neither --max-length nor the run says


def _label_names(given: str | None, recorded: list[str] | None, path: Path) -> list[str]:
    """--labels (comma-separated) checked against the labels a run recorded; one of them is needed. Names are
    compared as classes (``1.0`` and ``1`` are one: data.label_name)."""
    names = [n.strip() for n in given.split(",")] if given else None
    if names is not None and (len(names) < 2 or not all(names) or len({label_name(n) for n in names}) < len(names)):
        raise ValueError(f"--labels {given!r}: give two or more distinct names, comma-separated.")
    if names and recorded and [label_name(n) for n in names] != [label_name(n) for n in recorded]:
        raise ValueError(f"{path} records the labels {','.join(recorded)}; --labels {given} contradicts them: drop it.")
    if not (names or recorded):
        raise ValueError(
            f"{path} does not record its label names ({ADAPTER_INFO}): pass --labels NAME,NAME,... "
            "in the order of the classifier's outputs."
        )
    return names or list(recorded)


def _load_adapter_dir(path: Path, base: str | None, labels: str | None):
    """(model, tokenizer, info) for a plain PEFT adapter directory (ours or anyone's)."""
    require_safetensors(path, "adapter")  # before the base model is loaded for nothing
    info = read_adapter_info(path)
    base = base or info.get("model") or peft_config(path).base_model_name_or_path
    if not base:
        raise ValueError(f"{path}: which base model does this adapter belong to? Pass --model.")
    model_dir = resolve_model_dir(base)
    info.setdefault("task", infer_task(model_dir))
    if info["task"] == "causal-lm":
        model, tokenizer = load_causal_lm(model_dir)
    else:
        info["label_names"] = _label_names(labels, info.get("label_names"), path)
        model, tokenizer = load_classifier(model_dir, info["label_names"])
    adapter = load_peft_adapter(model, path, info.get("label_names"), info.get("adapter_sha256"))
    return adapter, tokenizer, info


def load_trained(run_dir: Path, merged: bool = False):
    """(model, tokenizer, summary) of a run, rebuilt from its saved files."""
    summary = read_summary(run_dir)

    def load(path):
        if summary.get("task") == "causal-lm":
            return load_causal_lm(path)
        return load_classifier(path, summary["label_names"])

    if summary["method"] == "full":
        model, tokenizer = load(run_dir / "model")
        return model, tokenizer, summary
    model, tokenizer = load(resolve_model_dir(summary["model"]))  # a GGUF folder's cached copy, made again if gone
    if summary["method"] in DYNARANK_METHODS:
        load_adapter(model, run_dir / "dynarank_adapter")
        return model, tokenizer, summary
    adapter_dir = run_dir / "adapter"
    sha256 = read_adapter_info(adapter_dir).get("adapter_sha256")
    peft_model = load_peft_adapter(model, adapter_dir, summary.get("label_names"), sha256)
    return (peft_model.merge_and_unload() if merged else peft_model), tokenizer, summary


def recorded_max_length(run_dir: Path, summary: dict) -> int | None:
    """The truncation a run trained with (summary.json; config.yaml of runs written before it was there)."""
    if summary.get("max_length"):
        return summary["max_length"]
    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        return None
    value = read_yaml(config).get("max_length")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise RunFileError(f"{config} is damaged: its max_length is {value!r}.")
    return value


def eval_command(args: argparse.Namespace) -> dict:
    path = Path(args.run_dir)
    if (path / "adapter_config.json").is_file() and not (path / "summary.json").is_file():
        model, tokenizer, summary = _load_adapter_dir(path, getattr(args, "model", None), args.labels)
        max_length = args.max_length or summary.get("max_length") or DEFAULT_MAX_LENGTH
    else:
        summary = read_summary(path)
        if summary.get("task") != "causal-lm":
            _label_names(args.labels, summary.get("label_names"), path)
        model, tokenizer, summary = load_trained(path)
        max_length = args.max_length or recorded_max_length(path, summary) or DEFAULT_MAX_LENGTH
    check_max_length(model, tokenizer, max_length, getattr(model, "name_or_path", None) or path)
    rows = load_table(args.data)
    if summary.get("task") == "causal-lm":
        pairs = causal_examples(rows, args.prompt_column, args.response_column, path=args.data)
        return evaluate_causal_lm(model, tokenizer, pairs, max_length)
    examples = classification_examples(
        rows, args.text_column, args.label_column, summary["label_names"], path=args.data
    )
    return evaluate_classifier(model, tokenizer, examples, max_length)


def _write_new_dir(out: Path, write) -> Path:
    """Call ``write(target)`` on a staging directory beside ``out``, then rename it to ``out`` (which new_run_dir
    found absent): a failed export leaves nothing behind, nor any folder it had to create above ``out``."""
    created = next((p for p in [*reversed(out.parents), out] if not p.exists()), out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with naming(out):  # a full disk names the folder (safetensors' own error names no file)
            write(stage / out.name)
        (stage / out.name).rename(out)
    except BaseException:
        if created != out:
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def export_command(args: argparse.Namespace) -> Path:
    """A plain PEFT adapter (or, --merged, the full model) in a new directory --out; an existing one is
    never replaced, whatever it holds."""
    run_dir = Path(args.run_dir)
    out = new_run_dir(args.out, "export")
    method = read_summary(run_dir)["method"]
    if not args.merged and (args.server_safe and method not in DYNARANK_METHODS or method == "full"):
        raise ValueError(f"a {method!r} run has no dynarank adapter to fold; export --merged instead.")
    model, tokenizer, summary = load_trained(run_dir, merged=args.merged)
    info = {**summary, "max_length": recorded_max_length(run_dir, summary)}

    def write(target: Path) -> None:
        if args.merged:
            if method in DYNARANK_METHODS:
                unwrap(model, merge=True)
            model.save_pretrained(target)
            tokenizer.save_pretrained(target)
            return
        if method in DYNARANK_METHODS:
            export_peft(model, target, server_safe=args.server_safe)
        else:
            shutil.copytree(run_dir / "adapter", target)
        write_adapter_info(target, info)

    return _write_new_dir(out, write)


def report_command(run_dir: Path) -> list[Path]:
    read_summary(run_dir)
    return report.draw(run_dir)


def inspect_command(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..attach import attach
    from ..config import DynaRankConfig

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
    from ..attach import select_targets
    from ..config import DynaRankConfig

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
    console = Console()
    console.print(table)
    console.print(
        "One seed. The 3-seed study of every method at equal parameters is in docs/benchmarks.md "
        "(python benchmarks/quality.py)."
    )


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
