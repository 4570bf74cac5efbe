"""The ``dynarank`` command: train, eval, export, report, inspect, demo.

Every user error (bad option, bad file, bad value) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import warnings
from pathlib import Path

from ..storage import AdapterFormatError
from ..training.data import DataError
from ..training.loop import ALL_METHODS, NonFiniteError
from ..training.models import ModelError
from . import commands, train, train_options


def _safetensors_error() -> type[BaseException]:
    from safetensors import SafetensorError

    return SafetensorError


# OSError: a path the user gave that cannot be read or written (missing, a file where a folder is due, no
# permission, disk full). ValueError: the library's validation of the values the user gave (and damaged files,
# which name themselves). A run stopped on a NaN/inf (--on-nonfinite stop, too many skipped steps, outputs that are
# not finite) is an outcome of the data and settings, reported like bad input. SafetensorError: a weights file that
# a third-party loader found damaged (dynarank's own reads name the file first).
USER_ERRORS = (
    DataError,
    ModelError,
    AdapterFormatError,
    ValueError,
    OSError,
    NotImplementedError,
    NonFiniteError,
    _safetensors_error(),
)


class UsageError(Exception):
    """A command line argparse refused; its text is the one line to print."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors raised as one line instead of printed after the whole usage block."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


class Number:
    """An option type for command-line text and YAML values alike: refuses booleans, non-finite values,
    non-integral numbers where an integer is due, and values below the bound."""

    def __init__(self, kind: type, low: float | None = None, inclusive: bool = True, description: str = "") -> None:
        self.kind, self.low, self.inclusive, self.description = kind, low, inclusive, description
        self.__name__ = description

    def __call__(self, value):
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise argparse.ArgumentTypeError(f"{value!r} is not {self.description}")
        try:
            if self.kind is float:
                number = float(value)
            elif isinstance(value, float) and value.is_integer():
                number = int(value)
            else:
                number = value if isinstance(value, int) else int(str(value).strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {self.description}") from None
        too_low = self.low is not None and (number < self.low or (number == self.low and not self.inclusive))
        if not math.isfinite(number) or too_low:
            raise argparse.ArgumentTypeError(f"{value!r} is not {self.description}")
        return number


INTEGER = Number(int, description="an integer")
POSITIVE_INT = Number(int, 0, inclusive=False, description="a positive integer")
NON_NEGATIVE_INT = Number(int, 0, description="an integer >= 0")
NUMBER = Number(float, description="a number")
POSITIVE = Number(float, 0, inclusive=False, description="a positive number")
NON_NEGATIVE = Number(float, 0, description="a number >= 0")


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="local Hugging Face model directory, or 'smollm2' for the packaged SmolLM2-135M-Instruct "
        "(default: the packaged all-MiniLM-L6-v2)",
    )
    p.add_argument(
        "--data",
        help="CSV or JSON Lines training file (default: the packaged tweets, binary sentiment; for a "
        "causal LM the packaged English dialog pairs)",
    )
    p.add_argument("--task", choices=["classify", "causal-lm"], help="task (default: inferred from the model)")
    p.add_argument("--text-column", help="text column (default: guessed: text, sentence, ...)")
    p.add_argument("--label-column", help="label column (default: guessed: label, sentiment, ...)")
    p.add_argument("--prompt-column", help="causal-lm: prompt column (default: guessed: prompt, question, ...)")
    p.add_argument("--response-column", help="causal-lm: response column (default: guessed: response, answer, ...)")
    p.add_argument(
        "--method",
        choices=ALL_METHODS,
        default="ard",
        help="ard: learned per-head ranks; elalora: importance-scored prune and expand; adalora-physical: "
        "importance-scored pruning that frees memory; dynarank-lora: fixed per-head ranks; lora / dora / "
        "adalora: stock PEFT baselines; full: full fine-tuning",
    )
    p.add_argument(
        "--r0",
        "--r",
        dest="r",
        type=POSITIVE_INT,
        default=8,
        help="initial rank per group (higher: more capacity and memory); spell it --r0 under torchrun",
    )
    p.add_argument(
        "--target-modules",
        help="regex of module names, a comma list of suffixes, or all-linear "
        "(default: every attention and MLP Linear of the encoder)",
    )
    p.add_argument("--granularity", choices=["head", "matrix"], help="rank groups per head or per matrix (ard)")
    p.add_argument("--head-layout", choices=["own", "shared"], help="per-head A rows, or A shared by the heads")
    p.add_argument("--ard-lambda", type=NON_NEGATIVE, help="ARD l1 strength (relative; higher: smaller ranks)")
    p.add_argument(
        "--rank-floor", type=NON_NEGATIVE_INT, help="smallest rank a group can end at (0: heads can switch off)"
    )
    p.add_argument("--preset", choices=["default", "paper"], help="ARD settings: calibrated, or the paper's values")
    p.add_argument(
        "--target-params",
        type=POSITIVE_INT,
        help="adapter-parameter budget at the end (ard, elalora, adalora-physical; elalora: a ceiling, or below "
        "its start a budget it prunes into); compare methods at equal parameters with it",
    )
    p.add_argument(
        "--target-rank",
        type=POSITIVE,
        help="adalora-physical, elalora: final mean rank per group, below --r (rank budget; elalora prunes into it "
        "while reallocating)",
    )
    p.add_argument("--lambda-mode", choices=["relative", "gradient", "absolute"], help="ARD: how --ard-lambda is read")
    p.add_argument("--ard-beta", type=NON_NEGATIVE, help="ARD: weight of the total-variation (rank stability) term")
    p.add_argument(
        "--lr-alpha", type=NON_NEGATIVE, help="ARD: learning rate of the alphas (default: fitted to the run)"
    )
    p.add_argument("--warmup-frac", type=NUMBER, help="fraction of steps before ranks may change (default 0.2)")
    p.add_argument("--final-frac", type=NUMBER, help="fraction of steps at the end with ranks fixed (default 0.15)")
    p.add_argument(
        "--resize-every", type=POSITIVE_INT, help="optimizer steps between rank changes (default: ~20 per run)"
    )
    p.add_argument("--epochs", type=POSITIVE, default=2.0, help="passes over the training data")
    p.add_argument("--max-steps", type=POSITIVE_INT, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=32, help="examples per optimizer step")
    p.add_argument("--lr", type=POSITIVE, default=1e-3, help="learning rate of the adapters (and the task head)")
    p.add_argument("--max-length", type=POSITIVE_INT, default=64, help="tokens per example after truncation")
    p.add_argument("--seed", type=INTEGER, default=0, help="random seed (data order, initialisation)")
    p.add_argument("--eval-split", type=NUMBER, default=0.2, help="fraction of --data held out for evaluation")
    p.add_argument("--eval-data", help="separate evaluation file (same columns); overrides --eval-split")
    p.add_argument(
        "--eval-every", type=POSITIVE_INT, help="also evaluate every N optimizer steps (logged in metrics.jsonl)"
    )
    p.add_argument("--n-train", type=POSITIVE_INT, default=2000, help="examples taken from the packaged tweets")
    p.add_argument("--out", help="run directory to create (default: runs/<method>-<time>); never overwritten")
    p.add_argument("--config", help="YAML file whose keys are these options (command-line values win)")
    p.add_argument(
        "--save-every", type=POSITIVE_INT, help="checkpoint the whole training state every N optimizer steps"
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest complete checkpoint")
    p.add_argument(
        "--on-nonfinite",
        choices=["skip", "stop"],
        default="skip",
        help="NaN/inf loss or gradient: skip the step, or stop (the last checkpoint is kept)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dynarank", description="LoRA with per-head ranks learned while training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library messages")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a model and write a run directory")
    _train_options(train)
    ev = sub.add_parser("eval", help="evaluate a run directory on a data file (JSON on stdout)")
    ev.add_argument("run_dir", help="run directory written by `dynarank train`, or a PEFT adapter directory")
    ev.add_argument("--model", help="base model of a bare adapter directory (default: the one it records)")
    ev.add_argument("--data", required=True, help="CSV or JSON Lines evaluation file")
    ev.add_argument("--text-column", help="text column (default: guessed)")
    ev.add_argument("--label-column", help="label column (default: guessed)")
    ev.add_argument("--prompt-column", help="causal-lm: prompt column (default: guessed)")
    ev.add_argument("--response-column", help="causal-lm: response column (default: guessed)")
    ev.add_argument(
        "--labels",
        help="label names of a classification adapter not written by dynarank, comma-separated, in the order of "
        "the classifier's outputs (a run directory records its own)",
    )
    ev.add_argument(
        "--max-length", type=POSITIVE_INT, help="tokens per example after truncation (default: the run's, else 64)"
    )
    ex = sub.add_parser("export", help="write a plain PEFT LoRA adapter (or a merged model) from a run")
    ex.add_argument("run_dir", help="run directory written by `dynarank train`")
    ex.add_argument("--out", required=True, help="output directory to create (an existing one is never replaced)")
    form = ex.add_mutually_exclusive_group()
    form.add_argument("--server-safe", action="store_true", help="scales baked into B, alpha = r (vLLM-style servers)")
    form.add_argument("--merged", action="store_true", help="write the full model with the adapter merged in")
    rep = sub.add_parser("report", help="(re)draw the pictures of a run directory")
    rep.add_argument("run_dir", help="run directory written by `dynarank train`")
    ins = sub.add_parser("inspect", help="attach adapters to a model and print its modules, groups and ranks")
    ins.add_argument("--model", help="local model directory (default: the packaged all-MiniLM-L6-v2)")
    ins.add_argument("--r", type=POSITIVE_INT, default=8, help="rank per group")
    ins.add_argument("--target-modules", help="as for train")
    ins.add_argument("--granularity", choices=["head", "matrix"], default="head", help="groups per head or matrix")
    ins.add_argument("--head-layout", choices=["own", "shared"], default="own", help="per-head or shared A")
    bench = sub.add_parser("bench", help="run the benchmark suites of a source checkout (benchmarks/run.py)")
    bench.add_argument(
        "--suite",
        nargs="+",
        help="planted, methods-planted, ablations, quality, quality-smollm2, overhead, method-overhead, buckets "
        "(default: all)",
    )
    bench.add_argument(
        "--quick", action="store_true", help="fewer steps and one seed, into benchmarks/results/quick/ (~8 minutes)"
    )
    demo = sub.add_parser("demo", help="ARD-LoRA on the packaged MiniLM + tweets, then plain LoRA at equal parameters")
    demo.add_argument("--max-steps", type=POSITIVE_INT, help="optimizer steps per run (default: 2 epochs of --n-train)")
    demo.add_argument(
        "--n-train", type=POSITIVE_INT, default=2000, help="training tweets (2,000: the quality study's training set)"
    )
    demo.add_argument("--out", help="folder for the two run directories (default: runs/demo-<time>)")
    return parser


# Library field names in validation messages, as the `train` flags that set them.
FLAG_OF_FIELD = {
    **{name: "--" + name.replace("_", "-") for name in train_options.DYNARANK_KNOBS},
    **{name: "--" + name.replace("_", "-") for name in ("batch_size", "max_steps", "eval_every", "save_every")},
    "total_steps": "--max-steps",
    "r": "--r0",
}
# Whole phrases first: the library's 'adalora' / 'lora' are the CLI's adalora-physical / dynarank-lora.
PHRASES = {
    "method='elalora' or 'adalora'": "--method elalora or adalora-physical",
    "method='adalora'": "--method adalora-physical",
    "not 'lora'.": "not dynarank-lora.",
    "not 'adalora'.": "not adalora-physical.",
}
_ANY_FIELD = "|".join(sorted(FLAG_OF_FIELD, key=len, reverse=True))
# A field written with its value: rank_floor=2, lambda_mode='relative', r=8.
_FIELD_VALUE = re.compile(rf"(?<![\w.'\"/\\-])({_ANY_FIELD})=(['\"]?)([\w.+-]+)\2")
# A field named alone: only names with an underscore, which no prose word has (warmup_frac, total_steps).
_NAMED_FIELD = re.compile(rf"(?<![\w.'\"/\\-])({'|'.join(f for f in FLAG_OF_FIELD if '_' in f)})(?![\w'\"/\\-])")
# The initial rank named alone, in the library's phrases only ('set its size with r (', 'raise r', 'Lower r',
# '... or r.'): the word r anywhere else (a label, a column, prose) is left alone.
_RANK_FIELD = re.compile(r"(?<=\bwith )r(?= \()|(?<=\braise )r\b|(?<=\b[Ll]ower )r\b|(?<=\bor )r(?=\.(?:\s|$))")


def as_flags(message: str) -> str:
    """``lambda_mode='relative' ... raise warmup_frac`` -> ``--lambda-mode relative ... raise --warmup-frac``:
    the library's field names, where its messages name a field, become the `train` flags."""
    for phrase, flags in PHRASES.items():
        message = message.replace(phrase, flags)
    message = _FIELD_VALUE.sub(lambda m: f"{FLAG_OF_FIELD[m.group(1)]} {m.group(3)}", message)
    message = _NAMED_FIELD.sub(lambda m: FLAG_OF_FIELD[m.group(1)], message)
    return _RANK_FIELD.sub("--r0", message)


def error_line(exc: BaseException, command: str) -> str:
    """The one line that tells the user what went wrong."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        text = f"{where}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    if command in ("train", "demo") and type(exc) is ValueError:
        text = as_flags(text)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        # bitsandbytes (imported by PEFT when installed) warns at import time that it cannot download an optional
        # CPU kernel from the hub, and the kernels package it asks that it skips a trust check offline; nothing the
        # user can act on, and it would break the one-line error contract.
        for noisy in ("bitsandbytes", "kernels"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # transformers 5 warns from inside PEFT's model wrapper on every run; nothing the user can change.
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            return _run(args, parser, argv)
    except (UsageError, *USER_ERRORS) as exc:
        print(f"dynarank {args.command}: error: {error_line(exc, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynarank {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    if args.command == "train":
        train.train_command(train_options.resolve_train_options(args, parser, argv))
    elif args.command == "eval":
        print(json.dumps(commands.eval_command(args), indent=1))
    elif args.command == "export":
        print(commands.export_command(args))
    elif args.command == "report":
        for path in commands.report_command(Path(args.run_dir)):
            print(path)
    elif args.command == "inspect":
        commands.inspect_command(args)
    elif args.command == "bench":
        return commands.bench_command(args)
    elif args.command == "demo":
        commands.demo_command(args, vars(parser.parse_args(["train"])))
    return 0


def _leave_process_group() -> None:
    """Destroy a torchrun / accelerate process group this command joined (an undestroyed gloo group can
    abort the process at exit)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
