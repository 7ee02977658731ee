"""The experiment core every experiment reuses: set up, warm up, measure, tear down, record state.

:func:`execute` is a template method (papermill's ``Engine.execute_notebook`` shape): it creates (or
reopens, to resume) a run in the results store, pins labkit itself to the orchestration CPU, calls
the experiment's ``setup`` / ``measure`` / ``teardown`` with ``teardown`` in ``finally``, and marks the
run ``complete``, ``interrupted`` or ``failed`` in its manifest. Points already in the run are
passed to ``measure`` so that a resumed run skips them.

:func:`measure_latency` runs one latency point (``lkclient`` in a pod, pinned to the load CPU, raw
samples saved) and appends its row. :func:`measure_interleaved` measures several points together in
slices, round-robin, so that each point's samples are spread over the same stretch of time (why:
see its docstring).
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


@dataclasses.dataclass(frozen=True)
class LatencyPoint:
    """One latency point of :func:`measure_interleaved`: what identifies it (``row`` + ``metric``)
    and where its client runs (``netns`` and ``cgroup`` of the client pod, target ``host:port``)."""

    row: dict[str, Any]
    metric: str
    netns: str
    cgroup: Path | None
    host: str
    port: int

    @property
    def full(self) -> dict[str, Any]:
        return {**self.row, "metric": self.metric}

    @property
    def key(self) -> str:
        return "-".join(f"{k}={self.full.get(k)}" for k in ("datapath", "mode", "services", "position", "repeat",
                                                            "metric"))


def slice_sizes(samples: int, slices: int) -> list[int]:
    """``samples`` split into ``slices`` near-equal parts (the first ones one larger), none empty."""
    slices = max(1, min(slices, samples))
    q, r = divmod(samples, slices)
    return [q + (i < r) for i in range(slices)]


def measure_interleaved(ctx: RunContext, points: list[LatencyPoint], samples: int, warmup: int,
                        size: int = 64, slices: int = 1, rng: random.Random | None = None,
                        on_slice: Callable[[LatencyPoint, int], None] | None = None) -> None:
    """Measure ``points`` together: ``slices`` rounds, each running every unfinished point for its
    share of ``samples``, in a fresh random order per round (``rng``; without it round k starts k
    places further down the list), so that no point always follows the same one. A point's row is
    appended when its last slice is done, from all its samples.

    Why: this machine's speed changes in steps every 0.1-3 s (CRR p50 of a pod-to-pod path flips
    between ~100, ~120 and ~150 µs; the host, not labkit). A point measured in one 0.6 s stretch
    gets whichever steps fell in it, so repeats of it differed by 5-30 %; sliced, each point sees
    the mix of the whole round, the same mix as the points it is compared with.

    Each slice's raw samples are kept as ``<raw>.s<k>`` (renamed into place only once ``lkclient``
    has finished), so a killed run resumes at the slice it was in: ``ctx.done`` holds the finished
    points, and the slice files of an unfinished one say how far it got.

    One ``lkclient --serve`` per client pod runs every slice of that pod (a slice costs a pipe
    round trip, not a process start); each is warmed up with ``warmup`` connections to its first
    point, then each slice with ``warmup / slices`` (at least ``min(warmup, 5)``) to its own."""
    sizes = slice_sizes(samples, slices)
    warm = max(-(-warmup // len(sizes)), min(warmup, 5))
    todo = [pt for pt in points if point_key(pt.full) not in ctx.done]
    last = len(sizes) - 1
    cpus = ctx.cpus.load_cpus if ctx.cpus.pinned else None
    sessions: dict[tuple, loadgen.ClientSession] = {}
    try:
        for pt in todo:  # one lkclient per client pod, warmed up once on its first point
            if (pt.netns, pt.cgroup) not in sessions:
                s = sessions[pt.netns, pt.cgroup] = loadgen.ClientSession(pt.netns, pt.cgroup, cpus)
                if warmup:
                    s.run(pt.metric, pt.host, pt.port, samples=1, warmup=warmup, size=size)
        for k, n in enumerate(sizes):
            if rng is not None:
                order = rng.sample(todo, len(todo))
            else:
                shift = k % len(todo) if todo else 0
                order = todo[shift:] + todo[:shift]
            for pt in order:
                raw = ctx.run.raw_path(pt.key)
                part = _slice_path(raw, k)
                if not part.exists():
                    tmp = part.with_name(part.name + ".tmp")
                    try:
                        res = sessions[pt.netns, pt.cgroup].run(pt.metric, pt.host, pt.port, samples=n,
                                                                warmup=warm, size=size, raw_path=tmp)
                    except MeasurementError as exc:
                        partial = getattr(exc, "result", None) or {}
                        ctx.record({**pt.full, "samples": partial.get("samples", 0),
                                    "errors": _slice_errors(raw) + partial.get("errors", n), "raw": ""})
                        raise
                    with open(raw.with_name(raw.name + ".slices"), "a") as log:  # errors survive a resume
                        log.write(f"{k} {int(res.get('errors') or 0)}\n")
                    os.replace(tmp, part)
                    if on_slice:
                        on_slice(pt, k)
                if k == last:
                    _finish_point(ctx, pt, raw, len(sizes))
    finally:
        for s in sessions.values():
            s.close()


def _slice_path(raw: Path, k: int) -> Path:
    return raw.with_name(f"{raw.name}.s{k}")


def _slice_errors(raw: Path) -> int:
    """Errors of the slices of a point finished so far (one ``"<slice> <errors>"`` line each; a
    slice measured again after a resume counts once, with its last figure)."""
    try:
        lines = raw.with_name(raw.name + ".slices").read_text().split("\n")
    except FileNotFoundError:
        return 0
    per = dict(line.split() for line in lines if line.strip())
    return sum(int(v) for v in per.values())


def _finish_point(ctx: RunContext, pt: LatencyPoint, raw: Path, slices: int) -> None:
    """Join a point's slice files into its raw file (in slice order), append its row, then drop the
    slice files (a kill anywhere in here is resumed by doing it again)."""
    parts = [_slice_path(raw, k) for k in range(slices)]
    tmp = raw.with_name(raw.name + ".tmp")
    with open(tmp, "wb") as out:
        for part in parts:
            out.write(part.read_bytes())
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, raw)
    ctx.record({**pt.full, **latency_stats(load_raw(raw)), "errors": _slice_errors(raw), "raw": raw.name})
    for part in [*parts, raw.with_name(raw.name + ".slices")]:
        part.unlink(missing_ok=True)
