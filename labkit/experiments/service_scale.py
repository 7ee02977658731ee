"""``service-scale``: Service latency versus the number of services, per datapath (the seed's chart).

One small lab per datapath (``ss<run>-<datapath>``). On the netns backend every N of the sweep has a
node of its own in it (``n0``, ``n1``, …: a client pod ``cli-<i>`` and three backend pods
``be-<i>-<k>``, the node's datapath loaded with N services), so all the tables exist at once: each
node's table is loaded (timed: ``load``); then every point of the sweep — each datapath, N, position
and repeat — is measured together, finely interleaved
(:func:`labkit.experiments.core.measure_interleaved`): this machine's speed changes in steps every few
tenths of a second and, for minutes at a time, by up to ~20 %, so points measured at different times
are not comparable; interleaved, every point sees the same mix. Points are TCP_CRR to the service at
each position of the table (``first``, ``middle``, ``last``, ``random``) and to a backend directly
(``pod``, the no-Service floor); finally one service is added ``updates`` times at each N (timed:
``update``). CRR is the metric that shows the table: a Service rule is walked on a connection's first
packet only (established connections are flat; add ``rr`` to ``metrics`` to see it).

On the vagrant backend a node is a VM, so each datapath's lab has one node and the Ns take turns in
it (``together=False``): flushed and loaded per N, the points of one N measured together.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, replace

from tqdm.auto import tqdm

from .. import lab as labmod
from ..backends import get_backend
from ..measure.cpus import all_cpus, wait_quiet
from ..services import Endpoint, ServicePort, ServiceTable, TableDiff
from .. import modes as podmodes
from ..spec import parse_spec
from . import core
from .params import Params, param

DEFAULT_DATAPATHS = ("iptables-legacy", "iptables-nft", "nftables", "ebpf", "ebpf-tc")
POSITIONS = ("first", "middle", "last", "random", "pod", "kube-proxy-order")
LATENCY = ("crr", "rr")
RATES = {"crr-rate": "crr", "rr-rate": "rr", "udp-rr-rate": "udp_rr"}  # metric -> lkclient mode
METRICS = (*LATENCY, *RATES)
WORKLOADS = ("labkit", "http")
KUBE_PROXY = ("current", "1.18")
SHORT = {"iptables-legacy": "iptl", "iptables-nft": "iptn", "nftables": "nft", "ebpf": "ebpf",
         "ebpf-tc": "ebpftc", "ipvs": "ipvs", "none": "none"}
BACKENDS = 3


def _datapath_names() -> list[str]:
    from ..datapath import DATAPATHS

    return DATAPATHS.names()


def _backend_names() -> list[str]:
    from ..backends import BACKENDS

    return BACKENDS.names()


def _mode_names() -> list[str]:
    return podmodes.names()


@dataclass
class ServiceScaleParams(Params):
    experiment = "service-scale"
    datapaths: list[str] = param(default_factory=lambda: list(DEFAULT_DATAPATHS), choices=_datapath_names,
                                 help="the Service datapaths to compare")
    services: list[int] = param(default_factory=lambda: [1, 1000, 5000, 10000, 20000], min=1, max=65536,
                                help="numbers of services")
    positions: list[str] = param(default_factory=lambda: ["first", "middle", "last", "random", "pod"],
                                 choices=POSITIONS, help="which service each point connects to (pod: straight to a "
                                 "backend, the no-Service floor; kube-proxy-order: wherever kube-proxy's map order "
                                 "put it)")
    metrics: list[str] = param(default_factory=lambda: ["crr"], choices=METRICS,
                               help="latency (crr, rr: one transaction at a time) and rates under load "
                                    "(crr-rate, rr-rate, udp-rr-rate: --concurrency at once)")
    repeats: int = param(3, min=1, max=100, help="repeats of every point, interleaved")
    samples: int = param(5000, min=10, help="latency samples per point")
    warmup: int = param(300, min=0, help="warm-up attempts per client before measuring")
    size: int = param(64, min=1, max=65536, help="payload bytes each way")
    burst: int = param(20, min=1, help="latency samples per point per turn (every point is measured interleaved)")
    updates: int = param(3, min=0, max=100, help="one-service additions timed at each N")
    mode: str = param("veth", choices=_mode_names, help="pod network mode of the experiment's pods")
    seed: int = param(1, help="random choices (orders, random positions) of the run")
    backend: str = param("netns", choices=_backend_names,
                         help="where each datapath's lab runs: netns, or vagrant (one VM per datapath)")
    # every N loaded at once (a node per N) and the whole sweep measured interleaved; None: yes on
    # netns, no on vagrant (a node is a VM there: the Ns take turns in one node)
    together: bool | None = param(None, help="every N in a node of its own, all measured together "
                                             "(unset: yes on netns, no on vagrant)")
    concurrency: int = param(16, min=1, max=1024, help="connections (flows) at once for the rate metrics")
    rate_seconds: float = param(2.0, min=0.2, max=600, help="measured time per rate point, in windows "
                                                           "interleaved with the other points")
    window_ms: int = param(200, min=20, max=10000, help="a rate point's window per turn")
    workload: str = param("labkit", choices=WORKLOADS,
                          help="what serves in backend pods: labkit's echo server, or http (nginx; wrk measures "
                               "requests/s beside labkit's own rate)")
    kube_proxy: str = param("current", choices=KUBE_PROXY,
                            help="the iptables datapaths' rule shape: current kube-proxy, or 1.18 (the study's "
                                 "time: two KUBE-SERVICES rules per service)")

    @property
    def all_at_once(self) -> bool:
        return self.backend == "netns" if self.together is None else self.together

    @classmethod
    def quick(cls) -> ServiceScaleParams:
        """≤ 3 minutes here: the README's and CI's run."""
        return cls(services=[1, 1000, 5000], positions=["first", "last", "pod"], samples=2000, warmup=200)

    def checks(self) -> list[str]:
        problems = []
        if self.burst > self.samples:
            problems.append(f"burst: must be at most samples ({self.samples}); 20 is a good value")
        if self.together and self.backend == "vagrant":
            problems.append("together: on the vagrant backend a node per N would be a VM per N; leave it unset "
                            "(the Ns then take turns in one VM per datapath)")
        if self.workload == "http" and self.backend != "netns":
            problems.append("workload: http runs on the netns backend only (the VM box has no nginx)")
        if self.window_ms / 1000 > self.rate_seconds:
            problems.append(f"window_ms: {self.window_ms} ms is longer than rate_seconds ({self.rate_seconds} s)")
        return problems


def lab_spec(datapath: str, mode: str, tag: str = "", backend: str = "netns", nodes: int = 1,
             workload: str = "labkit") -> dict:
    """The lab of one datapath: ``nodes`` nodes ``n<i>``, each with a client ``cli-<i>`` and backends
    ``be-<i>-<k>`` (serving the http workload too with ``workload="http"``); ``tag`` (from the run id)
    keeps concurrent runs' labs apart."""
    enis = podmodes.enis_needed([mode] * (1 + BACKENDS))
    server = {"server": {"kind": "http", "port": HTTP.target}} if workload == "http" else {}
    return {"name": f"ss{tag}-{SHORT.get(datapath, datapath)}", "backend": backend, "datapath": "none",
            "nodes": [{"name": f"n{i}", "enis": enis, "pods": [{"name": f"cli-{i}", "mode": mode}] + [
                {"name": f"be-{i}-{k}", "mode": mode, "labels": {"app": "backend"}, **server}
                for k in range(BACKENDS)]} for i in range(nodes)]}


