"""``dynarank train`` options: the --config file merged under the command line, typed and checked like it,
and the options each method may take."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..files import RunFileError, read_yaml
from ..training.loop import DYNARANK_METHODS
from ..training.models import model_record

DYNARANK_KNOBS = (
    "granularity",
    "head_layout",
    "ard_lambda",
    "rank_floor",
    "preset",
    "target_params",
    "target_rank",
    "lambda_mode",
    "ard_beta",
    "lr_alpha",
    "warmup_frac",
    "final_frac",
    "resize_every",
)


# ---------------------------------------------------------------------------- options
class OptionError(ValueError):
    """An option value, a --config key, or an option the chosen method does not use."""


def _train_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The ``train`` subcommand's options, by destination."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["train"]._actions if a.dest != "help"}


def _given_on_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Destinations the user typed (a value equal to the default counts as typed)."""
    import sys

    actions = _train_actions(parser)
    saved = {dest: action.default for dest, action in actions.items()}
    try:
        for action in actions.values():
            action.default = argparse.SUPPRESS
        given = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    finally:
        for dest, action in actions.items():
            action.default = saved[dest]
    return set(given) & set(actions)


def _kind(value) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "text"}.get(type(value), type(value).__name__)


def _coerce(path: Path, key: str, value, action: argparse.Action):
    """A YAML value checked and converted as the command-line option would be."""
    if value is None:
        if action.default is not None:
            raise OptionError(f"{path}: {key} has no value; give one or drop the key.")
        return None
    if action.dest == "target_modules" and isinstance(value, list):
        if not all(isinstance(v, str) and v for v in value):
            raise OptionError(f"{path}: {key} must be a list of module names.")
        return value
    if isinstance(value, (dict, list)):
        raise OptionError(f"{path}: {key}: takes a single value, got a {type(value).__name__}.")
    if action.type is None and not isinstance(value, str):
        raise OptionError(f"{path}: {key}: expected text, got {_kind(value)} ({value!r}); quote it in the YAML file.")
    if isinstance(value, bool):  # YAML reads yes / no / on / off / true / false as booleans
        wanted = getattr(action.type, "description", "a value")
        raise OptionError(f"{path}: {key}: got a boolean ({value!r}); it takes {wanted}.")
    if action.type is not None:
        try:
            value = action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise OptionError(f"{path}: {key}: {exc}.") from None
    if action.choices is not None and value not in action.choices:
        raise OptionError(f"{path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}.")
    return value


def _config_keys(actions: dict[str, argparse.Action]) -> dict[str, str]:
    """Config key -> option destination: the destination and every flag, each with '-' or '_'."""
    keys = {}
    for dest, action in actions.items():
        if dest == "config":
            continue
        for name in {dest, *(flag.lstrip("-") for flag in action.option_strings)}:
            keys[name.replace("_", "-")] = keys[name.replace("-", "_")] = dest
    return keys


def resolve_train_options(
    args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str] | None = None
) -> argparse.Namespace:
    """Merge ``--config FILE.yaml`` under the command line: options typed on the command line win, the
    file's values are checked and converted like command-line values. A key is an option's flag (``r0``,
    ``max-steps``) or destination (``max_steps``), with '-' or '_'. With ``--resume``, every option given (typed or
    from the file) must equal the run's own (:func:`check_resumed_options`)."""
    typed = _given_on_command_line(parser, argv)
    given = typed | (_merge_config(args, parser, typed) if args.config else set())
    parse_target_modules(args.target_modules)
    if args.resume:
        check_resumed_options(args, _train_actions(parser), given - {"resume"})
    return args


