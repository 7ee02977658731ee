"""``labkit sweep``: a notebook over a parameter grid with papermill (:mod:`labkit.sweep`)."""

from __future__ import annotations

import json

from . import command


def _args(w) -> None:
    w.add_argument("notebook", help="e.g. notebooks/03-service-scale.ipynb")
    w.add_argument("-p", "--param", action="append", metavar="NAME=V1,V2",
                   help="grid values (YAML; commas inside [...] belong to the value); repeat for more names")
    w.add_argument("-o", "--out", help="folder for the output notebooks (default results/sweeps/<time>-<name>)")
    w.add_argument("--results", help="results store the runs go to (default $LABKIT_RESULTS or ./results)")
    w.add_argument("--kernel", help="Jupyter kernel name (default: the notebook's)")
    w.add_argument("--keep-going", action="store_true", help="run the remaining combinations after a failure")
    w.add_argument("--dry-run", action="store_true", help="print the combinations and stop")


@command("sweep", "run a notebook over a parameter grid with papermill", _args, order=100)
def sweep(args) -> int:
    from pathlib import Path

    from ..errors import UsageError
    from ..sweep import combinations, parse_assignments, run_sweep

    if not Path(args.notebook).is_file():
        raise UsageError(f"notebook {args.notebook}: no such file (e.g. notebooks/03-service-scale.ipynb)")
    grid = parse_assignments(args.param or [])
    if args.dry_run:
        for k, combo in enumerate(combinations(grid), 1):
            print(f"{k}: {json.dumps(combo)}")
        return 0
    index = run_sweep(args.notebook, grid, out=args.out, results_dir=args.results, keep_going=args.keep_going,
                      kernel=args.kernel)
    failed = [r for r in index if r["status"] != "complete"]
    out = Path(index[0]["notebook"]).parent if index else args.out
    print(f"{len(index) - len(failed)}/{len(index)} notebooks complete; index: {out}/sweep.json")
    return 1 if failed else 0
