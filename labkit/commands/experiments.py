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
        e.add_argument("--params", metavar="FILE.yaml", help="parameters from a YAML mapping (papermill's convention: "
                       "names as the flags or the fields); flags given as well win")
        e.add_argument("--dry-run", action="store_true", help="print the plan (labs, points, estimated time) and stop")
        e.add_argument("--json", action="store_true", help="print the summary as JSON (and the plan, with --dry-run)")
        add_arguments(e, cls)


@command("run", "run an experiment, write results and an HTML report", _run_args, order=70)
def run(args) -> int:
    import dataclasses

    from .. import report
    from ..errors import UsageError
    from ..experiments import EXPERIMENTS
    from ..serve.client import Client, use_daemon

    if use_daemon() and not args.dry_run:  # not root: the daemon runs it, when the measurement CPUs are free
        raw = list(getattr(args, "raw_argv", None) or sys.argv[1:])
        tail = raw[raw.index(args.experiment) + 1:] if args.experiment in raw else []
        say = None if args.quiet else (lambda text: print(f"labkit: {text}", file=sys.stderr, flush=True))
        return Client(progress=say).run(args.experiment, tail)
    cls, run_fn = EXPERIMENTS[args.experiment]
    params, chosen = params_of(args)
    if args.resume and chosen:
        raise UsageError(f"--resume continues run {args.resume} with its own parameters; give no others "
                         f"(given: {', '.join('--' + cls.flag(k) for k in chosen)})")
    if not args.resume:
        params.validate()
    if args.dry_run:
        plan = {"experiment": args.experiment, "params": dataclasses.asdict(params), **params.estimate()}
        print(json.dumps(plan, indent=1) if args.json else _plan_text(plan))
        return 0
    _writable_results()
    result = run_fn(params, resume=args.resume, progress=not args.quiet)
    path = None if args.no_report else report.write_report(result)
    if args.json:
        print(json.dumps({**report.summary_data(result), "report": str(path) if path else None}, indent=1,
                         default=str))
        return 0
    print(report.summary_text(result))
    if path:
        print(f"\nreport: {path}")
    print(f"results: {result.path}/points.csv ({args.experiment}, run {result.run_id})")
    return 0


def params_of(args):
    """The parameters ``labkit run`` measures with (defaults or --quick's, then --params, then flags),
    not yet validated, and the fields given explicitly (the labkit daemon checks a participant's run
    with the same)."""
    import dataclasses

    from ..experiments import EXPERIMENTS, pod_modes
    from ..experiments.params import given

    cls, _ = EXPERIMENTS[args.experiment]
    chosen = {**_params_file(args.params, cls), **given(args, cls)}
    if args.experiment == "pod-modes" and args.quick:  # the VMs' short variant measures less (TCG)
        params = cls.quick(backend=chosen.get("backend", "netns"))
    else:
        params = cls.quick() if args.quick else cls()
    if args.experiment == "pod-modes" and "backend" in chosen and "modes" not in chosen:
        # the modes the backend's kernel has (the VMs': every mode of their release's box)
        chosen["modes"] = pod_modes.default_modes(chosen["backend"], chosen.get("release"))
    return dataclasses.replace(params, **chosen), chosen


def _params_file(path: str | None, cls) -> dict:
    """The parameters of a ``--params`` YAML file (validated with the rest)."""
    if not path:
        return {}
    from pathlib import Path

    import yaml

    from ..errors import UsageError

    f = Path(path)
    if not f.is_file():
        raise UsageError(f"--params {path}: no such file")
    try:
        data = yaml.safe_load(f.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--params {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--params {path}: expected a mapping of parameter names to values")
    return cls.from_mapping(data, f"--params {path}")


def _writable_results() -> None:
    """The results store can be made and written: said before any lab is built (root passes every
    permission check, so this writes a file there, as the run is about to)."""
    import tempfile

    from ..errors import UsageError
    from ..results import results_root

    root = results_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise UsageError(f"results store {root} is not a writable folder ({exc.strerror}); set LABKIT_RESULTS "
                         "to one") from None


def _plan_text(plan: dict) -> str:
    minutes = plan["estimated_seconds"] / 60
    took = f"{minutes:.0f} min" if minutes >= 1.5 else f"{plan['estimated_seconds']} s"
    lines = [f"labkit run {plan['experiment']}: {plan['points_total']} points, about {took} here (estimate)"]
    lines += [f"  points by metric: {', '.join(f'{m} {n}' for m, n in plan['points'].items())}"]
    lines += [f"  lab {lab['name']}: {lab['nodes']} node(s), {lab['pods']} pods" for lab in plan["labs"]]
    lines += ["  parameters: " + ", ".join(f"{k}={v}" for k, v in plan["params"].items())]
    return "\n".join(lines)


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

    from .. import reference

    one = Run.open(args.run)
    path = write_report(one, images=args.images)
    if reference.is_reference(one):
        print(reference.caption(one))
    print(path)
    if args.images:
        print(f"figures: {path.parent / 'figures'}/*.png, *.svg")
    return 0
