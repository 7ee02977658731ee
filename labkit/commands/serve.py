"""``labkit serve``: the privileged daemon for unprivileged users (:mod:`labkit.serve.daemon`)."""

from __future__ import annotations

from . import command


def _serve_args(p) -> None:
    p.add_argument("--socket", help="the Unix socket to listen on (default /run/labkit/labkit.sock; "
                   "LABKIT_SOCKET for the clients)")
    p.add_argument("--instructors", default="instructor", metavar="GROUP",
                   help="members of this group see and may remove every lab (default: instructor)")
    p.add_argument("--quota", default="", metavar="K=V,...",
                   help="per participant: labs (at once), and per lab nodes, pods, services, policies; vms=yes "
                        "allows VM labs; run_minutes bounds a run's estimated measuring time (defaults: labs=2,"
                        "nodes=3,pods=12,services=200,policies=20,vms=no,run_minutes=10)")
    p.add_argument("--unit", action="store_true", help="print a systemd unit that runs the daemon, and stop")


@command("serve", "the privileged daemon: labs for unprivileged users (a classroom), on a Unix socket",
         _serve_args, order=90)
def serve(args) -> int:
    import os
    import shutil
    import signal
    import sys
    from pathlib import Path

    from ..serve.daemon import SOCKET, UNIT, Daemon, Quota

    if args.unit:
        print(UNIT.format(labkit=shutil.which("labkit") or f"{sys.executable} -m labkit.cli"), end="")
        return 0
    daemon = Daemon(Path(args.socket) if args.socket else SOCKET, args.instructors, Quota.parse(args.quota),
                    log=lambda text: print(text, flush=True))
    daemon.bind()
    os.chdir("/")  # a daemon holds no folder of anyone's (the in-process daemons of tests keep theirs)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    try:
        daemon.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        daemon.stop()
    return 0
