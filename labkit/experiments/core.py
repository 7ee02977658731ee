"""The experiment core every experiment reuses: set up, warm up, measure, tear down, record state.

:func:`execute` is a template method (papermill's ``Engine.execute_notebook`` shape): it creates (or
reopens, to resume) a run in the results store, pins labkit itself to the orchestration CPU, calls
the experiment's ``setup`` / ``measure`` / ``teardown`` with ``teardown`` in ``finally``, and marks the
run ``complete``, ``interrupted`` or ``failed`` in its manifest. Points already in the run are
passed to ``measure`` so that a resumed run skips them.

:func:`measure_latency` runs one latency point (``lkclient`` in a pod, pinned to the load CPU, raw
samples saved) and appends its row.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .. import nsexec
from ..errors import LabkitError, MeasurementError
from ..measure import loadgen
from ..measure.cpus import CpuPlan, pin_current_thread, plan_cpus
from ..results import Run


class Experiment(Protocol):
    name: str

    def setup(self, ctx: RunContext) -> None: ...

    def measure(self, ctx: RunContext) -> None: ...

    def teardown(self, ctx: RunContext) -> None: ...


@dataclasses.dataclass
class RunContext:
    """What an experiment gets while it runs."""

    run: Run
    params: Any
    cpus: CpuPlan
    done: set[tuple]  # keys of points already recorded (resume)
    progress: bool = True
    on_point: Callable[[dict], None] | None = None  # live consumers (widgets): called after each row

    def record(self, row: dict[str, Any]) -> None:
        self.run.append(row)
        if self.on_point:
            self.on_point(row)


def point_key(row: dict[str, Any]) -> tuple:
    """Identity of a point for resume: what was measured, not what came out."""
    return tuple(str(row.get(k, "")) for k in ("datapath", "mode", "services", "position", "repeat", "metric"))


@nsexec.outside_event_loop
def execute(experiment: Experiment, params: Any, resume: str | None = None, progress: bool = True,
            on_point: Callable[[dict], None] | None = None) -> Run:
    plan = plan_cpus()
    if not plan.pinned:
        warnings.warn(plan.warning or "CPUs not separated", stacklevel=2)
    if resume:
        run = Run.open(resume)
        m = run.manifest()
        if m["experiment"] != experiment.name:
            raise LabkitError(f"run {run.run_id} is a {m['experiment']} run, not {experiment.name}")
        params = type(params)(**m["params"])
        done = {point_key(r) for r in run.points().to_dict("records")}
        run.update_manifest(status="running", resumed=m.get("resumed", 0) + 1)
    else:
        run = Run.create(experiment.name, dataclasses.asdict(params))
        done = set()
    ctx = RunContext(run, params, plan, done, progress, on_point)
    pin_current_thread(plan.orchestration_cpus)
    status = "failed"
    try:
        experiment.setup(ctx)
        experiment.measure(ctx)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        try:
            experiment.teardown(ctx)
        finally:
            run.finish(status)
    return run


def measure_latency(ctx: RunContext, netns: str, cgroup: Path | None, metric: str, host: str, port: int,
                    row: dict[str, Any], samples: int, warmup: int, size: int = 64) -> dict[str, Any]:
    """One latency point: ``lkclient`` inside ``netns``/``cgroup`` on the load CPUs; raw samples kept."""
    full = {**row, "metric": metric}
    key = "-".join(f"{k}={full.get(k)}" for k in ("datapath", "mode", "services", "position", "repeat", "metric"))
    raw = ctx.run.raw_path(key)
    try:
        res = loadgen.run_client(netns, metric, host, port, samples=samples, warmup=warmup, size=size,
                                 raw_path=raw, cgroup=cgroup,
                                 cpus=ctx.cpus.load_cpus if ctx.cpus.pinned else None)
    except MeasurementError as exc:
        partial = getattr(exc, "result", None) or {}
        ctx.record({**full, "samples": partial.get("samples", 0), "errors": partial.get("errors", samples),
                    "raw": raw.name if raw.exists() else ""})
        raise
    out = {**full, **{k: res.get(k) for k in ("p50_us", "p90_us", "p99_us", "p999_us", "mean_us", "min_us",
                                             "max_us", "samples", "errors")}, "raw": raw.name}
    ctx.record(out)
    return out


def record_value(ctx: RunContext, row: dict[str, Any], metric: str, value: float, unit: str = "s") -> None:
    ctx.record({**row, "metric": metric, "value": value, "unit": unit})
