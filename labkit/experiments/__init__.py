"""Experiments: functions with parameters, a CLI (``labkit run NAME``), results in the store.

- ``service-scale`` (:mod:`.service_scale`): Service latency versus number of services per datapath.
- ``pod-modes`` (:mod:`.pod_modes`): CRR/RR/UDP_RR/bandwidth per pod network mode, same and cross node.
- ``policy-scale`` (:mod:`.policy_scale`): latency and policy load/update time versus the number of
  NetworkPolicies per policy engine (``--datapaths`` names engines, ``--services`` numbers of policies).

Each experiment is a small class run by :func:`labkit.experiments.core.execute`.
"""

from __future__ import annotations

import dataclasses

from ..errors import LabkitError
from . import pod_modes, policy_scale, service_scale

# name -> (parameter class, run function)
EXPERIMENTS = {"service-scale": (service_scale.ServiceScaleParams, service_scale.run),
               "pod-modes": (pod_modes.PodModesParams, pod_modes.run),
               "policy-scale": (policy_scale.PolicyScaleParams, policy_scale.run)}
OPTIONS = ("datapaths", "services", "positions", "modes", "metrics", "repeats", "samples", "warmup", "burst", "mode", "backend")


def cli_run(args) -> int:
    """`labkit run`: parsers are declared in :mod:`labkit.cli` (kept light), the work is here."""
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
    run = run_fn(params, resume=args.resume, progress=not args.quiet)
    from .. import report

    print(report.summary_text(run))
    if not args.no_report:
        path = report.write_report(run)
        print(f"\nreport: {path}")
    print(f"results: {run.path}/points.csv ({args.experiment}, run {run.run_id})")
    return 0


__all__ = ["EXPERIMENTS", "cli_run", "service_scale", "pod_modes", "policy_scale"]
