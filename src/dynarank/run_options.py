"""``dynarank train`` options: the --config file merged under the command line, typed and checked like it,
and the options each method may take."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .loop import DYNARANK_METHODS

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
    ``max-steps``) or destination (``max_steps``), with '-' or '_'."""
    if not args.config:
        return args
    path = Path(args.config)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8-sig")) or {}
    except yaml.YAMLError as exc:
        raise OptionError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise OptionError(f"{path} is not UTF-8 text.") from None
    if not isinstance(values, dict):
        raise OptionError(f"{path} must hold a mapping of option: value.")
    actions = _train_actions(parser)
    keys = _config_keys(actions)
    typed = _given_on_command_line(parser, argv)
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
    return args


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