@dataclass(frozen=True)
class BulkPort:
    """One port every bulk service has: the ServicePort's name, protocol, port and target port."""

    name: str
    protocol: str
    port: int
    target: int


ECHO = BulkPort("", "TCP", 80, 8080)  # labkit's echo server (the only port unless more are needed)
HTTP = BulkPort("http", "TCP", 8081, 8081)  # the http workload's nginx (--workload http)
UDP = BulkPort("udp", "UDP", 80, 8080)  # labkit's echo server over UDP (udp-rr-rate)


def bulk_ports(workload: str = "labkit", metrics=()) -> tuple[BulkPort, ...]:
    """The ports every bulk service has: labkit's echo port, and the http workload's and a UDP one
    when the run needs them (each adds a rule per service: the manifest records them)."""
    extra = ((HTTP,) if workload == "http" else ()) + ((UDP,) if "udp-rr-rate" in metrics else ())
    return (ECHO,) if not extra else (replace(ECHO, name="echo"), *extra)


def bulk_service(endpoints: tuple[Endpoint, ...], k: int, service_cidr: str = "10.96.0.0/12",
                 port: BulkPort = ECHO) -> ServicePort:
    """Port ``port`` of service ``svc-k`` with ``endpoints`` (their port set to its target); ClusterIPs
    in order from the CIDR's 10th address."""
    base = int(ipaddress.IPv4Network(service_cidr).network_address) + 10
    eps = tuple(Endpoint(e.ip, port.target, e.pod, e.node) for e in endpoints)
    return ServicePort("scale", f"svc-{k}", port.name, port.protocol, str(ipaddress.IPv4Address(base + k)),
                       port.port, eps)


