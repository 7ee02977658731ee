"""eBPF host routing (Cilium's "BPF host routing", 1.9+): a node forwards its pods' traffic at tc,
past its own routing and netfilter, with ``bpf_redirect_peer`` and ``bpf_redirect_neigh``.

``bpf/bpf_host.c`` is compiled with bcc once per node, its two programs pinned, and attached with tc
clsact (priority :data:`TC_PREF`, after the ``ebpf`` policy engine's and ``ebpf-tc``'s filters on the
same hook, which let packets on with ``TC_ACT_UNSPEC``: host routing sees what policy allowed, after
Service DNAT):

  tc ingress of ``lx-<pod>``  ``lk_host_from_container``: to a pod of this node straight into its
                              namespace (``bpf_redirect_peer``); elsewhere ``bpf_fib_lookup`` in the
                              node's tables and out to the next hop (eth0): ``bpf_redirect`` with the
                              MACs the FIB gave, ``bpf_redirect_neigh`` while the neighbour is not
                              resolved (as Cilium's ``fib_do_redirect``)
  netkit ``lx-<pod>``         ``lk_host_from_netkit``: the same for a ``netkit`` pod, in the device's own
  (``BPF_NETKIT_PEER``)       list for what the pod sends (:mod:`labkit.ebpf.netkit`): it runs in the
                              pod's transmit, so the packet is on its way out of eth0 (or into another
                              pod, through that pod's device: ``bpf_redirect_peer`` is for tc ingress
                              only) before any queue; on a veth a tc ingress filter runs only after
                              the packet crossed the veth's backlog
  tc ingress of ``eth0``      ``lk_host_from_netdev``: from another node to a pod of this node, into
                              its namespace; everything else goes on to the node's stack

These programs run on every packet of a pod's round trip (and ``lk_host_from_netdev`` on every packet
the node receives), so they read and rewrite the headers in place (direct packet access) rather than
through a helper call per field; ``tests/test_host_routing.py`` checks the bytecode for it, and that
every packet of a cross-node exchange took the fast path, counted against the pods' own IP counters.

Which destinations are local pods is the map ``lk_host_eps`` (pod IPv4 -> ifindex of its node-side
veth, the pod's MAC and the veth's, flags), written by :meth:`BpfHostRouting.sync` in one batch
before anything is attached. A pod whose node-side veth has something on its egress (another
client's tc filter, or on a netkit device its ``BPF_NETKIT_PRIMARY`` list: the ``ebpf`` policy
engine's ingress enforcement, ``ebpf-tc``'s reverse NAT; or a root qdisc other than ``noqueue``) is
delivered through that egress (``bpf_redirect``) instead,
since ``bpf_redirect_peer`` would skip it: sync host routing after the Service datapath and the
policy engine attached, and again whenever they attach anew (:meth:`BpfHostRouting.describe` says
``stale`` when the map no longer matches the interfaces).

Which pods: those of a routed-veth mode (:class:`~labkit.modes.base.RoutedVeth`: ``veth``,
``eni-policy-route``) whose node-side veth's peer holds the pod's address; the others are skipped and
reported, and their traffic takes the node's stack as before. What host routing cannot live with:
Service datapaths and policy engines in the node's netfilter, which it bypasses
(:data:`DATAPATHS`, :data:`POLICY_ENGINES`; :meth:`BpfHostRouting.preflight` refuses the rest).

Why a module of its own, beside ``labkit/datapath`` and ``labkit/policy`` rather than in either: it
is neither a Service datapath (no Service table) nor a policy engine, but a third client of the eBPF
runtime (:mod:`labkit.ebpf`) at the same layer. Pins live in the node's private bpffs, folder
``host-routing/``; ``host-routing.json`` is the tc journal (written before each filter exists) and
records the endpoints, so a later process can describe and clean up. Filters are told from the
other clients' by priority and the ``lk_host_`` prefix.

The C/Python struct contract: :class:`HostEndpoint` mirrors ``struct host_endpoint`` of
``bpf/lib/host_routing.h``, :data:`C_CONSTANTS` its constants; ``tests/test_host_routing.py`` checks
both as gcc sees the header and against bcc's typed views.
"""

