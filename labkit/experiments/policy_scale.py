"""``policy-scale``: connection latency and policy load/update time versus the number of
NetworkPolicies, per policy engine (iptables, eBPF).

One small lab per engine (one node, a client pod ``cli`` and a server pod ``srv``, ``ps<run>-<engine>``),
Service datapath ``none``. For each number of policies N: a bulk group of N policies selecting
``srv`` (``rules`` generated ingress rules each, peers no pod has, so they isolate ``srv`` and add
rules to walk) plus one policy ``allow-cli`` that lets ``cli`` reach ``srv`` on TCP 8080. N = 0 is the
floor: no policy at all. Each engine's table is flushed and loaded with the N+1 policies (timed:
``load``); then, per ``position`` of ``allow-cli`` among the N (``first``/``last``: the iptables pod
chain walks the policy chains in order, so ``last`` is its worst case), every engine holds that
table while TCP_CRR (and RR) from ``cli`` to ``srv`` is measured for all engines and repeats
together, interleaved (:func:`labkit.experiments.core.measure_interleaved`); finally one more bulk
policy is added ``updates`` times (timed: ``update``).

Rows use the results store's columns: ``datapath`` is the engine, ``services`` the number of
policies N, ``position`` where ``allow-cli`` sits. CRR shows the rules (a new connection walks them);
RR is flat for both (established flows skip them: conntrack / the flow map).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .. import lab as labmod
from ..errors import LabkitError
from ..measure.cpus import all_cpus
from ..policy import compile_table, expand
from ..policy import get as get_engine
from ..spec import MAX_BULK_RULES, PolicyPeer, PolicyPort, PolicyRule, PolicySpec, parse_spec
from . import core

ENGINES = ("iptables", "ebpf")
POSITIONS = ("first", "last")
SERVER_PORT = 8080


@dataclass
class PolicyScaleParams:
    datapaths: list[str] = field(default_factory=lambda: list(ENGINES))  # policy engines
    services: list[int] = field(default_factory=lambda: [0, 10, 100, 1000, 10000])  # numbers of policies
    rules: int = 2  # generated rules per bulk policy
    positions: list[str] = field(default_factory=lambda: ["last"])
    metrics: list[str] = field(default_factory=lambda: ["crr", "rr"])
    repeats: int = 3
    samples: int = 5000
    warmup: int = 300
    size: int = 64
    burst: int = 20  # samples per point per turn (the engines and repeats of a table are interleaved)
    updates: int = 3
    mode: str = "veth"
    seed: int = 1

    @classmethod
    def quick(cls) -> PolicyScaleParams:
        """A couple of minutes here: CI's and the notebook's default run."""
        return cls(services=[0, 10, 1000], metrics=["crr"], repeats=2, samples=1500, warmup=150, updates=2)

    def validate(self) -> None:
        problems = []
        for eng in self.datapaths:
            try:
                get_engine(eng)
            except LabkitError as exc:
                problems.append(f"datapaths: {exc}")
        if any(n < 0 or n > 100000 for n in self.services):
            problems.append("services (numbers of policies): every N must be in 0..100000")
        if not 1 <= self.rules <= MAX_BULK_RULES:
            problems.append(f"rules: 1..{MAX_BULK_RULES} per policy")
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad:
            problems.append(f"positions: unknown {bad}; expected some of {', '.join(POSITIONS)}")
        bad = [m for m in self.metrics if m not in ("crr", "rr")]
        if bad:
            problems.append(f"metrics: unknown {bad}; expected crr and/or rr")
        if self.repeats < 1 or self.samples < 10:
            problems.append("repeats must be ≥ 1 and samples ≥ 10")
        if not 1 <= self.burst <= self.samples:
            problems.append(f"burst: must be in 1..samples ({self.samples}); 20 is a good value")
        if problems:
            raise LabkitError("invalid policy-scale parameters:\n  " + "\n  ".join(problems))


def lab_spec(engine: str, mode: str, tag: str = "") -> dict:
    """The lab of one engine; ``tag`` (from the run id) keeps concurrent runs' labs apart."""
    enis = 1 if mode.startswith("eni-") or mode == "macvlan" else 0
    return {"name": f"ps{tag}-{engine}", "datapath": "none", "policy_engine": engine,
            "nodes": [{"name": "node", "enis": enis, "pods": [
                {"name": "cli", "mode": mode, "labels": {"app": "cli"}},
                {"name": "srv", "mode": mode, "labels": {"app": "srv"}}]}]}


ALLOW = PolicySpec("allow-cli", {"app": "srv"}, ("Ingress",),
                   (PolicyRule((PolicyPeer(pod_selector={"app": "cli"}),), (PolicyPort("TCP", SERVER_PORT),)),))


def policies(n: int, rules: int, position: str = "last") -> list[PolicySpec]:
    """N bulk policies on ``srv`` and ``allow-cli`` first or last; nothing for N = 0."""
    if n == 0:
        return []
    bulk = expand([PolicySpec("bulk", {"app": "srv"}, ("Ingress",), count=n, rules=rules)])
    return [ALLOW, *bulk] if position == "first" else [*bulk, ALLOW]


