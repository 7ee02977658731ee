"""``service-scale``: Service latency and throughput versus the number of services, per datapath (the
seed's chart, in its own units too).

One small lab per datapath (``ss<run>-<datapath>``). On the netns backend every N of the sweep has a
node of its own in it (``n0``, ``n1``, …: a client pod ``cli-<i>`` and three backend pods
``be-<i>-<k>``, the node's datapath loaded with N services), so all the tables exist at once: each
node's table is loaded (timed: ``load``); then every point of the sweep — each datapath, N, position
and repeat — is measured together, finely interleaved
(:func:`labkit.experiments.core.measure_interleaved`): this machine's speed changes in steps every few
tenths of a second and, for minutes at a time, by up to ~20 %, so points measured at different times
are not comparable; interleaved, every point sees the same mix. Finally one service is added
``updates`` times at each N (timed: ``update``).

Positions: the service first, in the middle or last in the datapath's own lookup order (kube-proxy's
KUBE-SERVICES chain; the table's order where the lookup is a hash), a random one, ``kube-proxy-order``
(a service chosen once per N, wherever kube-proxy's Go map order put it at this load: the iptables datapaths then
write KUBE-SERVICES in that order, as a real kube-proxy does), and ``pod``: straight to a backend,
no Service (for kube-proxy iptables not a floor: a connection to a pod address walks the whole
KUBE-SERVICES chain and matches nothing). Every point records what its new connection walks
(``rules_walked``, ``nat_rules``, ``set_elements``, ``map_entries``): the study's "50,000 rules"
sit on that axis, not on the services axis.

Metrics: ``crr`` and ``rr`` (one transaction at a time: latency; a Service rule is walked on a
connection's first packet only, so CRR shows the table), and the rates under load the study charts
(``crr-rate``, ``rr-rate``, ``udp-rr-rate``: ``concurrency`` transactions at once,
:func:`labkit.experiments.core.measure_rates_interleaved`; transactions/s and CPU µs per transaction).
``workload="http"``: backends also run nginx and wrk measures requests/s through the same tables
(``http-crr-rate`` with ``Connection: close``, ``http-rr-rate`` with keep-alive). ``kube_proxy="1.18"``:
the iptables datapaths write the study's time's rules (two per service in KUBE-SERVICES).

On the vagrant backend a node is a VM, so each datapath's lab has one node and the Ns take turns in
it (``together=False``): flushed and loaded per N, the points of one N measured together.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from .. import lab as labmod
from ..backends import get_backend
from ..measure.cpus import all_cpus, wait_quiet
from ..services import Endpoint, ServicePort, ServiceTable, TableDiff
from .. import modes as podmodes
from ..spec import parse_spec
from . import core
from .inventory import inventory_problems, lab_inventory
from .params import Params, estimate, param

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
                         help="where each datapath's lab runs: netns, vagrant (one VM per datapath), or hosts "
                              "(one host of --inventory per datapath)")
    inventory: str | None = param(None, help="backend hosts: an inventory file (README, 'Run it on your own "
                                             "machines'); datapath k's lab runs on its k-th host")
    # every N loaded at once (a node per N) and the whole sweep measured interleaved; None: yes on
    # netns, no on vagrant (a node is a VM there: the Ns take turns in one node)
    together: bool | None = param(None, help="every N in a node of its own, all measured together "
                                             "(unset: yes on netns, no on vagrant)")
    concurrency: int = param(16, min=1, max=1024, help="connections (flows) at once for the rate metrics")
    rate_seconds: float = param(3.0, min=0.2, max=600, help="measured time per rate point, in windows "
                                                           "interleaved with the other points")
    window_ms: int = param(100, min=20, max=10000, help="a rate point's window per turn")
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

    def estimate(self) -> dict:
        grid = len(self.datapaths) * len(self.services) * len(self.positions) * self.repeats
        points = {m: grid for m in self.metrics}
        if self.workload == "http":
            points |= {"http-crr-rate": grid, "http-rr-rate": grid}
        nodes = len(self.services) if self.all_at_once else 1
        labs = [{"name": f"ss<run>-{SHORT.get(dp, dp)}", "nodes": nodes, "pods": nodes * (1 + BACKENDS)}
                for dp in self.datapaths]
        return estimate(points, self.samples, self.rate_seconds, self.backend, labs,
                        table_loads=len(self.datapaths) * sum(self.services) * (1 + self.updates))

    def checks(self) -> list[str]:
        problems = []
        if self.burst > self.samples:
            problems.append(f"burst: must be at most samples ({self.samples}); 20 is a good value")
        if self.together and self.backend in ("vagrant", "hosts"):
            problems.append(f"together: on the {self.backend} backend a node per N would be a machine per N; leave "
                            "it unset (the Ns then take turns in one machine per datapath)")
        problems += inventory_problems(self.backend, self.inventory, len(self.datapaths),
                                       f"{len(self.datapaths)} datapaths (one lab per host)")
        if self.workload == "http" and self.backend != "netns":
            problems.append("workload: http runs on the netns backend only (the VM box has no nginx)")
        if self.window_ms / 1000 > self.rate_seconds:
            problems.append(f"window_ms: {self.window_ms} ms is longer than rate_seconds ({self.rate_seconds} s)")
        return problems


def lab_spec(datapath: str, mode: str, tag: str = "", backend: str = "netns", nodes: int = 1,
             workload: str = "labkit", inventory: dict | None = None) -> dict:
    """The lab of one datapath: ``nodes`` nodes ``n<i>``, each with a client ``cli-<i>`` and backends
    ``be-<i>-<k>`` (serving the http workload too with ``workload="http"``); ``tag`` (from the run id)
    keeps concurrent runs' labs apart. ``inventory``: backend hosts' (one node)."""
    enis = podmodes.enis_needed([mode] * (1 + BACKENDS))
    server = {"server": {"kind": "http", "port": HTTP.target}} if workload == "http" else {}
    return {"name": f"ss{tag}-{SHORT.get(datapath, datapath)}", "backend": backend, "datapath": "none",
            **({"inventory": inventory} if inventory is not None else {}),
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
        self.ports = bulk_ports(p.workload, p.metrics)
        # N -> index of the node whose table holds N services (all 0 when the Ns take turns)
        self.node_of = {n: (i if p.all_at_once else 0) for i, n in enumerate(p.services)}
        nodes = len(p.services) if p.all_at_once else 1
        enis = podmodes.enis_needed([p.mode] * (1 + BACKENDS))
        inventories = {dp: lab_inventory(p.inventory, {"n0": enis}, first=k) if p.inventory else None
                       for k, dp in enumerate(p.datapaths)}
        for dp in p.datapaths:  # the backend checks what it can before any lab exists
            get_backend(p.backend).preflight(parse_spec({**lab_spec(dp, p.mode, "", p.backend, nodes, p.workload,
                                                                    inventories[dp]), "datapath": dp}))
        # kube-proxy's own order (a Go map's) where a datapath has a choice; the table's order else
        options = {"kube_proxy": p.kube_proxy, "order_seed": p.seed,
                   "order": "go-map" if "kube-proxy-order" in p.positions else "install"}
        self.labs, self.paths = {}, {}
        for dp in tqdm(p.datapaths, desc="labs", disable=not ctx.progress, leave=False):
            spec = parse_spec(lab_spec(dp, p.mode, ctx.run.run_id[-4:], p.backend, nodes, p.workload,
                                       inventories[dp]))
            labmod.down(spec.name)  # left by this run when it was killed (resume)
            lb = self.labs[dp] = labmod.up(spec, progress=False)
            for i in range(nodes):
                self.paths[dp, i] = lb.datapath(f"n{i}", dp, **options)  # on the vagrant backend it runs in the VM
        first = next(iter(self.labs.values()))
        self.endpoints = [tuple(Endpoint(str(first.plan.pods[f"be-{i}-{k}"].ip), ECHO.target, f"be-{i}-{k}")
                                for k in range(BACKENDS)) for i in range(nodes)]
        # the kernel each datapath ran on (the VM's on the vagrant backend; `machine` is this host)
        ctx.run.update_manifest(labs={dp: lb.name for dp, lb in self.labs.items()}, backend=p.backend,
                                together=p.all_at_once, service_ports=[vars(x) for x in self.ports],
                                node_kernels={dp: lb.kernels() for dp, lb in self.labs.items()})
        if p.backend == "hosts":  # each host's facts and performance preflight (labkit.hostfacts)
            from ..state import LabState

            ctx.run.update_manifest(hosts={dp: LabState(lb.name).meta().get("hosts") for dp, lb in self.labs.items()})

    def teardown(self, ctx: core.RunContext) -> None:
        for lb in getattr(self, "labs", {}).values():
            labmod.down(lb.name)  # the datapath lives in the lab's node namespace: it goes with it

    def measure(self, ctx: core.RunContext) -> None:
        """Per turn (all Ns at once, or one N at a time): load the tables, then every latency point
        interleaved, then every rate point interleaved, then wrk's (--workload http), then the
        one-service updates."""
        p: ServiceScaleParams = ctx.params
        rng = random.Random(p.seed)
        tables = {n: bulk_table(self.endpoints[self.node_of[n]], n, ports=self.ports) for n in p.services}
        # the service each (N, random / repeat of kube-proxy-order) point connects to: the same for
        # every datapath (first, middle and last are places in each datapath's own lookup order)
        self.random_pick = {n: rng.randrange(n) for n in p.services}
        # kube-proxy-order: one service per N, wherever this load's Go map order put it (the repeats
        # measure the same place: their spread is the machine's, not the order's)
        self.kp_pick = {n: rng.randrange(n) for n in p.services}
        latency = [m for m in p.metrics if m in LATENCY]
        rates = [m for m in p.metrics if m in RATES]
        wrk = ["http-crr-rate", "http-rr-rate"] if p.workload == "http" else []
        per_point = len(latency) * p.samples + len(rates) * p.rate_seconds * 10000 + len(wrk) * p.rate_seconds * 10000
        total = p.repeats * len(p.datapaths) * len(p.positions) * per_point * len(p.services)
        bar = tqdm(total=total, desc="service-scale", unit="sample", unit_scale=True, disable=not ctx.progress)
        # together: one turn with every N; else a turn per N, flushed and loaded in the same node
        turns = [list(p.services)] if p.all_at_once else [[n] for n in p.services]
        try:
            for ns in turns:
                with ctx.phase("load"), all_cpus():  # nothing is measured meanwhile: load as this machine can
                    for n in ns:
                        self._load(ctx, n, tables[n])
                with ctx.phase("settle"):
                    self._settle(ctx, ns)
                seed = f"{p.seed}-{ns[0]}" if len(ns) == 1 else f"{p.seed}-all"
                grid = [(rep, dp, n, pos) for rep in range(1, p.repeats + 1)
                        for dp in rng.sample(p.datapaths, len(p.datapaths)) for n in ns for pos in p.positions]
                if latency:
                    points = [self._point(dp, n, pos, rep, m) for rep, dp, n, pos in grid for m in latency]
                    bar.update(sum(core.point_key(pt.full) in ctx.done for pt in points) * p.samples)
                    with ctx.phase("latency"):
                        core.measure_interleaved(ctx, points, p.samples, p.warmup, p.size, p.burst,
                                                 rng=random.Random(seed), on_samples=bar.update)
                if rates:
                    points = [self._rate_point(dp, n, pos, rep, m) for rep, dp, n, pos in grid for m in rates]
                    with ctx.phase("rates"):
                        core.measure_rates_interleaved(ctx, points, p.rate_seconds, p.window_ms, p.concurrency,
                                                       p.size, rng=random.Random(f"{seed}-rates"),
                                                       on_window=lambda k: bar.update(k * p.window_ms * 10))
                if wrk:
                    points = [self._wrk_point(dp, n, pos, rep, m) for rep, dp, n, pos in grid for m in wrk]
                    with ctx.phase("wrk"):
                        core.measure_wrk_interleaved(ctx, points, p.rate_seconds, p.concurrency,
                                                     rng=random.Random(f"{seed}-wrk"),
                                                     on_run=lambda k: bar.update(k * 10000))
                with ctx.phase("updates"), all_cpus():
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
        self._orders = getattr(self, "_orders", {})
        for dp in ctx.params.datapaths:  # where each service sits in each datapath's lookup, this load
            echo = {port_key(k, self.ports[0]): k for k in range(n)}
            self._orders[dp, n] = [echo[key] for key in self.paths[dp, self.node_of[n]].chain_order() if key in echo]

    def _settle(self, ctx: core.RunContext, ns: list[int]) -> None:
        """Wait for the load CPUs to go idle after the loads (the kernel frees the old tables in
        the background for seconds); the wait is kept in the manifest (``settle_s``, by the Ns loaded)."""
        if not ctx.cpus.pinned:
            return
        waited = wait_quiet(ctx.cpus.load_cpus)
        settle = {**ctx.run.manifest().get("settle_s", {}), ",".join(map(str, ns)): round(waited, 2)}
        ctx.run.update_manifest(settle_s=settle)

    def _target(self, dp: str, n: int, pos: str, rep: int, port: BulkPort) -> tuple[dict, str, int]:
        """A point's row (its service and what a new connection walks to reach it) and its target."""
        node = self.node_of[n]
        if pos == "pod":  # straight to a backend (kube-proxy's chain is walked all the same: no rule matches)
            row = self._row(dp, n, position=pos, repeat=rep, service_index="", **self.paths[dp, node].walk(None))
            return row, self.endpoints[node][0].ip, port.target
        order = self._orders[dp, n]
        k = {"first": order[0], "middle": order[len(order) // 2], "last": order[-1],
             "random": self.random_pick[n]}.get(pos)
        if k is None:  # kube-proxy-order: the N's service, wherever the datapath's order put it
            k = self.kp_pick[n]
        key = port_key(k, port)
        sp = bulk_service(self.endpoints[node], k, port=port)
        walk = self.paths[dp, node].walk(key)
        return self._row(dp, n, position=pos, repeat=rep, service_index=k, **walk), sp.cluster_ip, sp.port

    def _point(self, dp, n, pos, rep, metric) -> core.LatencyPoint:
        row, host, port = self._target(dp, n, pos, rep, self.ports[0])
        lb, pod = self.labs[dp], f"cli-{self.node_of[n]}"
        return core.LatencyPoint(row, metric, lb.pod_netns(pod), lb.backend.pod_cgroup(lb.spec, pod), host, port,
                                 lb, pod)

    def _rate_point(self, dp, n, pos, rep, metric) -> core.RatePoint:
        port = UDP if RATES[metric] == "udp_rr" else self.ports[0]
        row, host, port_number = self._target(dp, n, pos, rep, port)
        return core.RatePoint(row, metric, RATES[metric], host, port_number, self.labs[dp], f"cli-{self.node_of[n]}")

    def _wrk_point(self, dp, n, pos, rep, metric) -> core.WrkPoint:
        row, host, port = self._target(dp, n, pos, rep, HTTP)
        return core.WrkPoint(row, metric, f"http://{host}:{port}/", metric == "http-crr-rate", self.labs[dp],
                             f"cli-{self.node_of[n]}")

    def _updates(self, ctx: core.RunContext, n: int, table: ServiceTable) -> None:
        p: ServiceScaleParams = ctx.params
        for dp in p.datapaths:
            path = self.paths[dp, self.node_of[n]]
            current = table
            for k in range(1, p.updates + 1):
                row = self._row(dp, n, position="", repeat=k)
                extra = [bulk_service(self.endpoints[self.node_of[n]], n + k - 1, port=port) for port in self.ports]
                current = current.with_ports(*extra)
                # the change is known, as kube-proxy's trackers know it
                took = path.sync_changes(current, TableDiff(added=tuple(extra))).seconds
                if core.point_key({**row, "metric": "update"}) not in ctx.done:
                    core.record_value(ctx, row, "update", took)


def run(params: ServiceScaleParams | None = None, resume: str | None = None, progress: bool = True,
        on_point=None):
    """Run the experiment; returns the :class:`labkit.results.Run`."""
    return core.execute(ServiceScale(), params or ServiceScaleParams(), resume=resume, progress=progress,
                        on_point=on_point)

