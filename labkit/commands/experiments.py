"""Experiment commands: ``run`` (an experiment, its results and report), ``results``, ``report``."""

from __future__ import annotations

import json
import sys

from . import command

def _run_args(p) -> None:
    """``labkit run EXPERIMENT``: one subcommand per experiment, its flags made from its parameter
    class (:mod:`labkit.experiments.params`), with the defaults in ``--help``."""
    from ..experiments import EXPERIMENTS
    from ..experiments.params import add_arguments

    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    for name, (cls, run_fn) in EXPERIMENTS.items():
        doc = sys.modules[run_fn.__module__].__doc__ or ""
        e = sub.add_parser(name, help=doc.strip().split("\n")[0].split(": ", 1)[-1] or None,
                           description=f"labkit run {name}: flags set its parameters; --quick starts from the "
                                       "short variant")
        e.add_argument("--quick", action="store_true", help="the short variant (≤ 3 min here)")
        e.add_argument("--resume", metavar="RUN_ID", help="continue a run that was stopped")
        e.add_argument("--no-report", action="store_true", help="skip the HTML report")
        e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        add_arguments(e, cls)


@command("run", "run an experiment, write results and an HTML report", _run_args, order=70)
def run(args) -> int:
    import dataclasses

    from .. import report
    from ..experiments import EXPERIMENTS, pod_modes
    from ..experiments.params import given

    cls, run_fn = EXPERIMENTS[args.experiment]
    params = cls.quick() if args.quick else cls()
    chosen = given(args, cls)
    if args.experiment == "pod-modes" and "backend" in chosen and "modes" not in chosen:
        chosen["modes"] = pod_modes.default_modes(chosen["backend"])  # the VMs' kernel has every mode
    params = dataclasses.replace(params, **chosen)
    if not args.resume:
        params.validate()
    result = run_fn(params, resume=args.resume, progress=not args.quiet)
    print(report.summary_text(result))
    if not args.no_report:
        print(f"\nreport: {report.write_report(result)}")
    print(f"results: {result.path}/points.csv ({args.experiment}, run {result.run_id})")
    return 0


def _results_args(p) -> None:
    p.add_argument("run", nargs="?", help="show one run's manifest and summary")
    p.add_argument("--json", action="store_true")


@command("results", "list runs in the results store, or show one", _results_args, order=80)
def results(args) -> int:
    from ..results import Run, list_runs, results_root
    from ..textfmt import table

    if args.run:
        one = Run.open(args.run)
        m = one.manifest()
        if args.json:
            print(json.dumps(m, indent=1))
            return 0
        print(f"{m['run_id']}: {m['experiment']} ({m['status']}), {m['started']} → {m.get('ended')}")
        print(f"  kernel {m['machine']['kernel']}, {m['machine']['cpu_model']} x{m['machine']['cpu_count']}, "
              f"labkit {m['labkit']['version']} ({m['labkit']['git']})")
        print(f"  params: {json.dumps(m['params'])}")
        print(f"  points: {len(one.points())} in {one.points_path}\n")
        from ..report import summary_text

        print(summary_text(one))
        return 0
    rows = list_runs()
    if args.json:
        print(json.dumps(rows, indent=1))
    elif not rows:
        print(f"no runs under {results_root()}/")
    else:
        print(table(rows, ["run_id", "experiment", "status", "points", "started"]))
    return 0


def _report_args(p) -> None:
    p.add_argument("run")
    p.add_argument("--images", action="store_true", help="also write every figure as PNG and SVG (kaleido)")


@command("report", "(re)write the HTML report of a run", _report_args, order=90)
def report(args) -> int:
    from ..report import write_report
    from ..results import Run

    one = Run.open(args.run)
    print(write_report(one, images=args.images))
    if args.images:
        print(f"figures: {one.path / 'figures'}/*.png, *.svg")
    return 0
