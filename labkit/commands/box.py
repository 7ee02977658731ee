"""``labkit box build|status|rm``: the Debian VM box of the vagrant backend
(:mod:`labkit.backends.vagrant.box`)."""

from __future__ import annotations

import json

from . import command


def _args(p) -> None:
    sub = p.add_subparsers(dest="box_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build the box from the host's Debian mirror (cached)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--no-bcc", action="store_true", help="the smaller box without bcc and kernel headers "
                   "(no eBPF datapaths in its VMs; labs always use the default box)")
    s = sub.add_parser("status", help="is the box built, where, which kernel")
    s.add_argument("--no-bcc", action="store_true")
    s.add_argument("--json", action="store_true")
    r = sub.add_parser("rm", help="remove the box (Vagrant's copy, libvirt's base volume, cache)")
    r.add_argument("--no-bcc", action="store_true")


@command("box", "the Debian VM box of the vagrant backend: build, status, rm", _args, order=110)
def box(args) -> int:
    from ..backends.vagrant import box as boxes

    recipe = boxes.BoxRecipe(with_bcc=not args.no_bcc)
    if args.box_command == "build":
        boxes.build(recipe, force=args.force)
        return 0
    if args.box_command == "rm":
        boxes.remove(recipe)
        return 0
    info = boxes.status(recipe)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            print(f"{k:14} {v}")
    return 0 if info["ready"] else 1
