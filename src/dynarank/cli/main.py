"""The ``dynarank`` command: dispatch to the subcommands, one-line errors, exit codes.

Every user error (bad option, bad file, bad value) becomes one line on stderr and exit code 2; an interrupt 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from ..config import ConfigError
from ..storage import AdapterFormatError
from ..training.data import DataError
from ..training.models import ModelError
from ..training.tasks import NonFiniteError
from . import commands, demo, train
from .fields import UsageError
from .options import DEMO_FIELDS, INSPECT_FIELDS, build_parser, typed
from .run_dir import RunDir
from .train_options import TRAIN_OPTIONS, flag_of, resolve_train_options


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
# Commands whose options are config fields: a ConfigError names the flags that set its fields.
FIELD_COMMANDS = ("train", "inspect", "demo")


def error_line(exc: BaseException, command: str) -> str:
    """The one line that tells the user what went wrong; a ConfigError names the fields by their flags."""
    if isinstance(exc, ConfigError) and command in FIELD_COMMANDS:
        text = exc.named(flag_of)
    elif isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        text = f"{where}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
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
            return _run(args)
    except (UsageError, *USER_ERRORS) as exc:
        print(f"dynarank {args.command}: error: {error_line(exc, args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynarank {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        train.train_command(resolve_train_options(typed(args, TRAIN_OPTIONS)))
    elif args.command == "eval":
        print(json.dumps(commands.eval_command(args), indent=1))
    elif args.command == "export":
        print(commands.export_command(args))
    elif args.command == "report":
        for path in commands.report_command(RunDir(args.run_dir)):
            print(path)
    elif args.command == "inspect":
        commands.inspect_command(getattr(args, "model", None), typed(args, INSPECT_FIELDS))
    elif args.command == "bench":
        return commands.bench_command(args)
    elif args.command == "demo":
        demo.demo_command(**typed(args, DEMO_FIELDS))
    return 0


def _leave_process_group() -> None:
    """Destroy a torchrun / accelerate process group this command joined (an undestroyed gloo group can
    abort the process at exit)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
