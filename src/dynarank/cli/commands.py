"""The CLI commands that work on what ``dynarank train`` wrote: eval, export, report, inspect; and bench.

``train.py`` trains and writes run directories; this module reads them back (``load_trained``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from ..attach import attach, elastic_layers, unwrap
from ..config import DynaRankConfig
from ..export import export_peft
from ..files import naming
from ..safe_load import load_peft_adapter, peft_config, require_safetensors
from ..storage import load_adapter
from ..training.data import causal_examples, classification_examples, label_name, load_table
from ..training.loop import default_target_modules
from ..training.methods import DYNARANK_METHODS
from ..training.models import (
    check_max_length,
    infer_task,
    load_causal_lm,
    load_classifier,
    resolve_model_dir,
)
from ..training.tasks import evaluate_causal_lm, evaluate_classifier
from . import report
from .fields import UsageError
from .run_dir import ADAPTER_INFO, RunDir, first_missing, new_directory, read_adapter_info, write_adapter_info
from .train_options import other_tasks_columns, parse_target_modules

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


def _refuse_other_tasks_options(args: argparse.Namespace, task: str, path: Path) -> None:
    """ValueError naming the eval options that ``task`` would not read (a classifier's columns or --labels on a
    causal LM, a prompt / response column on a classifier): a figure must not look as if it used them."""
    other = other_tasks_columns(task) + (() if task == "classify" else ("labels",))
    given = ["--" + name.replace("_", "-") for name in other if getattr(args, name, None)]
    if given:
        them = "it" if len(given) == 1 else "them"
        raise ValueError(f"{', '.join(given)} would not be used: {path} is a {task} run; drop {them}.")


def _load_adapter_dir(path: Path, args: argparse.Namespace):
    """(model, tokenizer, info) for a plain PEFT adapter directory (ours or anyone's), named by ``args.run_dir``
    with eval's ``--model`` / ``--labels`` (and its columns, checked against the adapter's task)."""
    require_safetensors(path, "adapter")  # before the base model is loaded for nothing
    info = read_adapter_info(path)
    base = args.model or info.get("model") or peft_config(path).base_model_name_or_path
    if not base:
        raise ValueError(f"{path}: which base model does this adapter belong to? Pass --model.")
    model_dir = resolve_model_dir(base)
    info.setdefault("task", infer_task(model_dir))
    _refuse_other_tasks_options(args, info["task"], path)
    labels = args.labels
    if info["task"] == "causal-lm":
        model, tokenizer = load_causal_lm(model_dir, quantize=info.get("quantize"))
    else:
        info["label_names"] = _label_names(labels, info.get("label_names"), path)
        model, tokenizer = load_classifier(model_dir, info["label_names"])
    adapter = load_peft_adapter(model, path, info.get("label_names"), info.get("adapter_sha256"))
    return adapter, tokenizer, info


def load_trained(run: RunDir | str | Path, merged: bool = False):
    """(model, tokenizer, summary) of a run, rebuilt from its saved files: on its base loaded as it trained
    (``--quantize``), or for ``merged``, on the base in float precision (an update cannot be added into quantized
    weights; a QLoRA adapter is merged into the float base it was made from)."""
    run = RunDir.of(run)
    summary = run.read_summary()
    quantize = None if merged else summary.get("quantize")

    def load(path):
        if summary.get("task") == "causal-lm":
            return load_causal_lm(path, quantize=quantize)
        return load_classifier(path, summary["label_names"])

    if summary["method"] == "full":
        model, tokenizer = load(run.full_model)
        return model, tokenizer, summary
    model, tokenizer = load(resolve_model_dir(summary["model"]))  # a GGUF folder's cached copy, made again if gone
    if summary["method"] in DYNARANK_METHODS:
        load_adapter(model, run.native_adapter)
        return model, tokenizer, summary
    sha256 = read_adapter_info(run.adapter).get("adapter_sha256")
    peft_model = load_peft_adapter(model, run.adapter, summary.get("label_names"), sha256)
    return (peft_model.merge_and_unload() if merged else peft_model), tokenizer, summary


def eval_command(args: argparse.Namespace) -> dict:
    run = RunDir(args.run_dir)
    path = run.path
    if run.is_bare_adapter():
        model, tokenizer, summary = _load_adapter_dir(path, args)
        max_length = args.max_length or summary.get("max_length") or DEFAULT_MAX_LENGTH
    else:
        summary = run.read_summary()
        _refuse_other_tasks_options(args, summary.get("task", "classify"), path)
        if summary.get("task") != "causal-lm":
            _label_names(args.labels, summary.get("label_names"), path)
        model, tokenizer, summary = load_trained(run)
        max_length = args.max_length or run.recorded_max_length(summary) or DEFAULT_MAX_LENGTH
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
    """Call ``write(target)`` on a staging directory beside ``out``, then rename it to ``out`` (which new_directory
    found absent): a failed export leaves nothing behind, nor any folder it had to create above ``out``."""
    created = first_missing(out)
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
    run = RunDir(args.run_dir)
    out = new_directory(args.out, "export")
    method = run.read_summary()["method"]
    if not args.merged and (args.server_safe and method not in DYNARANK_METHODS or method == "full"):
        raise ValueError(f"a {method!r} run has no dynarank adapter to fold; export --merged instead.")
    if args.server_safe and run.read_summary().get("task") == "classify":
        # A LoRA-only adapter would leave out the task head the run trained: loaded anywhere, a fresh head answers.
        raise ValueError(
            f"{run.path} is a classifier run: its trained task head is not LoRA, and a --server-safe adapter holds "
            "LoRA matrices only; export without --server-safe (the head is saved with the adapter), or --merged."
        )
    model, tokenizer, summary = load_trained(run, merged=args.merged)
    info = {**summary, "max_length": run.recorded_max_length(summary)}

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
            shutil.copytree(run.adapter, target)
        write_adapter_info(target, info)

    return _write_new_dir(out, write)


def report_command(run: RunDir) -> list[Path]:
    run.read_summary()
    return report.draw(run)


def inspect_command(model: str | None, fields: dict) -> None:
    """Attach a fixed-rank adapter with ``fields`` (config fields: r, target_modules, granularity, head_layout) to
    ``model`` and print its modules, groups, ranks and parameters."""
    from rich.console import Console
    from rich.table import Table

    modules = parse_target_modules(fields.pop("target_modules", None))
    model_dir = resolve_model_dir(model)  # 'smollm2', a GGUF folder, a directory, or the packaged MiniLM
    if infer_task(model_dir) == "causal-lm":
        net, _ = load_causal_lm(model_dir)
    else:
        net, _ = load_classifier(model_dir, ["0", "1"])
    config = DynaRankConfig(**fields, target_modules=modules or default_target_modules(net))
    attach(net, config)
    table = Table(title=f"{model_dir.name}: adapters (r={config.r}, {config.granularity}, {config.head_layout})")
    for column in ("module", "split", "groups x size", "ranks", "adapter params"):
        table.add_column(column)
    total = 0
    for name, layer in elastic_layers(net).items():
        total += layer.num_adapter_parameters()
        ranks = layer.ranks
        shown = str(ranks[0]) + " each" if len(set(ranks)) == 1 else str(ranks)
        table.add_row(
            name, layer.split, f"{layer.n_groups} x {layer.group_size}", shown, f"{layer.num_adapter_parameters():,}"
        )
    table.add_row("total", "", "", "", f"{total:,}")
    Console(width=150).print(table)


def _bench_script() -> Path:
    """benchmarks/run.py of the source checkout this package was installed from."""
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "run.py"  # src/dynarank/cli/ -> the checkout
    if not script.is_file():
        raise FileNotFoundError(
            "the benchmarks live in the source checkout (benchmarks/run.py); install dynarank "
            "from it with `pip install -e .` to run them."
        )
    return script


def bench_suites() -> tuple[list[str], list[str]]:
    """(every suite, the long ones run only when named) of benchmarks/run.py, the one list of them; two empty lists
    outside a source checkout."""
    import importlib.util

    try:
        script = _bench_script()
    except FileNotFoundError:
        return [], []
    spec = importlib.util.spec_from_file_location("dynarank_bench_run", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # definitions only: it runs a suite from its __main__ guard
    return list(module.SUITES), list(module.LONG)


def bench_suites_help() -> str:
    """The --suite help: every suite, and which run by default."""
    suites, long = bench_suites()
    if not suites:
        return "suites of benchmarks/run.py in a source checkout (default: all but the long ones)"
    return f"{', '.join(suites)} (default: all but {' and '.join(long) or 'none'})"


def bench_command(args: argparse.Namespace) -> int:
    """Run benchmarks/run.py of the source checkout this package was installed from."""
    import subprocess
    import sys

    script = _bench_script()
    suites, _ = bench_suites()
    unknown = [name for name in args.suite or () if name not in suites]
    if unknown:
        named = ", ".join(repr(name) for name in unknown)
        raise UsageError(f"argument --suite: no suite {named}; the suites are {', '.join(suites)}.")
    command = [
        sys.executable,
        str(script),
        *(["--suite", *args.suite] if args.suite else []),
        *(["--quick"] if args.quick else []),
    ]
    return subprocess.run(command).returncode
