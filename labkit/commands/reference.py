"""``labkit reference``: the shipped reference runs (:mod:`labkit.reference`); ``--build`` measures them."""

from __future__ import annotations

import json

from . import command


def _args(p) -> None:
    p.add_argument("--build", nargs="*", metavar="KEY", default=None,
                   help="measure them afresh and replace the shipped ones (root; about 25 min here): every one, "
                        "or the keys named (service-scale, policy-scale, pod-modes, pod-modes-vm)")
    p.add_argument("--json", action="store_true")


@command("reference", "the shipped reference runs (open one as RUN_ID 'reference:KEY'); --build measures them",
         _args, order=75)
def reference(args) -> int:
    from .. import reference as ref

    if args.build is not None:
        ref.build(args.build or None)
    rows = ref.listing()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no reference runs are shipped here (labkit reference --build measures them)")
        return 1
    for r in rows:
        print(f"reference:{r['key']:14} {r['run_id']:40} {r['measured']}  {r['backend']:8} kernel {r['kernel']}, "
              f"{r['cpus']} x {r['cpu']}")
    print("open one: labkit report reference:KEY, or run_id = 'reference' in notebooks 02-04")
    return 0
