"""The ``labkit`` subcommands: every feature adds its own the same way, as a :class:`Command` in a
module of this package (registered in :data:`COMMANDS`; :mod:`labkit.cli` builds the parser from it).

A module here imports only what building its arguments needs; its handlers import the library when
they run (pandas and plotly are slow to import, and ``labkit ls`` should not pay for them). A
handler takes the parsed arguments and returns the exit status.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from ..registry import Registry


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]  # adds the command's arguments
    run: Callable[[argparse.Namespace], int]
    order: int = 50  # place in `labkit --help`


COMMANDS: Registry[Command] = Registry("command", __name__)


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None,
            order: int = 50):
    """Register the decorated handler as subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS.register(Command(name, help, arguments, run, order))
        return run

    return register


def csv_ints(text: str) -> list[int]:
    """``1,1000,5000`` (underscores allowed) as a list of integers; an argparse type."""
    try:
        return [int(x.replace("_", "")) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,1000,5000; got {text!r}") from None


def csv_words(text: str) -> list[str]:
    """``a,b,c`` as a list of words; an argparse type."""
    return [x for x in text.split(",") if x]


__all__ = ["Command", "COMMANDS", "command", "csv_ints", "csv_words"]
