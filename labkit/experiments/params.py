"""Experiment parameters declared once: each field says its help, its choices and its bounds, and the
CLI flags (with their defaults in ``--help``), the validation and the errors are made from that.

An experiment's parameter class is a dataclass of :func:`param` fields deriving from :class:`Params`;
``labkit run EXPERIMENT --<field-name>`` sets a field (dashes for underscores), and
:meth:`Params.validate` reports every problem at once, each naming the field and the fix. Cross-field
rules go in the class's :meth:`Params.checks`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import UsageError

Choices = Sequence[str] | Callable[[], Sequence[str]] | None


def param(default: Any = dataclasses.MISSING, *, help: str, choices: Choices = None, min: float | None = None,
          max: float | None = None, default_factory: Callable[[], Any] | None = None) -> Any:
    """A parameter field: ``help`` (one line), ``choices`` (a list, or a function giving the names a
    registry holds), ``min``/``max`` bounds (for numbers, and for each number of a list)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _choices(meta: dict) -> list[str] | None:
    c = meta.get("choices")
    return list(c()) if callable(c) else (list(c) if c is not None else None)


def _kind(annotation: Any) -> tuple[type, bool, bool]:
    """(element type, is a list, may be None) of a field's annotation."""
    hint = annotation
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _is(value: Any, elem: type) -> bool:
    if elem is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if elem is float:
        return isinstance(value, (int, float))
    return isinstance(value, elem)


class Params:
    """Base of experiment parameter dataclasses (see the module docstring)."""

    experiment: str = ""  # the name in messages ("service-scale")

    @classmethod
    def fields(cls) -> list[tuple[dataclasses.Field, type, bool, bool]]:
        hints = typing.get_type_hints(cls)
        return [(f, *_kind(hints[f.name])) for f in dataclasses.fields(cls) if f.metadata.get("help")]

    def checks(self) -> list[str]:
        """Rules between fields (the class's own); each problem as ``"field: what and the fix"``."""
        return []

    def problems(self) -> list[str]:
        out = []
        for f, elem, is_list, optional in self.fields():
            value = getattr(self, f.name)
            if value is None and optional:
                continue
            values = value if is_list else [value]
            if is_list and not isinstance(value, list):
                out.append(f"{f.name}: expected a list, got {value!r}")
                continue
            if is_list and not value:
                out.append(f"{f.name}: name at least one")
                continue
            if not all(_is(v, elem) for v in values):
                out.append(f"{f.name}: expected {'a list of ' if is_list else ''}{elem.__name__}, got {value!r}")
                continue
            choices = _choices(f.metadata)
            if choices is not None:
                bad = [v for v in values if v not in choices]
                for v in bad:
                    near = difflib.get_close_matches(str(v), choices, n=1)
                    hint = f" (did you mean '{near[0]}'?)" if near else ""
                    out.append(f"{f.name}: unknown {v!r}{hint}; expected {'some' if is_list else 'one'} of "
                               f"{', '.join(choices)}")
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            for v in values if elem in (int, float) else ():
                if (lo is not None and v < lo) or (hi is not None and v > hi):
                    rng = f"{lo}..{hi}" if lo is not None and hi is not None else (f"≥ {lo}" if lo is not None
                                                                                      else f"≤ {hi}")
                    out.append(f"{f.name}: {v} is outside {rng}")
                    break
        return out + (self.checks() if not out else [])

    def validate(self) -> None:
        """Raise :class:`UsageError` listing every problem, or do nothing."""
        found = self.problems()
        if found:
            raise UsageError(f"invalid {self.experiment} parameters:\n  " + "\n  ".join(found))


# ---------------------------------------------------------------- CLI

def _csv(elem: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",") if x.strip()]
        if elem is str:
            return items
        try:
            return [elem(x.replace("_", "")) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {elem.__name__}s, e.g. 1,1000,5000; "
                                             f"got {text!r}") from None

    parse.__name__ = f"list of {elem.__name__}"
    return parse


def add_arguments(parser: argparse.ArgumentParser, cls: type[Params]) -> None:
    """One flag per parameter of ``cls``, its help ending with the default (from the class)."""
    defaults = cls()
    group = parser.add_argument_group(f"{cls.experiment} parameters")
    for f, elem, is_list, _ in cls.fields():
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if is_list else default
        help_ = f"{f.metadata['help']} (default: {shown})"
        choices = _choices(f.metadata)
        if choices and len(choices) <= 12:
            help_ += f"; one {'or more ' if is_list else ''}of {', '.join(choices)}"
        if elem is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            group.add_argument(flag, dest=f.name, type=_csv(elem) if is_list else elem, default=None, help=help_,
                               metavar=f.name.upper())


def given(args: argparse.Namespace, cls: type[Params]) -> dict[str, Any]:
    """The parameters set on the command line."""
    return {f.name: getattr(args, f.name) for f, *_ in cls.fields() if getattr(args, f.name, None) is not None}


__all__ = ["Params", "param", "add_arguments", "given"]
