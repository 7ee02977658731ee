"""``pod-modes``: the Alibaba chart again — each pod network mode, same node and across nodes.

One lab: for every mode, a client pod and a server pod on node 1 and a server pod on node 2, all in
that mode (``c-<m>``, ``s-<m>``, ``r-<m>``). TCP_CRR, TCP_RR and UDP_RR with the C client, to the
server on the same node (``position=same-node``) and on the other node (``cross-node``): every such
point of every repeat is measured interleaved with all the others; then bandwidth with iperf3
(JSON output), modes in a fresh random order per repeat.
Modes the kernel lacks (``eni-ipvlan`` here) are refused up front with the doctor's message.

Besides the pod modes, three *variants* (the ``mode`` column of points.csv names each row's):
``host-network``, the baseline with no pod at all (the client in node 1's own namespace, an
``lkserver`` in node 1's and node 2's: node to node over the same VPC router),
``<mode>+bpf-hr`` for the routed-veth modes (``veth+bpf-hr``, ``eni-policy-route+bpf-hr``): pods of
that mode whose node forwards them with eBPF host routing (:class:`labkit.hostrouting.BpfHostRouting`,
synced for those pods only, so that ``veth`` beside it keeps the node's kernel routing in the same
lab), and ``<mode>+ebpf-tc`` for every mode the ``ebpf-tc`` Service datapath attaches on (Terway's
IPVLAN pods with Cilium's tc programs on the pod's own slave device, ``veth+ebpf-tc`` …): pods of that
mode whose client reaches each server *through a ClusterIP Service* whose only endpoint is that server,
load-balanced by :class:`labkit.datapath.ebpf.TcLB` attached to those pods only (:meth:`PodModes._service_lb`).
The first two are netns-only for now (on the VMs they are refused with the reason); ``+ebpf-tc``
runs on the VMs too (its datapath driven by each VM's agent), where ``eni-ipvlan+ebpf-tc`` is
Terway's IPVLAN with Cilium's programs on the slave.

``backend="vagrant"`` runs the same lab on two VMs (Debian's kernel: every mode, IPVLAN included);
clients and iperf3 run inside the VMs. Under QEMU TCG the figures are functional only (a TCG
round trip is ~1 ms); with KVM (or VirtualBox on a laptop) they are a real comparison.
``backend="hosts"`` runs it on the first two hosts of an ``inventory`` file (node1, node2: real
machines and their real network, each lending the NICs its ENIs need), the study's own setting.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import subprocess
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from .. import doctor
from .. import lab as labmod
from ..backends import get_backend
from ..errors import MeasurementError
from .. import modes as podmodes
from .. import naming
from ..errors import UsageError
from ..measure import loadgen
from ..modes.base import RoutedVeth
from ..node import SERVER_PORT, lab_cgroup
from ..spec import parse_spec
from . import core
from .inventory import host_entries, inventory_problems, lab_inventory, lab_nics
from .params import Params, estimate, param

HOST_NETWORK = "host-network"  # the baseline variant: node to node, no pod
BPF_HR = "+bpf-hr"  # suffix of a routed-veth mode's variant with eBPF host routing
EBPF_TC = "+ebpf-tc"  # suffix of a mode's variant whose clients go through ClusterIPs, load-balanced by ebpf-tc
SUFFIXES = (BPF_HR, EBPF_TC)
HOST_PORT = 9180  # the host-network baseline's lkserver in the nodes' own namespaces
SERVICE_PORT = 80  # a +ebpf-tc server's Service: ClusterIP:80 -> the server's lkserver (8080, TCP and UDP)
IPERF_PORT = 5201  # and ClusterIP:5201 -> its iperf3 (a third port of the same Service)
NETNS_ONLY = {HOST_NETWORK: "its client and servers run in the nodes' own namespaces on this machine",
              BPF_HR: "host routing for some pods of a lab is synced from this machine"}


def bpf_hr_modes() -> list[str]:
    """The modes eBPF host routing serves (routed veths: :func:`labkit.hostrouting.why_not`)."""
    return [m.name for m in podmodes.MODES if isinstance(m, RoutedVeth)]


def ebpf_tc_modes() -> list[str]:
    """The modes the ``ebpf-tc`` datapath load-balances (:meth:`labkit.modes.base.PodMode.served_by`:
    it attaches on a pod's node-side interface, or inside a pod without one on the pod's own)."""
    from ..datapath.ebpf import TcLB

    return [m.name for m in podmodes.MODES if m.served_by(TcLB)]


def variant_names() -> list[str]:
    """What ``--modes`` takes: the host-network baseline, every pod mode, and ``<mode>+bpf-hr`` and
    ``<mode>+ebpf-tc`` of every mode: :meth:`PodModesParams.checks` refuses those the variant cannot
    serve, naming the ones it can (a spelling hint would offer ``overlay+ebpf-tc`` for ``overlay+bpf-hr``)."""
    return [HOST_NETWORK, *podmodes.names(), *(m + s for s in SUFFIXES for m in podmodes.names())]


def suffix(variant: str) -> str:
    """A variant's suffix (``+bpf-hr``, ``+ebpf-tc``; ``""`` for a plain mode and host-network)."""
    return next((s for s in SUFFIXES if variant.endswith(s)), "")