def bulk_table(endpoints: tuple[Endpoint, ...], n: int, service_cidr: str = "10.96.0.0/12",
               ports: tuple[BulkPort, ...] = (ECHO,)) -> ServiceTable:
    """N services ``svc-0 … svc-(N-1)`` with the same endpoints, each with ``ports``."""
    return ServiceTable.of(bulk_service(endpoints, k, service_cidr, port) for k in range(n) for port in ports)


def port_key(k: int, port: BulkPort) -> str:
    """The key of port ``port`` of ``svc-k`` in a bulk table."""
    return f"scale/svc-{k}" + (f":{port.name}" if port.name else "")


class ServiceScale:
    name = "service-scale"

    def setup(self, ctx: core.RunContext) -> None:
        p: ServiceScaleParams = ctx.params
        p.validate()
        self.mode = p.mode
        # N -> index of the node whose table holds N services (all 0 when the Ns take turns)
        self.node_of = {n: (i if p.all_at_once else 0) for i, n in enumerate(p.services)}
        nodes = len(p.services) if p.all_at_once else 1
        for dp in p.datapaths:  # the backend checks what it can before any lab exists
            get_backend(p.backend).preflight(parse_spec({**lab_spec(dp, p.mode, "", p.backend, nodes), "datapath": dp}))
        self.labs, self.paths, self.clients = {}, {}, {}
        for dp in tqdm(p.datapaths, desc="labs", disable=not ctx.progress, leave=False):
            spec = parse_spec(lab_spec(dp, p.mode, ctx.run.run_id[-4:], p.backend, nodes))
            labmod.down(spec.name)  # left by this run when it was killed (resume)
            lb = self.labs[dp] = labmod.up(spec, progress=False)
            for i in range(nodes):
                self.paths[dp, i] = lb.datapath(f"n{i}", dp)  # on the vagrant backend it runs in the VM
                self.clients[dp, i] = (lb.pod_netns(f"cli-{i}"), lb.backend.pod_cgroup(lb.spec, f"cli-{i}"))
        first = next(iter(self.labs.values()))
        self.endpoints = [tuple(Endpoint(str(first.plan.pods[f"be-{i}-{k}"].ip), 8080, f"be-{i}-{k}")
                                for k in range(BACKENDS)) for i in range(nodes)]
        # the kernel each datapath ran on (the VM's on the vagrant backend; `machine` is this host)
        ctx.run.update_manifest(labs={dp: lb.name for dp, lb in self.labs.items()}, backend=p.backend,
                                together=p.all_at_once,
                                node_kernels={dp: lb.kernels() for dp, lb in self.labs.items()})

    def teardown(self, ctx: core.RunContext) -> None:
        for lb in getattr(self, "labs", {}).values():
            labmod.down(lb.name)  # the datapath lives in the lab's node namespace: it goes with it

    def measure(self, ctx: core.RunContext) -> None:
        p: ServiceScaleParams = ctx.params
        rng = random.Random(p.seed)
        tables = {n: bulk_table(self.endpoints[self.node_of[n]], n) for n in p.services}
        picks = {n: {"first": 0, "middle": n // 2, "last": n - 1, "random": rng.randrange(n)} for n in p.services}
        per_n = p.repeats * len(p.datapaths) * len(p.positions) * len(p.metrics) * p.samples
        bar = tqdm(total=per_n * len(p.services), desc="service-scale", unit="sample", unit_scale=True,
                   disable=not ctx.progress)
        # together: one turn with every N; else a turn per N, flushed and loaded in the same node
        turns = [list(p.services)] if p.all_at_once else [[n] for n in p.services]
        try:
            for ns in turns:
                with all_cpus():  # nothing is measured meanwhile: load as this machine can
                    for n in ns:
                        self._load(ctx, n, tables[n])
                self._settle(ctx, ns)
                points = [self._point(dp, n, tables[n], picks[n], pos, rep, metric)
                          for rep in range(1, p.repeats + 1)
                          for dp in rng.sample(p.datapaths, len(p.datapaths))
                          for n in ns for pos in p.positions for metric in p.metrics]
                bar.update(sum(core.point_key(pt.full) in ctx.done for pt in points) * p.samples)
                seed = f"{p.seed}-{ns[0]}" if len(ns) == 1 else f"{p.seed}-all"
                core.measure_interleaved(ctx, points, p.samples, p.warmup, p.size, p.burst,
                                         rng=random.Random(seed), on_samples=bar.update)
                with all_cpus():
                    for n in ns:
                        self._updates(ctx, n, tables[n])
        finally:
            bar.close()

    def _row(self, dp: str, n: int, **kw) -> dict:
        return {"experiment": self.name, "datapath": dp, "mode": self.mode, "services": n, **kw}

    def _load(self, ctx: core.RunContext, n: int, table: ServiceTable) -> None:
        for dp in ctx.params.datapaths:
            path = self.paths[dp, self.node_of[n]]
            path.sync(ServiceTable())  # flush, so that the load below is a whole table
            took = path.sync(table).seconds  # the apply where it runs (in the VM: without the ssh trip)
            row = self._row(dp, n, position="", repeat=0)
            if core.point_key({**row, "metric": "load"}) not in ctx.done:
                core.record_value(ctx, row, "load", took)

    def _settle(self, ctx: core.RunContext, ns: list[int]) -> None:
        """Wait for the load CPUs to go idle after the loads (the kernel frees the old tables in
        the background for seconds); the wait is kept in the manifest (``settle_s``, by the Ns loaded)."""
        if not ctx.cpus.pinned:
            return
        waited = wait_quiet(ctx.cpus.load_cpus)
        settle = {**ctx.run.manifest().get("settle_s", {}), ",".join(map(str, ns)): round(waited, 2)}
        ctx.run.update_manifest(settle_s=settle)

    def _point(self, dp, n, table, picks, pos, rep, metric) -> core.LatencyPoint:
        index = picks.get(pos)
        node = self.node_of[n]
        row = self._row(dp, n, position=pos, repeat=rep, service_index="" if index is None else index)
        if pos == "pod":
            host, port = self.endpoints[node][0].ip, self.endpoints[node][0].port
        else:
            sp = table.at(index)
            host, port = sp.cluster_ip, sp.port
        netns, cgroup = self.clients[dp, node]
        return core.LatencyPoint(row, metric, netns, cgroup, host, port, self.labs[dp], f"cli-{node}")

    def _updates(self, ctx: core.RunContext, n: int, table: ServiceTable) -> None:
        p: ServiceScaleParams = ctx.params
        for dp in p.datapaths:
            path = self.paths[dp, self.node_of[n]]
            current = table
            for k in range(1, p.updates + 1):
                row = self._row(dp, n, position="", repeat=k)
                extra = bulk_service(self.endpoints[self.node_of[n]], n + k - 1)
                current = current.with_ports(extra)
                # the change is known, as kube-proxy's trackers know it
                took = path.sync_changes(current, TableDiff(added=(extra,))).seconds
                if core.point_key({**row, "metric": "update"}) not in ctx.done:
                    core.record_value(ctx, row, "update", took)


def run(params: ServiceScaleParams | None = None, resume: str | None = None, progress: bool = True,
        on_point=None):
    """Run the experiment; returns the :class:`labkit.results.Run`."""
    return core.execute(ServiceScale(), params or ServiceScaleParams(), resume=resume, progress=progress,
                        on_point=on_point)

