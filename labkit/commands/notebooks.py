"""``labkit notebooks copy DEST [--instructor]``: the workshop notebooks as handed out, the participant's
copy without solution cells or the instructor's with them (:mod:`labkit.notebooks`)."""

from __future__ import annotations

from . import command


def _args(p) -> None:
    sub = p.add_subparsers(dest="notebooks_command", metavar="ACTION", required=True)
    c = sub.add_parser("copy", help="write the notebooks into DEST, outputs cleared; without the solution cells "
                                    "unless --instructor")
    c.add_argument("dest", metavar="DEST", help="folder to write them into (created if missing)")
    c.add_argument("--instructor", action="store_true",
                   help="keep the solution cells and set solutions = True (the instructor's copy)")
    c.add_argument("--source", metavar="DIR", help="the notebooks to copy (default: labkit's notebooks folder)")
    c.add_argument("--force", action="store_true", help="replace notebooks of the same name in DEST")


@command("notebooks", "the workshop notebooks: copy them for participants or the instructor", _args, order=105)
def notebooks(args) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..notebooks import NOTEBOOKS, instructor_copy, participant_copy

    source = Path(args.source) if args.source else NOTEBOOKS
    if not source.is_dir():
        raise UsageError(f"--source {source}: no such folder (the notebooks ship in labkit's repository; "
                         f"give the folder that holds them)")
    make = instructor_copy if args.instructor else participant_copy
    written = make(source, args.dest, overwrite=args.force)
    kind = "instructor's copy, with solutions" if args.instructor else "participant's copy, without solutions"
    print(f"{len(written)} notebooks in {args.dest} ({kind}): {', '.join(p.name for p in written)}")
    return 0
