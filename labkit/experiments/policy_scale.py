"""``policy-scale``: connection latency and policy load/update time versus the number of
NetworkPolicies, per policy engine (iptables, eBPF).

One small lab per engine (``ps<run>-<engine>``, Service datapath ``none``) with a node of its own for
every (N, position) of the sweep: node ``n<j>`` holds a client pod ``cli-<j>`` and a server pod
``srv-<j>`` and its engine enforces that N and position's table: a bulk group of N policies selecting
``srv-<j>`` (``rules`` generated ingress rules each, peers no pod has, so they isolate it and add
rules to walk) plus one policy ``allow-cli`` that lets ``cli-<j>`` reach ``srv-<j>`` on TCP 8080,
first or last among them (``position``: the iptables pod chain walks the policy chains in order, so
``last`` is its worst case). N = 0 is the floor: no policy at all. Every node's table is loaded
(timed: ``load``, the first position's table of each N, from empty); then TCP_CRR (and RR) from
``cli-<j>`` to ``srv-<j>`` is measured for every engine, N, position and repeat together,
interleaved (:func:`labkit.experiments.core.measure_interleaved`: this host's speed drifts by up
to ~20 % for minutes, so tables measured one after the other are not comparable); finally one more
bulk policy is added ``updates`` times at each N (timed: ``update``).

Rows use the results store's columns: ``datapath`` is the engine, ``services`` the number of
policies N, ``position`` where ``allow-cli`` sits. CRR shows the rules (a new connection walks them);
RR is flat for both (established flows skip them: conntrack / the flow map).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from .. import lab as labmod
from ..measure.cpus import all_cpus
from ..policy import compile_table, expand
from ..policy import get as get_engine
from .. import modes as podmodes
from ..spec import MAX_BULK_RULES, PolicyPeer, PolicyPort, PolicyRule, PolicySpec, parse_spec
from . import core
from .params import Params, estimate, param

ENGINES = ("iptables", "ebpf")
POSITIONS = ("first", "last")
SERVER_PORT = 8080


def _engine_names() -> list[str]:
    from ..policy import ENGINES as registry

    return registry.names()


@dataclass
class PolicyScaleParams(Params):
    experiment = "policy-scale"
    flags = {"datapaths": "engines", "services": "policies"}  # the results' columns keep the datapath/services names
    aliases = {"datapaths": "datapaths", "services": "services"}
    datapaths: list[str] = param(default_factory=lambda: list(ENGINES), choices=_engine_names,
                                 help="the NetworkPolicy engines to compare")
    services: list[int] = param(default_factory=lambda: [0, 10, 100, 1000, 10000], min=0, max=100000,
                                help="numbers of policies")
    rules: int = param(2, min=1, max=MAX_BULK_RULES, help="generated rules per bulk policy")
    positions: list[str] = param(default_factory=lambda: ["last"], choices=POSITIONS,
                                 help="where the policy that admits the client stands (first or last)")
    metrics: list[str] = param(default_factory=lambda: ["crr", "rr"], choices=("crr", "rr"), help="latency metrics")
    repeats: int = param(3, min=1, max=100, help="repeats of every point, interleaved")
    samples: int = param(5000, min=10, help="latency samples per point")
    warmup: int = param(300, min=0, help="warm-up attempts per client before measuring")
    size: int = param(64, min=1, max=65536, help="payload bytes each way")
    burst: int = param(20, min=1, help="samples per point per turn (the engines and repeats of a table are "
                                       "interleaved)")
    updates: int = param(3, min=0, max=100, help="one-policy additions timed at each N")
    mode: str = param("veth", choices=podmodes.names, help="pod network mode of the experiment's pods")
    seed: int = param(1, help="random choices of the run")

    @classmethod
    def quick(cls) -> PolicyScaleParams:
        """A couple of minutes here: CI's and the notebook's default run."""
        return cls(services=[0, 10, 1000], metrics=["crr"], repeats=2, samples=1500, warmup=150, updates=2)

    def estimate(self) -> dict:
        grid = len(self.datapaths) * len(self.services) * len(self.positions) * self.repeats
        nodes = len(self.services) * len(self.positions)
        labs = [{"name": f"ps<run>-{eng}", "nodes": nodes, "pods": 2 * nodes} for eng in self.datapaths]
        return estimate({m: grid for m in self.metrics}, self.samples, 0, "netns", labs,
                        table_loads=len(self.datapaths) * sum(self.services) * self.rules * (1 + self.updates))

    def checks(self) -> list[str]:
        if self.burst > self.samples:
            return [f"burst: must be at most samples ({self.samples}); 20 is a good value"]
        return []


def lab_spec(engine: str, mode: str, tag: str = "", nodes: int = 1) -> dict:
    """The lab of one engine: ``nodes`` nodes ``n<j>``, each with ``cli-<j>`` and ``srv-<j>`` (labelled
    ``app: cli-<j>`` / ``app: srv-<j>``, so that one node's policies select nothing on another);
    ``tag`` (from the run id) keeps concurrent runs' labs apart."""
    enis = podmodes.enis_needed([mode, mode])
    return {"name": f"ps{tag}-{engine}", "datapath": "none", "policy_engine": engine,
            "nodes": [{"name": f"n{j}", "enis": enis, "pods": [
                {"name": f"cli-{j}", "mode": mode, "labels": {"app": f"cli-{j}"}},
                {"name": f"srv-{j}", "mode": mode, "labels": {"app": f"srv-{j}"}}]} for j in range(nodes)]}


def allow(j: int = 0) -> PolicySpec:
    """``allow-cli``: ``cli-<j>`` may reach ``srv-<j>`` on TCP 8080."""
    return PolicySpec("allow-cli", {"app": f"srv-{j}"}, ("Ingress",),
                      (PolicyRule((PolicyPeer(pod_selector={"app": f"cli-{j}"}),), (PolicyPort("TCP", SERVER_PORT),)),))


def policies(n: int, rules: int, position: str = "last", j: int = 0) -> list[PolicySpec]:
    """N bulk policies on ``srv-<j>`` and ``allow-cli`` first or last; nothing for N = 0."""
    if n == 0:
        return []
    bulk = expand([PolicySpec("bulk", {"app": f"srv-{j}"}, ("Ingress",), count=n, rules=rules)])
    return [allow(j), *bulk] if position == "first" else [*bulk, allow(j)]


class PolicyScale:
    name = "policy-scale"

    def setup(self, ctx: core.RunContext) -> None:
        p: PolicyScaleParams = ctx.params
        p.validate()
        # (N, position) -> its node's index
        self.node_of = {(n, pos): j for j, (n, pos) in enumerate((n, pos) for n in p.services for pos in p.positions)}
        self.labs, self.engines, self.clients = {}, {}, {}
        for eng in p.datapaths:
            get_engine(eng).preflight("none")
        for eng in tqdm(p.datapaths, desc="labs", disable=not ctx.progress, leave=False):
            spec = parse_spec(lab_spec(eng, p.mode, ctx.run.run_id[-4:], len(self.node_of)))
            labmod.down(spec.name)  # left by this run when it was killed (resume)
            lb = self.labs[eng] = labmod.up(spec, progress=False)  # no policies in the spec: nothing enforced yet
            for j in self.node_of.values():
                node = lb.backend.node_context(lb.spec, f"n{j}", lb.plan)
                node.state_dir.mkdir(parents=True, exist_ok=True)
                engine = self.engines[eng, j] = get_engine(eng)(node, "none")
                self.clients[eng, j] = (lb.pod_netns(f"cli-{j}"), lb.backend.pod_cgroup(lb.spec, f"cli-{j}"))
                # load once (eBPF compiles here), so that `load` times the table, not the compiler
                engine.sync(self._table(eng, j, policies(1, 1, "last", j)))
                engine.sync(self._table(eng, j, []))
        self.srv = {(eng, j): str(lb.plan.pods[f"srv-{j}"].ip) for eng, lb in self.labs.items()
                    for j in self.node_of.values()}
        ctx.run.update_manifest(labs={eng: lb.name for eng, lb in self.labs.items()},
                                compile_seconds={f"{e}/n{j}": getattr(x, "compile_seconds", None)
                                                 for (e, j), x in self.engines.items()})

    def _table(self, eng: str, j: int, pols: list[PolicySpec]):
        lb = self.labs[eng]
        return compile_table(lb.spec, f"n{j}", lb.plan, policies=pols)

    def teardown(self, ctx: core.RunContext) -> None:
        for eng, lb in getattr(self, "labs", {}).items():
            try:
                for (e, _), engine in self.engines.items():
                    if e == eng:
                        engine.cleanup()
            finally:
                labmod.down(lb.name)

    def measure(self, ctx: core.RunContext) -> None:
        p: PolicyScaleParams = ctx.params
        rng = random.Random(p.seed)
        total = p.repeats * len(p.datapaths) * len(self.node_of) * len(p.metrics) * p.samples
        bar = tqdm(total=total, desc="policy-scale", unit="sample", unit_scale=True, disable=not ctx.progress)
        try:
            with all_cpus():  # nothing is measured meanwhile: load as this machine can
                for (n, pos), j in self.node_of.items():
                    self._load(ctx, n, pos, j, timed=pos == p.positions[0])
            points = [self._point(eng, n, pos, rep, metric) for rep in range(1, p.repeats + 1)
                      for eng in rng.sample(p.datapaths, len(p.datapaths))
                      for n, pos in self.node_of for metric in p.metrics]
            bar.update(sum(core.point_key(pt.full) in ctx.done for pt in points) * p.samples)
            core.measure_interleaved(ctx, points, p.samples, p.warmup, p.size, p.burst,
                                     rng=random.Random(f"{p.seed}-all"), on_samples=bar.update)
            with all_cpus():
                for n in p.services:
                    self._updates(ctx, n, self.node_of[n, p.positions[0]])
        finally:
            bar.close()

    def _row(self, eng: str, n: int, **kw) -> dict:
        return {"experiment": self.name, "datapath": eng, "mode": self.mode, "services": n, **kw}

    @property
    def mode(self) -> str:
        return next(iter(self.labs.values())).spec.nodes[0].pods[0].mode

    def _load(self, ctx: core.RunContext, n: int, pos: str, j: int, timed: bool) -> None:
        p: PolicyScaleParams = ctx.params
        pols = policies(n, p.rules, pos, j)
        for eng in p.datapaths:
            engine = self.engines[eng, j]
            engine.sync(self._table(eng, j, []))  # flush, so that the load below is a whole table
            table = self._table(eng, j, pols)
            t0 = time.perf_counter()
            engine.sync(table)
            took = time.perf_counter() - t0
            row = self._row(eng, n, position="", repeat=0)
            if timed and core.point_key({**row, "metric": "load"}) not in ctx.done:
                core.record_value(ctx, row, "load", took)

    def _point(self, eng, n, pos, rep, metric) -> core.LatencyPoint:
        j = self.node_of[n, pos]
        netns, cgroup = self.clients[eng, j]
        return core.LatencyPoint(self._row(eng, n, position=pos, repeat=rep), metric, netns, cgroup,
                                 self.srv[eng, j], SERVER_PORT)

    def _updates(self, ctx: core.RunContext, n: int, j: int) -> None:
        """One more bulk policy (before ``allow-cli``) ``updates`` times, on node ``j`` (its
        measurement is over)."""
        p: PolicyScaleParams = ctx.params
        if n == 0:
            return
        base = policies(n, p.rules, "last", j)
        for eng in p.datapaths:
            engine = self.engines[eng, j]
            engine.sync(self._table(eng, j, base))
            current = list(base)
            for k in range(1, p.updates + 1):
                extra = expand([PolicySpec("extra", {"app": f"srv-{j}"}, ("Ingress",), count=k, rules=p.rules,
                                           peer_cidr="100.127.0.0/16")])[-1]
                current.insert(len(current) - 1, extra)  # a new policy before allow-cli
                table = self._table(eng, j, current)
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
