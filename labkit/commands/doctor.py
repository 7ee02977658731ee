"""``labkit doctor``: what this machine can run, and how to fix what it cannot (:mod:`labkit.doctor`).

``--host TARGET`` is the performance preflight of TARGET instead (:func:`labkit.doctor.host_cli`,
facts from :mod:`labkit.hostfacts`): what would make its numbers slow or noisy, each with its fix."""

from __future__ import annotations

from . import command, csv_words


def _args(p) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--host", metavar="TARGET",
                   help="performance preflight of TARGET instead: user@host[:port] over ssh, or localhost "
                        "(CPU governor, SMT, isolated CPUs, irqbalance, clock source, steal, NICs, kernel features)")
    p.add_argument("--nics", metavar="NIC[,NIC...]", type=csv_words, default=[],
                   help="with --host: also report these network devices of TARGET (offloads, queues, driver)")


@command("doctor", "what this machine can run, and how to fix what it cannot", _args, order=0)
def doctor(args) -> int:
    from .. import doctor as doc
    from ..errors import UsageError

    if args.host:
        return doc.host_cli(args.host, args.nics, args.json)
    if args.nics:
        raise UsageError("--nics names devices of the host examined by --host. Fix: add --host TARGET "
                         "(e.g. labkit doctor --host localhost --nics eth0)")
    return doc.cli(args)
