"""``labkit doctor``: what this machine can run, and how to fix what it cannot (:mod:`labkit.doctor`)."""

from __future__ import annotations

from . import command


def _args(p) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


@command("doctor", "what this machine can run, and how to fix what it cannot", _args, order=0)
def doctor(args) -> int:
    from .. import doctor as doc

    return doc.cli(args)