def pod_mode(variant: str) -> str | None:
    """The pod mode of a variant (None for the host-network baseline)."""
    return None if variant == HOST_NETWORK else variant.removesuffix(suffix(variant))


def _box_lacks(release: str | None, features) -> list[str]:
    from ..backends.vagrant import box

    return box.box_for(box.BoxRecipe(release=release or box.DEFAULT_RELEASE)).lacks(features)


HOSTS_MODES = ("eni-exclusive", "eni-ipvlan", "eni-policy-route", "veth", "overlay")  # the study's chart


def default_modes(backend: str = "netns", release: str | None = None) -> list[str]:
    """Every mode the backend's kernel has (this machine's on netns; on the VMs, what the release's
    box kernel has: netkit with trixie), plus the variants the backend runs: on netns the
    host-network baseline and ``veth+bpf-hr`` (when this kernel can host-route); on the VMs
    ``eni-ipvlan+ebpf-tc`` (Terway's IPVLAN pods with Cilium's tc Service load balancing on the slave).
    On the hosts backend the study's five modes and ``eni-ipvlan+ebpf-tc`` (what a host's kernel lacks
    is refused by its preflight, naming the host)."""
    if backend == "netns":
        modes = [m.name for m in podmodes.MODES if all(doctor.has(f) for f in m.features)]
        from ..hostrouting import BpfHostRouting

        hr = ["veth" + BPF_HR] if "veth" in modes and all(doctor.has(f) for f in BpfHostRouting.features) else []
        return [HOST_NETWORK, *modes, *hr]
    if backend == "hosts":  # the hosts' kernels are not known before they are reached: the study's modes
        return [*HOSTS_MODES, "eni-ipvlan" + EBPF_TC]
    modes = [m.name for m in podmodes.MODES if not _box_lacks(release, m.features)]
    return [*modes, *(["eni-ipvlan" + EBPF_TC] if "eni-ipvlan" in modes else [])]


def short(mode: str) -> str:
    """Two or three letters naming a variant's pods (``c-<short>``): the mode's, ``h`` added for
    bpf-hr, ``t`` for ebpf-tc."""
    if mode == HOST_NETWORK:
        return "hn"  # no pod: its points name nodes
    return podmodes.get(pod_mode(mode)).short + {BPF_HR: "h", EBPF_TC: "t"}.get(suffix(mode), "")


