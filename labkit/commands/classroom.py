"""``labkit classroom up|down|status``: JupyterHub, seat accounts and the labkit daemon for a room
(:mod:`labkit.classroom`)."""

from __future__ import annotations

import json

from . import command


def _args(p) -> None:
    sub = p.add_subparsers(dest="classroom_command", metavar="ACTION", required=True)
    u = sub.add_parser("up", help="make seat accounts, start the labkit daemon and JupyterHub; print the URL "
                       "and the seats' passwords")
    u.add_argument("--seats", type=int, required=True, metavar="N", help="participant accounts to make (1-200)")
    u.add_argument("--port", type=int, default=8000, help="JupyterHub's port (default 8000; it also takes the "
                   "next two on 127.0.0.1 for its own API and its proxy's)")
    u.add_argument("--bind", default="0.0.0.0", metavar="ADDRESS",
                   help="the address the room connects to (default 0.0.0.0: every interface)")
    u.add_argument("--prefix", default="seat", help="seat accounts are <prefix>01, <prefix>02, ... "
                   "(default seat); the instructor's is <prefix>-instructor")
    u.add_argument("--quota", default="", metavar="K=V,...", help="the daemon's per-participant quota, as "
                   "`labkit serve --quota`")
    u.add_argument("--no-instructor", action="store_true", help="no instructor account (and no instructors' group)")
    u.add_argument("--json", action="store_true", help="print the URL and seats as JSON")
    d = sub.add_parser("down", help="remove everything up made: JupyterHub, participants' servers, labs and "
                       "results, the accounts with their homes, the daemon if up started it")
    d.add_argument("--json", action="store_true")
    s = sub.add_parser("status", help="whether a classroom is up, its seats and processes")
    s.add_argument("--json", action="store_true")


@command("classroom", "a room on this server: seat accounts, JupyterHub and the labkit daemon (up, down, status)",
         _args, order=95)
def classroom(args) -> int:
    from .. import classroom as room

    if args.classroom_command == "up":
        info = room.up(args.seats, port=args.port, bind=args.bind, prefix=args.prefix, quota=args.quota,
                       instructor=not args.no_instructor, say=_say(args.json))
        if args.json:
            print(json.dumps(info, indent=1))
            return 0
        print(f"classroom up: {info['url']}  (on this machine: {info['local_url']})")
        print(f"seats ({len(info['seats'])}; also in {info['folder']}/seats.txt, root's alone):")
        for seat in info["seats"]:
            role = "  (instructor: sees every lab)" if seat["instructor"] else ""
            print(f"  {seat['user']:20} {seat['password']}{role}")
        print("`labkit classroom down` removes all of it")
        return 0
    if args.classroom_command == "down":
        counts = room.down(say=_say(args.json))
        if args.json:
            print(json.dumps(counts))
        elif counts:
            print("classroom down: removed " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        return 0
    info = room.status()
    if args.json:
        print(json.dumps(info, indent=1))
    elif not info["up"]:
        print("no classroom is up")
    else:
        print(f"classroom up: {info['seats']} seats on {info['bind']}:{info['port']}; accounts "
              f"{', '.join(info['accounts'])}; processes "
              + ", ".join(f"{k} {'running' if v else 'GONE'}" for k, v in info["processes"].items()))
    return 0 if info["up"] else 1


def _say(quiet: bool):
    import sys

    return (lambda text: print(text, file=sys.stderr, flush=True)) if quiet else (lambda text: print(text, flush=True))