class PolicyScale:
    name = "policy-scale"

    def setup(self, ctx: core.RunContext) -> None:
        p: PolicyScaleParams = ctx.params
        p.validate()
        self.labs, self.engines, self.clients = {}, {}, {}
        for eng in p.datapaths:
            get_engine(eng).preflight("none")
        for eng in tqdm(p.datapaths, desc="labs", disable=not ctx.progress, leave=False):
            spec = parse_spec(lab_spec(eng, p.mode, ctx.run.run_id[-4:]))
            labmod.down(spec.name)  # left by this run when it was killed (resume)
            lb = labmod.up(spec, progress=False)  # no policies in the spec: nothing enforced yet
            self.labs[eng] = lb
            node = lb.backend.node_context(lb.spec, "node", lb.plan)
            node.state_dir.mkdir(parents=True, exist_ok=True)
            engine = get_engine(eng)(node, "none")
            self.engines[eng] = engine
            self.clients[eng] = (lb.pod_netns("cli"), lb.backend.pod_cgroup(lb.spec, "cli"))
            # load once (eBPF compiles here), so that `load` times the table, not the compiler
            engine.sync(self._table(eng, policies(1, 1)))
            engine.sync(self._table(eng, []))
        self.srv = {eng: str(lb.plan.pods["srv"].ip) for eng, lb in self.labs.items()}
        ctx.run.update_manifest(labs={eng: lb.name for eng, lb in self.labs.items()},
                                compile_seconds={e: getattr(x, "compile_seconds", None) for e, x in self.engines.items()})

    def _table(self, eng: str, pols: list[PolicySpec]):
        lb = self.labs[eng]
        return compile_table(lb.spec, "node", lb.plan, policies=pols)

    def teardown(self, ctx: core.RunContext) -> None:
        for eng, lb in getattr(self, "labs", {}).items():
            try:
                if eng in self.engines:
                    self.engines[eng].cleanup()
            finally:
                labmod.down(lb.name)

    def measure(self, ctx: core.RunContext) -> None:
        """Per N and position: every engine holds that position's table while all their points
        (engines × repeats × metrics) are measured interleaved (see
        :func:`labkit.experiments.core.measure_interleaved`)."""
        p: PolicyScaleParams = ctx.params
        rng = random.Random(p.seed)
        per_n = p.repeats * len(p.datapaths) * len(p.positions) * len(p.metrics) * p.samples
        bar = tqdm(total=per_n * len(p.services), desc="policy-scale", unit="sample", unit_scale=True,
                   disable=not ctx.progress)
        try:
            for n in p.services:
                with all_cpus():  # nothing is measured meanwhile: load as this machine can
                    self._load(ctx, n)
                for pos in p.positions:
                    points = [self._point(eng, n, pos, rep, metric) for rep in range(1, p.repeats + 1)
                              for eng in rng.sample(p.datapaths, len(p.datapaths)) for metric in p.metrics]
                    todo = [pt for pt in points if core.point_key(pt.full) not in ctx.done]
                    bar.update((len(points) - len(todo)) * p.samples)
                    if not todo:
                        continue
                    table = policies(n, p.rules, pos)
                    for eng in p.datapaths:
                        self.engines[eng].sync(self._table(eng, table))
                    core.measure_interleaved(ctx, todo, p.samples, p.warmup, p.size, p.burst,
                                             rng=random.Random(f"{p.seed}-{n}-{pos}"), on_samples=bar.update)
                with all_cpus():
                    self._updates(ctx, n)
        finally:
            bar.close()

    def _row(self, eng: str, n: int, **kw) -> dict:
        return {"experiment": self.name, "datapath": eng, "mode": self.mode, "services": n, **kw}

    @property
    def mode(self) -> str:
        return next(iter(self.labs.values())).spec.nodes[0].pods[0].mode

    def _load(self, ctx: core.RunContext, n: int) -> None:
        p: PolicyScaleParams = ctx.params
        pols = policies(n, p.rules, "last")
        for eng, engine in self.engines.items():
            engine.sync(self._table(eng, []))  # flush, so that the load below is a whole table
            table = self._table(eng, pols)
            t0 = time.perf_counter()
            engine.sync(table)
            took = time.perf_counter() - t0
            row = self._row(eng, n, position="", repeat=0)
            if core.point_key({**row, "metric": "load"}) not in ctx.done:
                core.record_value(ctx, row, "load", took)

    def _point(self, eng, n, pos, rep, metric) -> core.LatencyPoint:
        netns, cgroup = self.clients[eng]
        return core.LatencyPoint(self._row(eng, n, position=pos, repeat=rep), metric, netns, cgroup,
                                 self.srv[eng], SERVER_PORT)

    def _updates(self, ctx: core.RunContext, n: int) -> None:
        p: PolicyScaleParams = ctx.params
        if n == 0:
            return
        base = policies(n, p.rules, "last")
        for eng, engine in self.engines.items():
            engine.sync(self._table(eng, base))
            current = list(base)
            for k in range(1, p.updates + 1):
                extra = expand([PolicySpec("extra", {"app": "srv"}, ("Ingress",), count=k, rules=p.rules,
                                           peer_cidr="100.127.0.0/16")])[-1]
                current.insert(len(current) - 1, extra)  # a new policy before allow-cli
                table = self._table(eng, current)
                t0 = time.perf_counter()
                engine.sync(table)
                took = time.perf_counter() - t0
                row = self._row(eng, n, position="", repeat=k)
                if core.point_key({**row, "metric": "update"}) not in ctx.done:
                    core.record_value(ctx, row, "update", took)


def run(params: PolicyScaleParams | None = None, resume: str | None = None, progress: bool = True,
        on_point=None):
    """Run the experiment; returns the :class:`labkit.results.Run`."""
    return core.execute(PolicyScale(), params or PolicyScaleParams(), resume=resume, progress=progress,
                        on_point=on_point)
