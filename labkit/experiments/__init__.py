"""Experiments: functions with parameters, a CLI (``labkit run NAME``), results in the store.

- ``service-scale`` (:mod:`.service_scale`): Service latency versus number of services per datapath.
- ``pod-modes`` (:mod:`.pod_modes`): CRR/RR/UDP_RR/bandwidth per pod network mode, same and cross node.

Each experiment is a small class run by :func:`labkit.experiments.core.execute`.
"""

from __future__ import annotations

import argparse
import dataclasses

from ..errors import LabkitError
from . import pod_modes, service_scale

# name -> (parameter class, run function)
EXPERIMENTS = {"service-scale": (service_scale.ServiceScaleParams, service_scale.run),
               "pod-modes": (pod_modes.PodModesParams, pod_modes.run)}
OPTIONS = ("datapaths", "services", "positions", "modes", "metrics", "repeats", "samples", "warmup", "mode")


def _ints(text: str) -> list[int]:
    try:
        return [int(x.replace("_", "")) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,1000,5000; got {text!r}") from None


def _words(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def add_cli(sub) -> None:
    p = sub.add_parser("run", help="run an experiment (service-scale), write results and an HTML report")
    p.add_argument("experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--quick", action="store_true", help="the short variant (≤ 3 min here)")
    p.add_argument("--datapaths", type=_words, help="comma-separated, e.g. iptables-nft,ebpf")
    p.add_argument("--services", type=_ints, help="numbers of services, e.g. 1,1000,5000,10000,20000")
    p.add_argument("--positions", type=_words, help="first,middle,last,random,pod")
    p.add_argument("--metrics", type=_words, help="crr and/or rr")
    p.add_argument("--repeats", type=int)
    p.add_argument("--samples", type=int, help="samples per point")
    p.add_argument("--warmup", type=int)
    p.add_argument("--mode", help="service-scale: pod network mode of the experiment's pods (default veth)")
    p.add_argument("--modes", type=_words, help="pod-modes: comma-separated pod network modes")
    p.add_argument("--resume", metavar="RUN_ID", help="continue a run that was stopped")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_cmd_run)


def _cmd_run(args) -> int:
    cls, run_fn = EXPERIMENTS[args.experiment]
    params = cls.quick() if args.quick else cls()
    fields = {f.name for f in dataclasses.fields(params)}
    given = {o: getattr(args, o) for o in OPTIONS if getattr(args, o, None) is not None}
    wrong = sorted(set(given) - fields)
    if wrong:
        raise LabkitError(f"--{', --'.join(wrong)} do(es) not apply to {args.experiment}; its parameters: "
                          f"{', '.join(sorted(fields))}")
    params = dataclasses.replace(params, **given)
    if not args.resume:
        params.validate()
    run = run_fn(params, resume=args.resume, progress=not args.quiet)
    from .. import report

    print(report.summary_text(run))
    if not args.no_report:
        path = report.write_report(run)
        print(f"\nreport: {path}")
    print(f"results: {run.path}/points.csv ({args.experiment}, run {run.run_id})")
    return 0


__all__ = ["EXPERIMENTS", "add_cli", "service_scale", "pod_modes"]
