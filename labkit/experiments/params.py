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
    # a field's flag where the field's name would mislead (policy-scale's "datapaths" are engines)
    flags: typing.ClassVar[dict[str, str]] = {}
    # old flag spellings kept one release: old name -> field (a warning says the new one)
    aliases: typing.ClassVar[dict[str, str]] = {}

    @classmethod
    def flag(cls, field: str) -> str:
        return cls.flags.get(field, field).replace("_", "-")

    @classmethod
    def from_mapping(cls, data: dict, where: str = "parameters") -> dict[str, Any]:
        """Field values from a mapping whose keys are field names, flag names or old spellings (a
        ``--params`` file); an unknown key is a :class:`UsageError` naming it and the known ones."""
        names = {f.name: f.name for f, *_ in cls.fields()}
        names |= {cls.flag(n): n for n in list(names)} | {k.replace("_", "-"): k for k in list(names)}
        names |= {old: new for old, new in cls.aliases.items()}
        out = {}
        for key, value in data.items():
            field = names.get(str(key)) or names.get(str(key).replace("_", "-"))
            if field is None:
                known = sorted({cls.flag(n) for n in names.values()})
                near = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise UsageError(f"{where}: unknown parameter {key!r}{hint}; {cls.experiment} takes {', '.join(known)}")
            out[field] = value
        return out

    def estimate(self) -> dict[str, Any]:
        """What a run of these parameters does, for ``--dry-run``: labs, points by metric, seconds."""
        return {}

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
            value, name = getattr(self, f.name), self.flag(f.name)
            if value is None and optional:
                continue
            values = value if is_list else [value]
            if is_list and not isinstance(value, list):
                out.append(f"{name}: expected a list, got {value!r}")
                continue
            if is_list and not value:
                out.append(f"{name}: name at least one")
                continue
            if not all(_is(v, elem) for v in values):
                out.append(f"{name}: expected {'a list of ' if is_list else ''}{elem.__name__}, got {value!r}")
                continue
            choices = _choices(f.metadata)
            if choices is not None:
                bad = [v for v in values if v not in choices]
                for v in bad:
                    near = difflib.get_close_matches(str(v), choices, n=1)
                    hint = f" (did you mean '{near[0]}'?)" if near else ""
                    out.append(f"{name}: unknown {v!r}{hint}; expected {'some' if is_list else 'one'} of "
                               f"{', '.join(choices)}")
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            for v in values if elem in (int, float) else ():
                if (lo is not None and v < lo) or (hi is not None and v > hi):
                    rng = f"{lo}..{hi}" if lo is not None and hi is not None else (f"≥ {lo}" if lo is not None
                                                                                      else f"≤ {hi}")
                    out.append(f"{name}: {v} is outside {rng}")
                    break
        return out + (self.checks() if not out else [])

    def validate(self) -> None:
        """Raise :class:`UsageError` listing every problem, or do nothing."""
        found = self.problems()
        if len(found) == 1:
            raise UsageError(f"invalid {self.experiment} parameter {found[0]}")
        if found:
            raise UsageError(f"invalid {self.experiment} parameters:\n  " + "\n  ".join(found))


# what a sample, a second of rate and a rule cost here, for --dry-run's estimate (netns, this machine)
SECONDS_PER_SAMPLE = 0.25e-3
RATE_OVERHEAD = 1.4  # a rate point's windows take this many times their measured length
SECONDS_PER_RULE = 0.2e-3  # a table entry loaded (the slowest datapaths)
SECONDS_PER_LAB = 2.0
VM_FACTOR, VM_UP = 10.0, 120.0  # QEMU TCG: samples cost ~10x, and the VMs take ~2 min to come up
HOSTS_UP = 30.0  # backend hosts: ssh, the agent's payload and each host's build (machines of their own: no factor)


def estimate(points: dict[str, int], samples: int, rate_seconds: float, backend: str, labs: list[dict],
             table_loads: int = 0, extra_seconds: float = 0) -> dict[str, Any]:
    """The plan ``--dry-run`` prints: labs, points per metric and a rough time (this machine's costs;
    say "about")."""
    latency = sum(n for m, n in points.items() if not m.endswith("-rate") and m != "bandwidth") * samples
    rates = sum(n for m, n in points.items() if m.endswith("-rate")) * rate_seconds * RATE_OVERHEAD
    seconds = latency * SECONDS_PER_SAMPLE + rates + table_loads * SECONDS_PER_RULE + extra_seconds
    seconds += len(labs) * SECONDS_PER_LAB
    if backend == "vagrant":
        seconds = seconds * VM_FACTOR + VM_UP
    elif backend == "hosts":
        seconds += HOSTS_UP
    return {"labs": labs, "points": points, "points_total": sum(points.values()),
            "estimated_seconds": round(seconds)}


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
    for old, field in cls.aliases.items():
        group.add_argument(f"--{old}", dest=field, action=_Deprecated, new=cls.flag(field), help=argparse.SUPPRESS)
    for f, elem, is_list, _ in cls.fields():
        flag = "--" + cls.flag(f.name)
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
                               metavar=cls.flag(f.name).replace("-", "_").upper())
    for old, field in cls.aliases.items():  # an old spelling parses as the new flag's type
        action = next(a for a in group._group_actions if a.dest == field and a.option_strings[0] != f"--{old}")
        alias = next(a for a in group._group_actions if a.option_strings == [f"--{old}"])
        alias.type = action.type


class _Deprecated(argparse.Action):
    """An old spelling of a flag: it still works, and says the new one on stderr."""

    def __init__(self, *args, new: str = "", **kw):
        self.new = new
        super().__init__(*args, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        import sys

        print(f"labkit: {option_string} is deprecated and goes in the next release; use --{self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def given(args: argparse.Namespace, cls: type[Params]) -> dict[str, Any]:
    """The parameters set on the command line."""
    return {f.name: getattr(args, f.name) for f, *_ in cls.fields() if getattr(args, f.name, None) is not None}


__all__ = ["Params", "param", "add_arguments", "given", "estimate"]
