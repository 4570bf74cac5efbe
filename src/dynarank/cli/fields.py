"""Command-line options generated from dataclass fields: a flag's name, help, type and choices come from the field's
name, ``metadata["help"]`` and type annotation, so that help never drifts from the code.

    field name        flag  --name-with-dashes
    int / float       a number, checked (``metadata["low"]`` / ``["inclusive"]`` / ``["high"]``, exclusive, bound it)
    Literal[...]      its values as the choices
    bool              --name / --no-name
    list[str]         a comma list (a list in YAML)
    X | None          as X; None is the default

An :class:`Option` converts command-line text and YAML values alike (:meth:`Option.coerce`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol


class UsageError(Exception):
    """A command line argparse refused; its text is the one line to print."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors raised as one line instead of printed after the whole usage block."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message}")


class Number:
    """An option type for command-line text and YAML values alike: refuses booleans, non-finite values,
    non-integral numbers where an integer is due, and values below the bound."""

    def __init__(self, kind: type, low: float | None = None, inclusive: bool = True, high: float | None = None) -> None:
        self.kind, self.low, self.inclusive, self.high = kind, low, inclusive, high
        noun = "integer" if kind is int else "number"
        if low is None:
            self.description = f"an {noun}" if kind is int else f"a {noun}"
        elif low == 0 and not inclusive:
            self.description = f"a positive {noun}"
        else:
            self.description = f"{'an' if kind is int else 'a'} {noun} {'>=' if inclusive else '>'} {low:g}"
        if high is not None:  # an exclusive upper bound
            self.description += f" and below {high:g}" if isinstance(high, float) else f" and below {high}"
        self.__name__ = self.description  # argparse names the type in its messages

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
        too_high = self.high is not None and number >= self.high
        if not math.isfinite(number) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"{value!r} is not {self.description}")
        return number


class NumberOrWord:
    """A :class:`Number`, or one of ``words`` (matched without case): ``--lr 3e-3`` or ``--lr auto``."""

    def __init__(self, number: Number, *words: str) -> None:
        self.number, self.words = number, words
        self.description = f"{number.description} or {' or '.join(repr(w) for w in words)}"
        self.__name__ = self.description

    def __call__(self, value):
        if isinstance(value, str) and value.strip().lower() in self.words:
            return value.strip().lower()
        try:
            return self.number(value)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {self.description}") from None


def comma_list(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing; give a comma-separated list")
    return names


class AddsArguments(Protocol):
    """A parser or an argument group."""

    def add_argument(self, *flags: str, **kwargs: Any) -> Any: ...


def _kind(value) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "text"}.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Option:
    """One command-line option (and the YAML keys that set it), made from a dataclass field."""

    dest: str
    flags: tuple[str, ...]
    help: str
    convert: Callable[[Any], Any] | None = None  # None: text
    choices: tuple[str, ...] | None = None
    boolean: bool = False
    listed: bool = False  # a list in YAML; on the command line a comma list (or, with text too, kept as typed)
    accepts_none: bool = True  # YAML null allowed (the field's default is None)
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return self.flags[0]

    def names(self) -> set[str]:
        """The keys a YAML file may use for this option: the field's name and every flag, with '-' or '_'."""
        bare = {self.dest, *(flag.lstrip("-") for flag in self.flags)}
        return {spelling for name in bare for spelling in (name.replace("_", "-"), name.replace("-", "_"))}

    def add_to(self, parser: AddsArguments, help: str | None = None) -> None:
        kwargs: dict[str, Any] = {"dest": self.dest, "help": (help or self.help).replace("%", "%%")}
        if self.boolean:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=self.convert, choices=self.choices, metavar=self.metavar)
        parser.add_argument(*self.flags, **kwargs)

    def coerce(self, value):
        """A YAML value checked and converted as the command line's text would be (ValueError says why not)."""
        if value is None:
            if not self.accepts_none:
                raise ValueError("has no value; give one or drop the key")
            return None
        if self.listed and isinstance(value, list):
            if not value or not all(isinstance(v, str) and v for v in value):
                raise ValueError("must be a list of names")
            return value
        if isinstance(value, (dict, list)):
            raise ValueError(f"takes a single value, got a {type(value).__name__}")
        if self.boolean:
            if not isinstance(value, bool):
                raise ValueError(f"takes true or false, got {_kind(value)} ({value!r})")
            return value
        if self.convert is None and not isinstance(value, str):
            raise ValueError(f"expected text, got {_kind(value)} ({value!r}); quote it in the YAML file")
        if isinstance(value, bool):  # YAML reads yes / no / on / off / true / false as booleans
            raise ValueError(f"got a boolean ({value!r}); it takes {getattr(self.convert, 'description', 'a value')}")
        if self.convert is not None:
            try:
                value = self.convert(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise ValueError(str(exc)) from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, self.choices))}")
        return value


def _variants(hint) -> tuple[list, bool]:
    """The types of an annotation without None, and whether None is allowed."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return [a for a in args if a is not type(None)], type(None) in args
    return [hint], False


def default_of(f: dataclasses.Field) -> Any:
    """A field's default value (MISSING when it has none)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def option_of(f: dataclasses.Field, hint, flags: tuple[str, ...] = (), help: str | None = None) -> Option:
    """The option of dataclass field ``f`` (type annotation ``hint``): its flags are ``--name-with-dashes`` and
    ``flags``; its help is ``help``, by default ``metadata["help"]`` and the default value."""
    meta = f.metadata
    kinds, optional = _variants(hint)
    listed = any(typing.get_origin(k) is list for k in kinds)
    scalar = [k for k in kinds if typing.get_origin(k) is not list]
    option: dict[str, Any] = {"listed": listed, "metavar": meta.get("metavar")}
    if listed and not scalar:
        option["convert"] = comma_list
    elif len(scalar) == 1 and typing.get_origin(scalar[0]) is Literal:
        option["choices"] = typing.get_args(scalar[0])
    elif scalar == [bool]:
        option["boolean"] = True
    elif scalar in ([int], [float]):
        option["convert"] = Number(scalar[0], meta.get("low"), meta.get("inclusive", True), meta.get("high"))
    if "convert" in meta:  # a field's own conversion (e.g. a number or a word)
        option["convert"] = meta["convert"]
    option["choices"] = tuple(meta["choices"]) if "choices" in meta else option.get("choices")
    default = default_of(f)
    option["accepts_none"] = default is dataclasses.MISSING or default is None or optional
    if help is None:
        help = meta.get("help", "") + ("" if option["accepts_none"] else f" (default: {default})")
    return Option(f.name, ("--" + f.name.replace("_", "-"), *flags), help, **option)


def options_of(cls: type) -> dict[str, Option]:
    """The options of every field of dataclass ``cls`` that has help text, by field name."""
    hints = typing.get_type_hints(cls)
    return {f.name: option_of(f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata}