def service_table(spec, plan, modes: list[str]):
    """The Services of the ``+ebpf-tc`` variants: one per server pod (``s-`` and ``r-``), in ``modes``
    order, its only endpoint that server, on ClusterIPs from ``service_cidr``'s 10th address on (the
    lab has no Services of its own): TCP and UDP :data:`SERVICE_PORT` to the lkserver's 8080, TCP
    :data:`IPERF_PORT` to iperf3's, as one Service of three ports. Built here rather than in the
    spec: a spec Service's target port gets an lkserver in every pod, which would take iperf3's."""
    from ..services import Endpoint, ServicePort, ServiceTable

    net = ipaddress.IPv4Network(spec.service_cidr)
    servers = [f"{r}-{short(m)}" for m in modes if m.endswith(EBPF_TC) for r in ("s", "r")]
    nodes = {p.name: n.name for n, p in spec.pods()}
    ports = []
    for k, pod in enumerate(servers):
        vip, ip = str(net.network_address + 10 + k), str(plan.pods[pod].ip)
        for port_name, proto, port, target in (("tcp", "TCP", SERVICE_PORT, SERVER_PORT),
                                               ("udp", "UDP", SERVICE_PORT, SERVER_PORT),
                                               ("iperf", "TCP", IPERF_PORT, IPERF_PORT)):
            ports.append(ServicePort("pod-modes", pod, port_name, proto, vip, port,
                                     (Endpoint(ip, target, pod, nodes[pod]),)))
    return ServiceTable.of(ports)


LATENCY = ("crr", "rr", "udp_rr")
RATES = {"crr-rate": "crr", "rr-rate": "rr", "udp-rr-rate": "udp_rr"}  # metric -> lkclient mode
METRICS = (*LATENCY, *RATES, "bandwidth")


def _backend_names() -> list[str]:
    from ..backends import BACKENDS

    return BACKENDS.names()