from __future__ import annotations

import ctypes as ct
import socket
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import ClassVar

from .datapath.base import NodeContext, PodIface
from .ebpf.libbpf import PROG_SCHED_CLS
from .ebpf.loader import Bpffs, Program
from .ebpf.maps import MapSpec, PinnedMap
from .ebpf.netlink import ifindex, netlink
from .ebpf.tc import CLIENTS, TC_EGRESS, TC_INGRESS, TcAttachments, TcHook, hook_programs
from .errors import DatapathError, LabkitError
from .modes.base import RoutedVeth

TC_NAMES = "lk_host_"  # prefix of the filters' names (the programs')
TC_PREF = CLIENTS[TC_NAMES]  # 0x4C52 "LR": after the ebpf policy engine and ebpf-tc; lower runs first
FROM_CONTAINER, FROM_NETKIT, FROM_NETDEV = "lk_host_from_container", "lk_host_from_netkit", "lk_host_from_netdev"
PROGRAMS = (Program(FROM_CONTAINER, PROG_SCHED_CLS), Program(FROM_NETKIT, PROG_SCHED_CLS),
            Program(FROM_NETDEV, PROG_SCHED_CLS))
SOURCE = "bpf_host.c"
FOLDER = "host-routing"
UPLINKS = ("eth0",)  # the node's interfaces from other nodes (lk_host_from_netdev)

# Service datapaths and policy engines host routing works with: kube-proxy's (iptables, ipvs,
# nftables) and the iptables policy engine act in the node's netfilter, which it bypasses.
DATAPATHS = ("none", "ebpf", "ebpf-tc")
POLICY_ENGINES = ("none", "ebpf")

# ---------------------------------------------------------------- the struct contract

EPS_MAP_SIZE = 16384
EP_VIA_EGRESS = 1  # HOST_EP_F_VIA_EGRESS
# lk_host_stats slots (HR_STAT_*): redirect_neigh counts every packet sent to the FIB's next hop, by
# bpf_redirect with the FIB's MACs or, when the neighbour was not resolved (neigh_unresolved), by
# bpf_redirect_neigh
STATS = ("redirect_peer", "redirect_egress", "redirect_neigh", "pass", "neigh_unresolved")


class HostEndpoint(ct.Structure):
    """lk_host_eps value (key: ``__be32`` pod address). Must match ``struct host_endpoint``."""

    _fields_ = [
        ("ifindex", ct.c_uint32),  # host order: the pod's node-side veth in the node's namespace
        ("flags", ct.c_uint16),  # host order: EP_VIA_EGRESS
        ("mac", ct.c_uint8 * 6),  # the pod's own interface
        ("node_mac", ct.c_uint8 * 6),  # the node-side veth (the pod's gateway)
        ("pad", ct.c_uint16),
    ]


HOST_ENDPOINT = struct.Struct("=IH6s6sH")  # packer of HostEndpoint
MAPS = (
    MapSpec("lk_host_eps", "hash", ct.c_uint32, HostEndpoint, EPS_MAP_SIZE),
    MapSpec("lk_host_stats", "percpu_array", ct.c_uint32, ct.c_uint64, len(STATS)),
)
BY_NAME = {m.name: m for m in MAPS}
C_STRUCTS = {"host_endpoint": HostEndpoint}
C_CONSTANTS = {"LK_HOST_EPS_MAP_SIZE": EPS_MAP_SIZE, "HOST_EP_F_VIA_EGRESS": EP_VIA_EGRESS,
               **{f"HR_STAT_{name.upper()}": i for i, name in enumerate(STATS)}, "HR_STAT_MAX": len(STATS)}


# ---------------------------------------------------------------- endpoints

