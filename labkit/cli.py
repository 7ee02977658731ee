"""The ``labkit`` command line: the subcommands every feature registers (:mod:`labkit.commands`),
each a thin call into the library.

Errors labkit raises on purpose (bad spec, missing kernel feature, unknown lab) are printed as one
clear message and exit with status 2; a failed ``check`` exits 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .errors import LabkitError


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import COMMANDS

    p = argparse.ArgumentParser(prog="labkit", description="Pod-network and Service-datapath labs on a real kernel.")
    p.add_argument("--version", action="version", version=f"labkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        parser = sub.add_parser(cmd.name, help=cmd.help)
        cmd.arguments(parser)
        parser.set_defaults(fn=cmd.run)
    return p


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `labkit … | head` ends quietly
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except LabkitError as exc:
        print(f"labkit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labkit: interrupted", file=sys.stderr)
        return 130
    except PermissionError as exc:
        if os.geteuid() != 0:
            print(f"labkit: {exc}; labkit needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