@dataclass
class PodModesParams(Params):
    experiment = "pod-modes"
    modes: list[str] = param(default_factory=default_modes, choices=variant_names,
                             help="the pod network modes to compare, and the variants host-network (node to "
                                  "node, no pod), <mode>+bpf-hr (eBPF host routing; veth, eni-policy-route) and "
                                  "<mode>+ebpf-tc (through a ClusterIP, ebpf-tc on those pods; any mode) "
                                  "(default: every mode the kernel has, with host-network and veth+bpf-hr here, "
                                  "eni-ipvlan+ebpf-tc on the VMs)")
    metrics: list[str] = param(default_factory=lambda: ["crr", "rr", "udp_rr", "bandwidth"], choices=METRICS,
                               help="latency (crr, rr, udp_rr), rates under load (crr-rate, rr-rate, "
                                    "udp-rr-rate) and iperf3 bandwidth")
    repeats: int = param(3, min=1, max=100, help="repeats of every point, interleaved")
    samples: int = param(5000, min=10, help="latency samples per point")
    warmup: int = param(300, min=0, help="warm-up attempts per client before measuring")
    size: int = param(64, min=1, max=65536, help="payload bytes each way")
    bandwidth_seconds: float = param(3.0, min=1, max=600, help="iperf3's test time per point")
    burst: int = param(20, min=1, help="latency samples per point per turn (every point is measured interleaved)")
    seed: int = param(1, help="random choices (orders) of the run")
    backend: str = param("netns", choices=_backend_names,
                         help="netns, vagrant (node1 and node2 are VMs) or hosts (the first two hosts of --inventory)")
    inventory: str | None = param(None, help="backend hosts: an inventory file (README, 'Run it on your own "
                                             "machines'); node1 runs on its first host, node2 on its second")
    concurrency: int = param(16, min=1, max=1024, help="connections (flows) at once for the rate metrics")
    rate_seconds: float = param(3.0, min=0.2, max=600, help="measured time per rate point, in windows "
                                                           "interleaved with the other points")
    window_ms: int = param(100, min=20, max=10000, help="a rate point's window per turn")
    release: str | None = param(None, choices=("bookworm", "trixie"),
                                help="vagrant backend: the VMs' Debian release (trixie for netkit)")

    @classmethod
    def quick(cls, backend: str = "netns") -> PodModesParams:
        """The short variant. On the VMs (QEMU TCG: every round trip ~1 ms, a connection ~2.5 ms)
        TCP_CRR and TCP_RR only, 400 samples a point, no bandwidth: what took 4.5 of 6.4 min there
        (latency), cut to fit 5 min with every mode, keeping the study's cross-node order."""
        if backend == "netns":
            return cls(repeats=3, samples=1000, warmup=100, bandwidth_seconds=1.0)
        if backend == "hosts":  # real machines: the netns run's sizes, the hosts' modes
            return cls(repeats=3, samples=1000, warmup=100, bandwidth_seconds=1.0, backend=backend,
                       modes=default_modes(backend))
        return cls(repeats=3, samples=400, warmup=30, metrics=["crr", "rr"], backend=backend,
                   modes=default_modes(backend))

    def estimate(self) -> dict:
        grid = len(self.modes) * 2 * self.repeats
        points = {m: grid for m in self.metrics if m != "bandwidth"}
        extra = grid * (self.bandwidth_seconds + 1) if "bandwidth" in self.metrics else 0
        if "bandwidth" in self.metrics:
            points["bandwidth"] = grid
        labs = [{"name": "pm<run>", "nodes": 2, "pods": 3 * len(self.modes)}]
        return estimate(points, self.samples, self.rate_seconds, self.backend, labs, extra_seconds=extra)

    def checks(self) -> list[str]:
        problems = []
        if self.burst > self.samples:
            problems.append(f"burst: must be at most samples ({self.samples}); 20 is a good value")
        if self.window_ms / 1000 > self.rate_seconds:
            problems.append(f"window_ms: {self.window_ms} ms is longer than rate_seconds ({self.rate_seconds} s)")
        for mode in self.modes:
            if mode.endswith(BPF_HR) and pod_mode(mode) not in bpf_hr_modes():
                problems.append(f"modes: {mode}: eBPF host routing serves routed-veth pods only; use one of "
                                f"{', '.join(m + BPF_HR for m in bpf_hr_modes())}")
            if mode.endswith(EBPF_TC) and pod_mode(mode) not in ebpf_tc_modes():
                problems.append(f"modes: {mode}: the ebpf-tc datapath does not see {pod_mode(mode)} pods' ClusterIP "
                                f"traffic; use one of {', '.join(m + EBPF_TC for m in ebpf_tc_modes())}")
            why = NETNS_ONLY.get(HOST_NETWORK if mode == HOST_NETWORK else suffix(mode))
            if why and self.backend != "netns":
                problems.append(f"modes: {mode} runs on the netns backend only ({why}); leave it out of "
                                f"--modes with --backend {self.backend}")
        if self.release is not None and self.backend != "vagrant":
            whose = "this machine's" if self.backend == "netns" else "the hosts' own"
            problems.append(f"release: the {self.backend} backend runs on {whose} kernel; give --release with "
                            "--backend vagrant only")
        inventory = inventory_problems(self.backend, self.inventory, 2, "node1 and node2")
        if self.inventory is not None and not inventory:
            inventory = self._nic_problems()
        return problems + inventory

    def _nic_problems(self) -> list[str]:
        """The ENIs the modes need per node against the NICs the inventory's first two hosts lend."""
        out = []
        nodes = lab_spec(self.modes)["nodes"]
        for node, (host, entry) in zip(nodes, host_entries(self.inventory)):
            lent = set((entry.get("nics") or {}) if isinstance(entry, dict) else ())
            needed = lab_nics(node["enis"])
            missing = [n for n in needed if n not in lent]
            if missing:
                out.append(f"inventory: these modes need NICs {', '.join(needed)} on {node['name']}, and its host "
                           f"{host} lends no {', '.join(missing)}: add {'it' if len(missing) == 1 else 'them'} to "
                           "its nics, or compare fewer --modes")
        return out


