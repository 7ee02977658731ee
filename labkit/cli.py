"""The ``labkit`` command line: the subcommands every feature registers (:mod:`labkit.commands`),
each a thin call into the library.

Errors labkit raises on purpose are printed as one clear message; the exit status says what kind
(:data:`labkit.errors.EXIT_CODES`, listed by ``labkit --help``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .errors import LabkitError


class Parser(argparse.ArgumentParser):
    """argparse with labkit's usage errors: one line naming the flag and what is wrong, the command's
    help named for the fix, exit status 2 (no usage dump to read through)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import COMMANDS

    p = Parser(prog="labkit", description="Pod-network and Service-datapath labs on a real kernel.",
               epilog=epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"labkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS:
        parser = sub.add_parser(cmd.name, help=cmd.help)
        cmd.arguments(parser)
        parser.set_defaults(fn=cmd.run)
    return p


def epilog() -> str:
    """Exit statuses and environment variables, under ``labkit --help``."""
    from .errors import EXIT_CODES

    lines = ["exit status:"] + [f"  {code:<4} {what}" for code, what in EXIT_CODES.items()]
    lines += ["", "environment:"] + [f"  {name:<20} {what}" for name, what in ENVIRONMENT.items()]
    return "\n".join(lines)


ENVIRONMENT = {
    "LABKIT_STATE_DIR": "where labs keep their state and journal (default /run/labkit)",
    "LABKIT_RESULTS": "the results store (default ./results)",
    "LABKIT_LOAD_CPUS": "CPUs for load clients and in-pod servers, e.g. 1 (default: the first CPU; labkit itself "
                        "runs on the others)",
    "LABKIT_CACHE": "compiled helpers and VM boxes (default ~/.cache/labkit)",
    "LABKIT_VM_DRIVER": "kvm or qemu: force the VM backend's driver (default: probed)",
    "LABKIT_KEEP_FAILED": "keep a VM lab whose up failed, for inspection",
    "LABKIT_SOCKET": "the labkit daemon's socket, used when not root (default /run/labkit/labkit.sock)",
}


def _terminated(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, systemd, the daemon ending a run) unwinds like Ctrl-C: labs torn down


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `labkit … | head` ends quietly
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
    args = build_parser().parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)  # what a daemon's run is given again
    try:
        return args.fn(args) or 0
    except LabkitError as exc:
        print(f"labkit: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("labkit: interrupted", file=sys.stderr)
        return 130
    except PermissionError as exc:
        if os.geteuid() != 0:
            print(f"labkit: {exc}; labs need root (CAP_NET_ADMIN, CAP_SYS_ADMIN), or a labkit daemon that root "
                  f"started (`sudo labkit serve`), which the CLI then uses", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
