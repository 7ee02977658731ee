"""The experiment core every experiment reuses: set up, warm up, measure, tear down, record state.

:func:`execute` is a template method (papermill's ``Engine.execute_notebook`` shape): it creates (or
reopens, to resume) a run in the results store, pins labkit itself to the orchestration CPU, calls
the experiment's ``setup`` / ``measure`` / ``teardown`` with ``teardown`` in ``finally``, and marks the
run ``complete``, ``interrupted`` or ``failed`` in its manifest. Points already in the run are
passed to ``measure`` so that a resumed run skips them.

:func:`measure_interleaved` measures latency points (``lkclient`` in a pod, pinned to the load CPU,
raw samples saved, a row appended per point) together, interleaved sample by sample, so that every
point's samples are spread over the same stretch of time (why: see its docstring).
"""

from __future__ import annotations

import dataclasses
import os
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .. import nsexec
from ..errors import LabkitError, MeasurementError
from ..measure import loadgen
from ..measure.cpus import CpuPlan, pin_current_thread, plan_cpus
from ..measure.stats import latency_stats, load_raw
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


def record_value(ctx: RunContext, row: dict[str, Any], metric: str, value: float, unit: str = "s") -> None:
    ctx.record({**row, "metric": metric, "value": value, "unit": unit})


@dataclasses.dataclass(frozen=True)
class LatencyPoint:
    """One latency point of :func:`measure_interleaved`: what identifies it (``row`` + ``metric``)
    and where its client runs (``netns`` and ``cgroup`` of the client pod, target ``host:port``).
    With ``lab`` (a :class:`labkit.lab.Lab`) and ``pod``, the client runs through
    ``lab.client_session(pod)``, wherever that lab's pods are (a VM on the vagrant backend)."""

    row: dict[str, Any]
    metric: str
    netns: str
    cgroup: Path | None
    host: str
    port: int
    lab: Any = None
    pod: str = ""

    @property
    def full(self) -> dict[str, Any]:
        return {**self.row, "metric": self.metric}

    @property
    def key(self) -> str:
        return "-".join(f"{k}={self.full.get(k)}" for k in ("datapath", "mode", "services", "position", "repeat",
                                                            "metric"))


def measure_interleaved(ctx: RunContext, points: list[LatencyPoint], samples: int, warmup: int,
                        size: int = 64, burst: int = 20, rng: random.Random | None = None,
                        on_samples: Callable[[int], None] | None = None) -> None:
    """Measure ``points`` together, finely interleaved, until each has ``samples`` samples.

    Why: this machine's speed changes in steps every 0.1-3 s (the CRR p50 of one pod-to-pod path
    flips between ~100, ~120 and ~150 µs; the host, not labkit). A point measured in one stretch
    gets whichever steps fell in it: points measured one after the other differed by 5-30 % between
    repeats. Interleaved, every point sees the same mix of steps as the points it is compared with.

    How: one ``lkclient --serve`` per client pod (and metric) takes all of that pod's points in
    bursts (:meth:`~labkit.measure.loadgen.ClientSession.burst`): ``burst`` samples per point, one
    attempt per point in turn. Bursts of the different pods alternate in a fresh random order
    (``rng``) each cycle. Each session warms up once with ``warmup`` attempts spread over its
    points, and every burst discards its first attempt per point (the first after another pod
    ran). A point's samples are appended to its raw file as they come; its row is appended once it
    has all of them. A killed run resumes where the raw files stopped (``ctx.done`` holds the
    finished points; a torn last write is cut off)."""
    todo = [pt for pt in points if point_key(pt.full) not in ctx.done]
    have: dict[str, int] = {}
    for pt in todo:
        have[pt.key] = _raw_count(ctx.run.raw_path(pt.key))
    groups: dict[tuple, list[LatencyPoint]] = {}
    for pt in todo:
        if have[pt.key] >= samples:  # measured before a kill, not yet recorded
            _finish_point(ctx, pt, ctx.run.raw_path(pt.key))
        else:
            groups.setdefault((pt.netns, pt.cgroup, pt.metric), []).append(pt)
    cpus = ctx.cpus.load_cpus if ctx.cpus.pinned else None
    sessions: dict[tuple, loadgen.ClientSession] = {}
    try:
        for key, pts in groups.items():
            lab, pod = pts[0].lab, pts[0].pod
            sess = sessions[key] = (lab.client_session(pod, cpus) if lab is not None
                                    else loadgen.ClientSession(key[0], key[1], cpus))
            if warmup:
                sess.burst(key[2], [(pt.host, pt.port, Path(os.devnull)) for pt in pts], 1,
                           warmup=-(-warmup // len(pts)), size=size)
        while groups:
            keys = list(groups)
            for key in rng.sample(keys, len(keys)) if rng else keys:
                pts = groups[key]
                n = min(burst, *(samples - have[pt.key] for pt in pts))
                raws = [ctx.run.raw_path(pt.key) for pt in pts]
                res = sessions[key].burst(key[2], [(pt.host, pt.port, raw) for pt, raw in zip(pts, raws)], n,
                                          warmup=1, size=size)
                for pt, raw, r in zip(pts, raws, res):
                    with open(_errors_path(raw), "a") as log:  # errors survive a resume
                        log.write(f"{int(r.get('errors') or 0)}\n")
                    have[pt.key] += int(r.get("samples") or 0)
                    if r.get("aborted"):
                        ctx.record({**pt.full, "samples": have[pt.key], "errors": _errors(raw), "raw": ""})
                        raise MeasurementError(
                            f"lkclient {pt.metric} to {pt.host}:{pt.port} from netns {pt.netns} aborted after "
                            f"{r.get('errors')} consecutive errors: {r.get('error_kinds')}")
                    if have[pt.key] >= samples:
                        _finish_point(ctx, pt, raw)
                if on_samples:
                    on_samples(n * len(pts))
                groups[key] = [pt for pt in pts if have[pt.key] < samples]
                if not groups[key]:
                    del groups[key]
    finally:
        for sess in sessions.values():
            sess.close()


def _errors_path(raw: Path) -> Path:
    return raw.with_name(raw.name + ".errors")


def _raw_count(raw: Path) -> int:
    """Samples already in a raw file; a torn last sample (a kill mid-write) is cut off."""
    try:
        size = raw.stat().st_size
    except FileNotFoundError:
        return 0
    if size % 8:
        os.truncate(raw, size - size % 8)
    return size // 8


def _errors(raw: Path) -> int:
    """Errors of a point so far (one line per burst)."""
    try:
        return sum(int(x) for x in _errors_path(raw).read_text().split())
    except FileNotFoundError:
        return 0


def _finish_point(ctx: RunContext, pt: LatencyPoint, raw: Path) -> None:
    """Push a point's raw file to disk and append its row (a kill in here is resumed by doing it
    again: the row is what marks the point done)."""
    fd = os.open(raw, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    ctx.record({**pt.full, **latency_stats(load_raw(raw)), "errors": _errors(raw), "raw": raw.name})
    _errors_path(raw).unlink(missing_ok=True)