def lab_spec(modes: list[str], name: str = "podmodes", backend: str = "netns", release: str | None = None,
             inventory: str | None = None) -> dict:
    """Node 1: a client and a server per mode; node 2: a server per mode (a ``+bpf-hr`` or
    ``+ebpf-tc`` variant's pods are of its mode; the host-network baseline has none). The lab's
    datapath stays ``none``: a ``+ebpf-tc`` variant's is attached to its pods after ``up``. Each
    node has the ENIs its pods need, and pods whose slave devices may not share a parent (ipvlan,
    macvlan) get shared ENIs of their own (:func:`labkit.modes.plan_enis`). ``inventory``: an
    inventory file (backend hosts), whose first two hosts become node1 and node2."""
    modes = [m for m in modes if m != HOST_NETWORK]
    n1 = [{"name": f"{r}-{short(m)}", "mode": pod_mode(m)} for m in modes for r in ("c", "s")]
    n2 = [{"name": f"r-{short(m)}", "mode": pod_mode(m)} for m in modes]
    nodes = []
    for node, pods in (("node1", n1), ("node2", n2)):
        enis, picks = podmodes.plan_enis([pod["mode"] for pod in pods])
        shared_choice = len({e for e in picks if e is not None}) > 1
        for pod, eni in zip(pods, picks):
            if eni is not None and shared_choice:  # else every sharing pod takes the first shared ENI anyway
                pod["eni"] = eni
        nodes.append({"name": node, "enis": enis, "pods": pods})
    spec = {"name": name, "backend": backend, "datapath": "none", "nodes": nodes}
    if release is not None:
        spec["release"] = release
    if inventory is not None:
        spec["inventory"] = lab_inventory(inventory, {n["name"]: n["enis"] for n in nodes})
    return spec


class _NodeClients:
    """Load clients in a node's own namespace (the host-network baseline), as a lab gives them in a
    pod (``client_session``)."""

    def __init__(self, lab: str):
        self.lab = lab

    def client_session(self, node: str, cpus=None) -> loadgen.ClientSession:
        return loadgen.ClientSession(naming.netns_name(self.lab, node), None, cpus)


