"""``labkit box build|status|rm``: the Debian VM boxes of the vagrant backend, one per release
(:mod:`labkit.backends.vagrant.box`)."""

from __future__ import annotations

import json

from . import command


def _args(p) -> None:
    from ..backends.vagrant.box import DEFAULT_RELEASE, RELEASES

    def release(q, every: bool = False) -> None:
        default = "every cached box" if every else DEFAULT_RELEASE
        q.add_argument("--release", metavar="NAME", default=None if every else DEFAULT_RELEASE,
                       help=f"the Debian release: {', '.join(RELEASES)} (default: {default})")

    sub = p.add_subparsers(dest="box_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="build a box from the host's Debian mirror (cached)")
    release(b)
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--no-bcc", action="store_true", help="the smaller box without bcc and kernel headers "
                   "(no eBPF datapaths in its VMs; labs always use the default box)")
    s = sub.add_parser("status", help="which boxes are built, where, their kernel and its features")
    release(s, every=True)
    s.add_argument("--no-bcc", action="store_true")
    s.add_argument("--json", action="store_true")
    r = sub.add_parser("rm", help="remove a box (Vagrant's copy, libvirt's base volume, cache)")
    release(r)
    r.add_argument("--no-bcc", action="store_true")


def _print(info: dict) -> None:
    from ..backends.vagrant.box import describe_features

    for k, v in info.items():
        print(f"{k:14} {describe_features(v) if k == 'features' else v}")


@command("box", "the Debian VM boxes of the vagrant backend: build, status, rm", _args, order=110)
def box(args) -> int:
    from ..backends.vagrant import box as boxes

    if args.box_command == "status" and args.release is None and not args.no_bcc:
        # every release's box and whatever else is cached; exit 0 when the default box is built
        listed = {b.recipe: b for b in boxes.cached_boxes()}
        for name in boxes.RELEASES:
            recipe = boxes.BoxRecipe(release=name)
            listed.setdefault(recipe, boxes.box_for(recipe))
        infos = [b.info() for b in sorted(listed.values(), key=lambda b: (list(boxes.RELEASES).index(
            b.recipe.release), not b.recipe.with_bcc))]
        if args.json:
            print(json.dumps(infos, indent=1))
        else:
            for k, info in enumerate(infos):
                if k:
                    print()
                _print(info)
        return 0 if boxes.box_for().ready() else 1
    boxes.release_of(args.release or boxes.DEFAULT_RELEASE)  # an unknown name: one line listing the known
    recipe = boxes.BoxRecipe(release=args.release or boxes.DEFAULT_RELEASE, with_bcc=not args.no_bcc)
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
        _print(info)
    return 0 if info["ready"] else 1
