"""The ``dynarank`` command line: one parser, whose ``train``, ``inspect`` and ``demo`` options are made from the
fields they set (:mod:`.train_options`, :mod:`.fields`).

``train``, ``inspect`` and ``demo`` hold exactly what was typed (``argument_default=SUPPRESS``): an option the user
did not type is absent from the namespace, so that a --config file can supply it and the dataclass defaults fill the
rest, from one parse.
"""

from __future__ import annotations

import argparse

from .commands import bench_suites_help
from .fields import OneLineParser
from .train_options import CONFIG_OPTIONS, RUN_OPTIONS, config_groups, config_help

INSPECT_FIELDS = ("r", "target_modules", "granularity", "head_layout")  # the layout of a fixed-rank adapter
DEMO_FIELDS = ("max_steps", "n_train", "out")


def typed(args: argparse.Namespace, names) -> dict:
    """The options of ``names`` the user typed (a subcommand parsed with ``argument_default=SUPPRESS``)."""
    return {k: v for k, v in vars(args).items() if k in names}


def _train_parser(sub) -> None:
    train = sub.add_parser(
        "train", help="fine-tune a model and write a run directory", argument_default=argparse.SUPPRESS
    )
    for option in RUN_OPTIONS.values():
        option.add_to(train)
    for title, options in config_groups().items():
        group = train.add_argument_group(f"adapter options ({title})")
        for option in options:
            option.add_to(group)


def _eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a run directory on a data file (JSON on stdout)")
    run = RUN_OPTIONS
    ev.add_argument("run_dir", help="run directory written by `dynarank train`, or a PEFT adapter directory")
    ev.add_argument("--model", help="base model of a bare adapter directory (default: the one it records)")
    ev.add_argument("--data", required=True, help="CSV or JSON Lines evaluation file")
    for name in ("text_column", "label_column", "prompt_column", "response_column"):
        run[name].add_to(ev, help=run[name].help.split(" (default")[0] + " (default: guessed)")
    ev.add_argument(
        "--labels",
        help="label names of a classification adapter not written by dynarank, comma-separated, in the order of "
        "the classifier's outputs (a run directory records its own)",
    )
    run["max_length"].add_to(ev, help="tokens per example after truncation (default: the run's, else 64)")


def _export_parser(sub) -> None:
    ex = sub.add_parser("export", help="write a plain PEFT LoRA adapter (or a merged model) from a run")
    ex.add_argument("run_dir", help="run directory written by `dynarank train`")
    ex.add_argument("--out", required=True, help="output directory to create (an existing one is never replaced)")
    form = ex.add_mutually_exclusive_group()
    form.add_argument("--server-safe", action="store_true", help="scales baked into B, alpha = r (vLLM-style servers)")
    form.add_argument("--merged", action="store_true", help="write the full model with the adapter merged in")


def _inspect_parser(sub) -> None:
    ins = sub.add_parser(
        "inspect",
        help="attach adapters to a model and print its modules, groups and ranks",
        argument_default=argparse.SUPPRESS,
    )
    ins.add_argument("--model", help="local model directory (default: the packaged all-MiniLM-L6-v2)")
    for name in INSPECT_FIELDS:  # a fixed-rank adapter: dynarank-lora's defaults
        CONFIG_OPTIONS[name].add_to(ins, help=config_help(name, ("dynarank-lora",)))


def _demo_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="ARD-LoRA on the packaged MiniLM + tweets, then plain LoRA at equal parameters",
        argument_default=argparse.SUPPRESS,
    )
    run = RUN_OPTIONS
    run["max_steps"].add_to(demo, help="optimizer steps per run (default: 2 epochs of --n-train)")
    run["n_train"].add_to(demo, help="training tweets (default 2,000: the quality study's training set)")
    run["out"].add_to(demo, help="folder for the two run directories (default: runs/demo-<time>)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dynarank", description="LoRA with per-head ranks learned while training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library messages")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _eval_parser(sub)
    _export_parser(sub)
    rep = sub.add_parser("report", help="(re)draw the pictures of a run directory")
    rep.add_argument("run_dir", help="run directory written by `dynarank train`")
    _inspect_parser(sub)
    bench = sub.add_parser("bench", help="run the benchmark suites of a source checkout (benchmarks/run.py)")
    bench.add_argument("--suite", nargs="+", help=bench_suites_help())
    bench.add_argument(
        "--quick", action="store_true", help="fewer steps and one seed, into benchmarks/results/quick/ (~8 minutes)"
    )
    _demo_parser(sub)
    return parser
