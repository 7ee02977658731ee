"""Experiment commands: ``run`` (an experiment, its results and report), ``results``, ``report``."""

from __future__ import annotations

import json

from . import command, csv_ints, csv_words

EXPERIMENT_NAMES = ("pod-modes", "service-scale", "policy-scale")
# the `run` flags that set an experiment parameter of the same name
OPTIONS = ("datapaths", "services", "positions", "modes", "metrics", "repeats", "samples", "warmup", "burst", "mode",
           "backend")


def _run_args(p) -> None:
    p.add_argument("experiment", choices=EXPERIMENT_NAMES)
    p.add_argument("--quick", action="store_true", help="the short variant (≤ 3 min here)")
    p.add_argument("--datapaths", type=csv_words, help="service-scale: comma-separated, e.g. iptables-nft,ebpf")
    p.add_argument("--services", type=csv_ints, help="service-scale: numbers of services, e.g. 1,1000,5000")
    p.add_argument("--positions", type=csv_words, help="service-scale: first,middle,last,random,pod")
    p.add_argument("--mode", help="service-scale: pod network mode of the experiment's pods (default veth)")
    p.add_argument("--backend", help="service-scale, pod-modes: where the labs run, netns (default) or vagrant "
                   "(VMs on Debian's kernel: ipvs, eni-ipvlan; see vagrant/README.md)")
    p.add_argument("--modes", type=csv_words, help="pod-modes: comma-separated pod network modes")
    p.add_argument("--metrics", type=csv_words, help="crr,rr (service-scale); crr,rr,udp_rr,bandwidth (pod-modes)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--samples", type=int, help="samples per point")
    p.add_argument("--warmup", type=int)
    p.add_argument("--burst", type=int, help="service-scale: samples per point per turn; the points of an N "
                   "are measured interleaved, turn by turn (default 20)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue a run that was stopped")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


@command("run", "run an experiment, write results and an HTML report", _run_args, order=70)
def run(args) -> int:
    import dataclasses

    from .. import report
    from ..errors import LabkitError
    from ..experiments import EXPERIMENTS, pod_modes

    cls, run_fn = EXPERIMENTS[args.experiment]
    params = cls.quick() if args.quick else cls()
    fields = {f.name for f in dataclasses.fields(params)}
    given = {o: getattr(args, o) for o in OPTIONS if getattr(args, o, None) is not None}
    wrong = sorted(set(given) - fields)
    if wrong:
        raise LabkitError(f"--{', --'.join(wrong)} do(es) not apply to {args.experiment}; its parameters: "
                          f"{', '.join(sorted(fields))}")
    if args.experiment == "pod-modes" and "backend" in given and "modes" not in given:
        given["modes"] = pod_modes.default_modes(given["backend"])  # the VMs' kernel has every mode
    params = dataclasses.replace(params, **given)
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
        print(f"  points: {len(one.points())} in {one.points_path}")
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