@dataclass(frozen=True)
class Endpoint:
    """One pod as ``lk_host_eps`` holds it."""

    pod: str
    ip: str
    ifname: str  # node-side veth
    ifindex: int  # its index in the node's namespace
    mac: str  # the pod's own interface
    node_mac: str  # the node-side veth
    via_egress: bool  # something sits on the veth's egress: delivered through it, not into the pod
    kind: str = "veth"  # the node-side device's link kind: "netkit" takes lk_host_from_netkit in its own list

    def packed(self) -> tuple[bytes, bytes]:
        """(key, value) as the map holds them."""
        value = HOST_ENDPOINT.pack(self.ifindex, EP_VIA_EGRESS if self.via_egress else 0, _mac(self.mac),
                                   _mac(self.node_mac), 0)
        return socket.inet_aton(self.ip), value


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def why_not(pod: PodIface) -> str | None:
    """Why host routing leaves ``pod`` to the node's stack (None: it handles it)."""
    if not pod.ifname or not pod.netns:
        return "no node-side veth"
    if not isinstance(pod.pod_mode, RoutedVeth):
        return f"mode {pod.mode} is not a routed veth"
    return None


def _node_side(ipr, names: Iterable[str]) -> dict[str, dict]:
    """ifindex, MAC, peer index, link kind and whether anything sits on the egress (another client's
    tc filter, a netkit device's programs for the pod's ingress, a queueing root qdisc), of node-side
    devices."""
    out = {}
    for name in names:
        index = ifindex(ipr, name)
        if index is None:
            continue
        link = ipr.get_links(index)[0]
        info = link.get_attr("IFLA_LINKINFO")
        roots = [q.get_attr("TCA_KIND") for q in ipr.get_qdiscs(index=index) if q["parent"] == 0xFFFFFFFF]
        busy = bool(hook_programs(ipr, index, TC_EGRESS))
        out[name] = {"ifindex": index, "mac": link.get_attr("IFLA_ADDRESS"), "peer": link.get_attr("IFLA_LINK"),
                     "kind": "netkit" if info and info.get_attr("IFLA_INFO_KIND") == "netkit" else "veth",
                     "egress": busy or any(kind != "noqueue" for kind in roots)}
    return out


def _own_interface(ip: str):
    """In a pod: (ifindex, MAC) of the interface holding ``ip``, or None."""
    def find(ipr):
        for addr in ipr.get_addr(family=socket.AF_INET):
            if addr.get_attr("IFA_ADDRESS") == ip:
                return addr["index"], ipr.get_links(addr["index"])[0].get_attr("IFLA_ADDRESS")
        return None

    return find


@dataclass
class HostRoutingSync:
    """What one :meth:`BpfHostRouting.sync` did."""

    node: str
    endpoints: int  # pods in lk_host_eps now
    via_egress: int  # of which delivered through their veth's egress
    written: int
    deleted: int
    skipped: dict[str, str] = field(default_factory=dict)  # pod -> why it is left to the stack
    seconds: float = 0.0
    compile_seconds: float | None = None  # set when this sync compiled the programs


# ---------------------------------------------------------------- the client