def _merge_config(args: argparse.Namespace, parser: argparse.ArgumentParser, typed: set[str]) -> set[str]:
    """Set the options of the --config file that were not typed; returns the destinations the file gives."""
    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = read_yaml(path)
    except RunFileError as exc:
        raise OptionError(str(exc)) from None
    actions = _train_actions(parser)
    keys = _config_keys(actions)
    seen: dict[str, str] = {}
    for key, value in values.items():
        dest = keys.get(str(key).lstrip("-"))
        if dest is None:
            flags = sorted({f.lstrip("-") for d, a in actions.items() if d != "config" for f in a.option_strings})
            raise OptionError(f"{path}: unknown option {key!r}; known: {', '.join(flags)}.")
        if dest in seen:
            raise OptionError(
                f"{path}: {seen[dest]!r} and {key!r} both set {actions[dest].option_strings[0]}; keep one."
            )
        seen[dest] = str(key)
        if dest not in typed:
            setattr(args, dest, _coerce(path, str(key), value, actions[dest]))
    return set(seen)


# ---------------------------------------------------------------------------- --target-modules
_REGEX = re.compile(r"[\\.*()\[\]|^$+?]")  # a character only a regular expression has


def parse_target_modules(spec: str | list[str] | None) -> str | list[str] | None:
    """--target-modules as the loop takes it: 'all-linear', a regular expression (which must compile), or a comma
    list of module-name suffixes; a list (YAML, or a run's record) is kept; None or '' is the default."""
    if isinstance(spec, (list, tuple)):
        return list(spec)
    if not spec:
        return None
    if spec == "all-linear" or not _REGEX.search(spec):
        return spec if spec == "all-linear" else [s.strip() for s in spec.split(",") if s.strip()]
    try:
        re.compile(spec)
    except re.error as exc:
        raise OptionError(f"--target-modules {spec!r} is not a valid regular expression ({exc}).") from None
    return spec


# ---------------------------------------------------------------------------- --resume
RUN_CONFIG = "config.yaml"


def read_run_config(run: str | Path) -> dict:
    """The options a run was started with (its config.yaml); errors name the file."""
    config = Path(run) / RUN_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"{run} is not a dynarank run directory (no {RUN_CONFIG}); nothing to resume.")
    return read_yaml(config)


def _comparable(dest: str, value, run: Path):
    """An option's value as a run records it (absolute paths, the parsed module list)."""
    if value is None:
        return None
    if dest == "model":
        return model_record(value)
    if dest in ("data", "eval_data", "config"):
        return str(Path(value).resolve())
    if dest == "target_modules":
        return parse_target_modules(value)
    if dest == "out":
        return str(run.resolve()) if Path(value).resolve() == run.resolve() else str(Path(value).resolve())
    return value


def check_resumed_options(args: argparse.Namespace, actions: dict[str, argparse.Action], given: set[str]) -> None:
    """A resumed run continues with the options it was started with: an option given with --resume that differs
    from the run's config.yaml is refused, naming each (a run changed half-way would be neither run; options equal
    to the run's are accepted)."""
    run = Path(args.resume)
    saved = read_run_config(run)
    for key, value in saved.items():  # a damaged record is refused like a bad --config file, naming the key
        if key in actions and key not in ("resume", "target_modules", "out"):
            _coerce(run / RUN_CONFIG, key, value, actions[key])
    saved["out"] = str(run.resolve())  # the run continues in its own directory
    differ = []
    for dest in sorted(given):
        mine, theirs = _comparable(dest, getattr(args, dest), run), saved.get(dest)
        if mine != theirs:
            shown = ",".join(theirs) if isinstance(theirs, list) else theirs
            differ.append(f"{actions[dest].option_strings[0]} {getattr(args, dest)} (the run's: {shown})")
    if differ:
        raise OptionError(
            f"--resume continues {run} with the options it was started with, and {'; '.join(differ)} "
            f"{'differs' if len(differ) == 1 else 'differ'}: drop {'it' if len(differ) == 1 else 'them'}, or "
            "start a new run with another --out."
        )


def check_method_options(opts: argparse.Namespace) -> None:
    """Refuse rank-method options given to a method that would ignore them (the baselines)."""
    if opts.method in DYNARANK_METHODS:
        return
    given = ["--" + k.replace("_", "-") for k in DYNARANK_KNOBS if getattr(opts, k, None) is not None]
    if given:
        raise OptionError(
            f"--method {opts.method} does not use {', '.join(given)} (options of {', '.join(DYNARANK_METHODS)}): "
            "drop them, or choose one of those methods."
        )