class PodModes:
    name = "pod-modes"

    def setup(self, ctx: core.RunContext) -> None:
        p: PodModesParams = ctx.params
        p.validate()
        name = f"pm{ctx.run.run_id[-4:]}"  # unique per run; a resumed run finds its own
        spec = parse_spec(lab_spec(p.modes, name, p.backend, p.release, p.inventory))
        get_backend(p.backend).preflight(spec)  # a missing kernel feature or tool: before anything exists
        hr = [m for m in p.modes if m.endswith(BPF_HR)]
        lb = [m for m in p.modes if m.endswith(EBPF_TC)]
        if hr:
            from ..hostrouting import BpfHostRouting

            BpfHostRouting.preflight(spec.datapath)
        if lb and p.backend == "netns":  # on the VMs and hosts their own kernel and bcc serve it (their agent says)
            from ..datapath.ebpf import TcLB

            TcLB.preflight()
        labmod.down(name)
        self.lab = labmod.up(spec, progress=False)
        self.host_routing = {}
        self.service_lbs = {}
        self.services = None
        self.host_servers = []
        try:
            if "bandwidth" in p.metrics and p.backend == "hosts":
                self._need_iperf3([m for m in p.modes if m != HOST_NETWORK])
            if lb:
                self._service_lb(lb)
            if hr:
                self._host_route({f"{r}-{short(m)}" for m in hr for r in ("c", "s", "r")})
            if HOST_NETWORK in p.modes:
                cpus = ctx.cpus.load_cpus if ctx.cpus.pinned else None
                for node in ("node1", "node2"):
                    cgroup = lab_cgroup(name) / node / "host-network"  # under the lab's: `down` kills it
                    cgroup.mkdir(parents=True, exist_ok=True)
                    self.host_servers.append(loadgen.start_server(
                        naming.netns_name(name, node), f"host-{node}", HOST_PORT, cgroup=cgroup, cpus=cpus))
        except BaseException:
            self.teardown(ctx)
            raise
        if p.backend == "hosts":  # each host's facts and performance preflight (labkit.hostfacts)
            from ..state import LabState

            ctx.run.update_manifest(hosts=LabState(name).meta().get("hosts"))
        ctx.run.update_manifest(labs={"pod-modes": name}, backend=p.backend, node_kernels=self.lab.kernels(),
                                host_routing={node: {"endpoints": s.endpoints, "skipped": s.skipped}
                                              for node, s in self.synced.items()} if hr else {},
                                **self._ebpf_tc_manifest())

    def _need_iperf3(self, modes: list[str]) -> None:
        """The bandwidth metric on the hosts backend: iperf3 is the host's own (the VM box has it; a
        user's host may not), asked of a pod on each node before anything is measured."""
        if not modes:
            return
        for node, pod in (("node1", f"c-{short(modes[0])}"), ("node2", f"r-{short(modes[0])}")):
            res = self.lab.exec(pod, ["iperf3", "--version"], check=False, timeout=60)
            if res.returncode != 0:
                ssh = self.lab.spec.inventory.hosts[node].ssh
                raise UsageError(f"metrics: bandwidth runs iperf3 on the hosts, and the host of {node} ({ssh}) has "
                                 "none: `apt install iperf3` there, or leave bandwidth out of --metrics")

    def _ebpf_tc_manifest(self) -> dict:
        """What the ``+ebpf-tc`` variants were given: per node the pods the programs are on and how
        many hooks, and every Service port (ClusterIP:port -> its one endpoint)."""
        if not self.service_lbs:
            return {}
        described = {node: dp.describe() for node, dp in self.service_lbs.items()}
        return {"ebpf_tc": {node: {"pods": d["pods"], "hooks": d.get("hooks", 0), "service_ports": len(self.services)}
                            for node, d in described.items()},
                "ebpf_tc_services": [{"service": sp.key, "cluster_ip": sp.cluster_ip, "port": sp.port,
                                      "protocol": sp.protocol, "endpoint": f"{ep.ip}:{ep.port}"}
                                     for sp in self.services for ep in sp.endpoints]}

    def _service_lb(self, variants: list[str]) -> None:
        """The ``ebpf-tc`` Service datapath for the ``+ebpf-tc`` variants' pods only, on both nodes.

        One :class:`~labkit.datapath.ebpf.TcLB` per node, asked of the lab for those pods only
        (``lab.datapath(node, "ebpf-tc", pods=…)``: on the netns backend an object here, on the VMs
        one in the node's agent; the lab's own datapath stays ``none``): its tc programs go on their
        interfaces only (the node-side ``lx-<pod>``, or the pod's own for a pod without one:
        macvlan, eni-ipvlan), so that the other modes' pods keep no datapath in the same lab, as
        Terway runs Cilium on its IPVLAN pods only. Both nodes hold the whole table (Cilium's maps
        are cluster-wide); node 1's client pods translate.

        Everything it makes is the lab's to remove: the pins in the node's state folder
        (``<lab state>/nodes/<node>/bpffs/ebpf-tc``, ``ebpf-tc.json``: the folder `labkit down`
        unmounts and removes) and tc filters on interfaces of the lab's namespaces (gone with them), so
        ``labkit down`` cleans up after a SIGKILLed run as :meth:`teardown` does after a normal one."""
        pods = {f"{r}-{short(m)}" for m in variants for r in ("c", "s", "r")}
        self.services = service_table(self.lab.spec, self.lab.plan, variants)
        for node in self.lab.spec.nodes:
            mine = sorted(pod.name for pod in node.pods if pod.name in pods)
            dp = self.service_lbs[node.name] = self.lab.datapath(node.name, "ebpf-tc", pods=mine)
            dp.sync(self.services)

    def service_flows(self) -> dict[str, int]:
        """Per node, the flows ebpf-tc's conntrack holds to a Service (``lk_ct_v4`` entries with a
        service id): what shows that the ``+ebpf-tc`` clients' traffic took the programs."""
        return {node: dp.describe().get("service_flows", 0) for node, dp in self.service_lbs.items()}

    def _host_route(self, pods: set[str]) -> None:
        """eBPF host routing on both nodes for ``pods`` only (the ``+bpf-hr`` variants'); the other
        pods keep the node's kernel routing (their traffic passes the programs on ``eth0``)."""
        from ..hostrouting import BpfHostRouting

        self.synced = {}
        for node in ("node1", "node2"):
            nctx = self.lab.backend.node_context(self.lab.spec, node, self.lab.plan)
            hr = self.host_routing[node] = BpfHostRouting(nctx)
            mine = [pod for pod in nctx.pods if pod.pod in pods]
            self.synced[node] = hr.sync(mine)
            if set(self.synced[node].skipped) & pods:
                raise UsageError(f"eBPF host routing could not take pods {self.synced[node].skipped} on {node}")

    def teardown(self, ctx: core.RunContext) -> None:
        for srv in getattr(self, "host_servers", []):
            loadgen.stop_server(srv)
        if getattr(self, "host_routing", None):
            try:
                ctx.run.update_manifest(host_routing_stats={n: hr.stats() for n, hr in self.host_routing.items()})
            except Exception:  # counters are a nicety; the cleanup below is not
                pass
            for hr in self.host_routing.values():
                hr.cleanup()
            self.host_routing = {}
        if getattr(self, "service_lbs", None):
            try:
                ctx.run.update_manifest(ebpf_tc_flows=self.service_flows())
            except Exception:  # as above
                pass
            for dp in self.service_lbs.values():
                dp.cleanup()
            self.service_lbs = {}
        if getattr(self, "lab", None):
            labmod.down(self.lab.name)

    def measure(self, ctx: core.RunContext) -> None:
        """Every latency point (mode × same/cross node × repeat × metric) measured interleaved (see
        :func:`labkit.experiments.core.measure_interleaved`), then every rate point interleaved
        (:func:`labkit.experiments.core.measure_rates_interleaved`), then bandwidth, modes in a fresh
        random order per repeat (iperf3 runs alone: it fills the CPU)."""
        p: PodModesParams = ctx.params
        rng = random.Random(p.seed)
        lat = [m for m in p.metrics if m in LATENCY]
        rates = [m for m in p.metrics if m in RATES]
        order = [(rep, mode) for rep in range(1, p.repeats + 1) for mode in rng.sample(p.modes, len(p.modes))]
        where = (("same-node", "s"), ("cross-node", "r"))
        points = [self._point(mode, w, f"{server}-{short(mode)}", rep, metric) for rep, mode in order
                  for w, server in where for metric in lat]
        rate_points = [self._rate_point(mode, w, f"{server}-{short(mode)}", rep, metric) for rep, mode in order
                       for w, server in where for metric in rates]
        todo = [pt for pt in points if core.point_key(pt.full) not in ctx.done]
        bw = sum(m != HOST_NETWORK for _, m in order) * 2 if "bandwidth" in p.metrics else 0
        total = (len(points) + bw) * p.samples + len(rate_points) * p.rate_seconds * 10000
        with tqdm(total=total, desc="pod-modes", unit="sample", unit_scale=True, disable=not ctx.progress) as bar:
            bar.update((len(points) - len(todo)) * p.samples)
            if todo:
                with ctx.phase("latency"):
                    core.measure_interleaved(ctx, todo, p.samples, p.warmup, p.size, p.burst,
                                             rng=random.Random(f"{p.seed}-lat"), on_samples=bar.update)
            if rate_points:
                with ctx.phase("rates"):
                        core.measure_rates_interleaved(ctx, rate_points, p.rate_seconds, p.window_ms, p.concurrency,
                                                   p.size, rng=random.Random(f"{p.seed}-rates"),
                                                   on_window=lambda k: bar.update(k * p.window_ms * 10))
            with ctx.phase("bandwidth") if bw else contextlib.nullcontext():
                for rep, mode in order if bw else ():
                    for w, server in where if mode != HOST_NETWORK else ():  # iperf3 runs in pods
                        self._bandwidth(ctx, mode, w, f"{server}-{short(mode)}", rep)
                        bar.update(p.samples)

    def _row(self, mode, where, rep) -> dict:
        """A point's identity; a ``+ebpf-tc`` row names its datapath and the service ports it holds."""
        lb = mode.endswith(EBPF_TC)
        return {"experiment": self.name, "datapath": "ebpf-tc" if lb else "none", "mode": mode,
                "services": len(self.services) if lb else 0, "position": where, "repeat": rep}

    def _target(self, mode: str, server: str, proto: str = "TCP", port: int = SERVER_PORT) -> tuple[str, int]:
        """Where ``mode``'s client sends to reach pod ``server``: the pod's address, or for a
        ``+ebpf-tc`` variant the ClusterIP of the server's Service (the ``proto`` port leading to
        ``port`` on the server)."""
        if not mode.endswith(EBPF_TC):
            return str(self.lab.plan.pods[server].ip), port
        sp = next(sp for sp in self.services if sp.name == server and sp.protocol == proto
                  and sp.endpoints[0].port == port)
        return sp.cluster_ip, sp.port

    def _host_target(self, where: str) -> str:
        return str(self.lab.plan.nodes["node1" if where == "same-node" else "node2"].primary.ip)

    def _rate_point(self, mode, where, server, rep, metric) -> core.RatePoint:
        if mode == HOST_NETWORK:
            return core.RatePoint(self._row(mode, where, rep), metric, RATES[metric], self._host_target(where),
                                  HOST_PORT, _NodeClients(self.lab.name), "node1")
        host, port = self._target(mode, server, "UDP" if RATES[metric] == "udp_rr" else "TCP")
        return core.RatePoint(self._row(mode, where, rep), metric, RATES[metric], host, port, self.lab,
                              f"c-{short(mode)}")

    def _point(self, mode, where, server, rep, metric) -> core.LatencyPoint:
        if mode == HOST_NETWORK:
            return core.LatencyPoint(self._row(mode, where, rep), metric, naming.netns_name(self.lab.name, "node1"),
                                     None, self._host_target(where), HOST_PORT, _NodeClients(self.lab.name), "node1")
        client = f"c-{short(mode)}"
        host, port = self._target(mode, server, "UDP" if metric == "udp_rr" else "TCP")
        return core.LatencyPoint(self._row(mode, where, rep), metric, self.lab.pod_netns(client),
                                 self.lab.backend.pod_cgroup(self.lab.spec, client), host, port, self.lab, client)

    def _bandwidth(self, ctx, mode, where, server, rep) -> None:
        row = self._row(mode, where, rep)
        if core.point_key({**row, "metric": "bandwidth"}) in ctx.done:
            return
        host, port = self._target(mode, server, port=IPERF_PORT)
        gbps = self._iperf(f"c-{short(mode)}", server, ctx.params.bandwidth_seconds, ctx, host, port)
        core.record_value(ctx, row, "bandwidth", gbps, "Gbit/s")

    def _iperf(self, client: str, server: str, seconds: float, ctx, host: str, port: int = IPERF_PORT) -> float:
        """iperf3 from pod ``client`` to pod ``server`` (wherever they run: namespaces here or in VMs)
        at ``host:port`` (the server's address, or its Service's ClusterIP), Gbit/s received. The
        server serves one test and is bounded by ``timeout``, so that it never outlives the
        measurement (killing a local ssh would not stop it inside a VM)."""
        cpus = ctx.cpus.load_cpus if ctx.cpus.pinned else None
        srv = self.lab.spawn(server, ["timeout", str(int(seconds) + 120), "iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
                             cpus=cpus, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            data: dict = {}
            for _ in range(50):  # the server needs a moment to listen
                res = self.lab.exec(client, ["iperf3", "-c", host, "-p", str(port), "-t", str(int(seconds)), "-J"],
                                    check=False, cpus=cpus, timeout=seconds + 60)
                data = json.loads(res.stdout or "{}")
                if "error" not in data and data:
                    return data["end"]["sum_received"]["bits_per_second"] / 1e9
                time.sleep(0.05)
            raise MeasurementError(f"iperf3 from pod {client} to {server} ({host}) failed: "
                                   f"{data.get('error') or 'no output'}")
        finally:
            if srv.poll() is None:
                srv.terminate()  # `timeout` passes SIGTERM on to iperf3
                try:
                    srv.wait(5)
                except subprocess.TimeoutExpired:
                    srv.kill()
            srv.wait()


def run(params: PodModesParams | None = None, resume: str | None = None, progress: bool = True, on_point=None):
    return core.execute(PodModes(), params or PodModesParams(), resume=resume, progress=progress,
                        on_point=on_point)