class BpfHostRouting:
    """eBPF host routing on one node (see the module docstring). ``uplinks``: the node's interfaces
    traffic from other nodes arrives on (``lk_host_from_netdev``)."""

    features: ClassVar[tuple[str, ...]] = ("bpf", "bpf-jit", "bcc", "bcc-compile", "kernel-headers", "tc-clsact")

    def __init__(self, ctx: NodeContext, uplinks: Sequence[str] = UPLINKS):
        self.ctx = ctx
        self.uplinks = tuple(uplinks)
        self.fs = Bpffs(ctx.state_dir, FOLDER)
        self.state_file = self.fs.state_file
        self.attachments = TcAttachments(self.fs.state, TC_PREF, TC_NAMES, self.fs.links)

    def _where(self) -> str:
        return f"eBPF host routing on node {self.ctx.node}"

    @classmethod
    def preflight(cls, datapath: str = "none", policy_engine: str = "none") -> None:
        """Raise if host routing cannot run here (:class:`~labkit.errors.MissingFeature` with the
        doctor's fix) or would bypass what ``datapath`` / ``policy_engine`` put in the node's
        netfilter (:class:`~labkit.errors.LabkitError`)."""
        from . import doctor

        if datapath not in DATAPATHS:
            raise LabkitError(f"eBPF host routing bypasses the node's netfilter, where datapath {datapath} "
                              f"translates Services; use one of {', '.join(DATAPATHS)}")
        if policy_engine not in POLICY_ENGINES:
            raise LabkitError(f"eBPF host routing bypasses the node's netfilter, where policy engine "
                              f"{policy_engine} enforces; use one of {', '.join(POLICY_ENGINES)}")
        for feature in cls.features:
            doctor.require(feature, "eBPF host routing")

    # -- where
    def hooks(self, endpoints: Iterable[Endpoint]) -> list[TcHook]:
        return ([TcHook(self.ctx.netns, ep.ifname, TC_INGRESS, FROM_NETKIT if ep.kind == "netkit" else FROM_CONTAINER)
                 for ep in endpoints]
                + [TcHook(self.ctx.netns, name, TC_INGRESS, FROM_NETDEV) for name in self.uplinks])

    def endpoints(self, pods: Iterable[PodIface] | None = None) -> tuple[list[Endpoint], dict[str, str]]:
        """The map entries of ``pods`` (default: the node's) as the interfaces are now, and the pods
        left out with the reason."""
        pods = list(self.ctx.pods if pods is None else pods)
        skipped = {p.pod: why for p in pods if (why := why_not(p))}
        mine = [p for p in pods if p.pod not in skipped]
        node_side = netlink(self.ctx.netns, lambda ipr: _node_side(ipr, [p.ifname for p in mine]))
        out = []
        for pod in mine:
            veth = node_side.get(pod.ifname)
            if veth is None:
                raise DatapathError(f"{self._where()}: interface {pod.ifname} of pod {pod.pod} not found")
            own = netlink(pod.netns, _own_interface(pod.ip))
            if own is None:
                raise DatapathError(f"{self._where()}: no interface holds {pod.ip} in {pod.netns}")
            if own[0] != veth["peer"]:
                skipped[pod.pod] = f"{pod.ip} is not on the peer of {pod.ifname}"
                continue
            out.append(Endpoint(pod.pod, pod.ip, pod.ifname, veth["ifindex"], own[1], veth["mac"], veth["egress"],
                                veth["kind"]))
        return out, skipped

    # -- sync
    def sync(self, pods: Iterable[PodIface] | None = None) -> HostRoutingSync:
        """Host-route ``pods`` (default: every pod of the node): compile and pin once, write
        ``lk_host_eps`` in one batch (stale entries deleted), then attach to each pod's node-side veth
        and the uplinks, journalling each filter first. Safe to repeat. When pods are no longer given,
        every filter is detached and the remaining ones attached again (meanwhile the node's stack
        forwards, as without host routing). With no pod to host-route, whatever an earlier sync
        attached is removed."""
        t0 = time.perf_counter()
        pods = list(self.ctx.pods if pods is None else pods)
        endpoints, skipped = self.endpoints(pods)
        if not endpoints:
            self.cleanup()
            return HostRoutingSync(self.ctx.node, 0, 0, 0, 0, skipped, time.perf_counter() - t0)
        hooks = self.hooks(endpoints)
        compiled = self.fs.load(SOURCE, PROGRAMS, (m.name for m in MAPS), self._where())
        eps = PinnedMap(BY_NAME["lk_host_eps"], self.fs.maps / "lk_host_eps")
        try:
            wanted = dict(ep.packed() for ep in endpoints)
            held = dict(eps.items())
            write = {k: v for k, v in wanted.items() if held.get(k) != v}
            stale = [k for k in held if k not in wanted]
            eps.update(list(write), list(write.values()))
            eps.delete(stale)
        finally:
            eps.close()
        keys = {(h.netns, h.ifname, h.parent) for h in hooks}
        if any((h.netns, h.ifname, h.parent) not in keys for h in self.attachments.recorded()):
            self.attachments.detach(list)  # fewer hooks than before: start over from the journal
        extra = {"pods": [asdict(p) for p in pods], "endpoints": [asdict(ep) for ep in endpoints],
                 "skipped": skipped}
        with self.fs.opened_programs(p.name for p in PROGRAMS) as fds:
            self.attachments.attach(hooks, fds, self._where(), extra)
        return HostRoutingSync(self.ctx.node, len(endpoints), sum(ep.via_egress for ep in endpoints), len(write),
                               len(stale), skipped, time.perf_counter() - t0, compiled)

    def cleanup(self) -> None:
        """Detach this client's filters (the journal's, and where it would attach now: interfaces
        already gone are skipped), unpin, drop the state file. Other clients' filters on the same
        interfaces stay. Idempotent."""
        pods = [p for p in self.ctx.pods if why_not(p) is None]
        self.attachments.detach(lambda: [TcHook(self.ctx.netns, p.ifname, TC_INGRESS, FROM_CONTAINER) for p in pods]
                                + self.hooks([]))
        self.fs.remove()

    # -- inspection
    def recorded(self) -> list[Endpoint]:
        """The endpoints the last sync wrote (from the state file)."""
        return [Endpoint(**e) for e in self.fs.state.load().get("endpoints", [])]

    def stats(self) -> dict[str, int]:
        """lk_host_stats summed over CPUs: how many packets went which way."""
        stats = PinnedMap(BY_NAME["lk_host_stats"], self.fs.maps / "lk_host_stats")
        try:
            return {name: sum(int.from_bytes(v, sys.byteorder) for v in stats.get_percpu(i.to_bytes(4, sys.byteorder)))
                    for i, name in enumerate(STATS)}
        finally:
            stats.close()

    def describe(self) -> dict:
        """Where it is attached, what the map holds, the counters, and ``stale``: whether the map no
        longer matches the interfaces (a pod gone or added, another client now on a veth's egress:
        sync again)."""
        info: dict = {"node": self.ctx.node, "pinned": self.fs.mounted() and (self.fs.maps / "lk_host_eps").exists()}
        recorded = self.recorded()
        hooks = self.attachments.recorded()
        info["attached"] = bool(hooks) and self.attachments.attached(hooks)
        info["endpoints"] = {ep.pod: "egress" if ep.via_egress else "peer" for ep in recorded}
        info["skipped"] = self.fs.state.load().get("skipped", {})
        if info["pinned"]:
            info["stats"] = self.stats()
            pods = [PodIface(**p) for p in self.fs.state.load().get("pods", [])]
            try:
                info["stale"] = self.endpoints(pods)[0] != recorded
            except (DatapathError, OSError):
                info["stale"] = True
        return info


def sync_node(ctx: NodeContext, datapath: str = "none", policy_engine: str = "none",
              uplinks: Sequence[str] = UPLINKS) -> HostRoutingSync:
    """What a node runtime calls for ``host_routing: bpf``, after its Service datapath and policy
    engine synced (they attach first; see the module docstring): preflight, then host-route every pod
    of the node."""
    BpfHostRouting.preflight(datapath, policy_engine)
    return BpfHostRouting(ctx, uplinks).sync()


__all__ = [
    "DATAPATHS",
    "POLICY_ENGINES",
    "STATS",
    "TC_NAMES",
    "TC_PREF",
    "BpfHostRouting",
    "Endpoint",
    "HostEndpoint",
    "HostRoutingSync",
    "sync_node",
    "why_not",
]
