"""Node-level wiring: pods in every network mode, node bridges, VXLAN, routes and rules. pyroute2 only.

This is the part of a lab that is the same on every backend: a node is a network namespace here and
a VM's own namespace on the ``vagrant`` backend; pods are namespaces inside it. The VPC fabric
(how node NICs and ENIs reach each other) belongs to the backend.

Names inside a node: ``eth0`` primary NIC, ``eni<k>`` ENIs, ``lx-<pod>`` the node side of a pod's veth,
``cbr0`` the bridge of ``bridge`` pods (kubenet), ``cni0`` the bridge of ``overlay`` pods and
``vxlan0`` the VXLAN device (Flannel's cni0 / flannel.1). Inside a pod: ``eth0``, and ``veth1`` for an
``eni-exclusive`` pod's path to its node (Terway routes ClusterIP traffic of exclusive-ENI pods
through a veth to the host, so that kube-proxy sees it).

Pod modes (the Terway study's, plus the usual CNI ones):
- ``eni-exclusive``: the ENI is moved into the pod; the pod has the ENI's VPC address.
- ``eni-ipvlan``: an IPVLAN slave (l2, l3 or l3s) of a shared ENI, with a secondary VPC address.
- ``eni-policy-route``: a veth to the node; a secondary VPC address of a shared ENI; source-based
  policy routing sends the pod's traffic out of that ENI (Terway's shared-ENI veth mode).
- ``veth``: routed veth, gateway 169.254.1.1 (Calico/Cilium style), address from the node's subnet.
- ``bridge``: veth into the node bridge ``cbr0`` (kubenet), address from the node's subnet.
- ``overlay``: veth into ``cni0``, address from the node's overlay subnet, other nodes reached by
  VXLAN (VNI 1, UDP 8472, MTU 1450), static FDB/ARP entries as Flannel programs them.
- ``macvlan``: a macvlan (bridge mode) slave of a shared ENI (or of ``eth0``), a VPC address.

Sysctls are written only inside the lab's namespaces: in a node ``net.ipv4.ip_forward=1``,
``proxy_arp`` on ``cbr0`` (bridge pods reach routed-veth pods of the same subnet), and
``net.bridge.bridge-nf-call-iptables=1`` where bridges exist (kube-proxy needs it for traffic between
two pods on one bridge).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from pyroute2 import IPRoute  # noqa: F401  (type of Netns.ipr)

from . import nsexec
from .addressing import ROUTED_GATEWAY, VXLAN_OVERHEAD, VXLAN_PORT, VXLAN_VNI, AddressPlan, NodePlan, PodPlan
from .datapath.base import PodIface
from .spec import Node, Pod, Spec

IFA_F_NOPREFIXROUTE = 0x200
NUD_PERMANENT = 0x80
RT_SCOPE_LINK = 253
RTNH_F_ONLINK = 4
RTN_THROW = 9
ENI_TABLE_BASE = 100  # routing table of ENI k is 100 + k
POLICY_PRIORITY = 1000
IPVLAN_MODES = {"l2": 0, "l3": 1, "l3s": 2}


@dataclass
class Netns:
    """A namespace we hold an open netlink socket in."""

    name: str | None  # None: this process's namespace (the node of a VM)
    ipr: IPRoute
    _index: dict[str, int] = field(default_factory=dict)  # ifname -> ifindex, forgotten on move/rename

    def index(self, ifname: str) -> int:
        if ifname not in self._index:
            found = self.ipr.link_lookup(ifname=ifname)
            if not found:
                raise LookupError(f"no interface {ifname} in {self.name or 'this namespace'}")
            self._index[ifname] = found[0]
        return self._index[ifname]

    def move(self, ifname: str, to: Netns, new_name: str | None = None) -> None:
        """Move an interface into namespace ``to`` (and rename it there)."""
        self.ipr.link("set", index=self.index(ifname), net_ns_fd=to.name)
        del self._index[ifname]
        if new_name:
            to.ipr.link("set", index=to.index(ifname), ifname=new_name)
            to._index.pop(ifname, None)

    def up(self, ifname: str, **extra) -> int:
        idx = self.index(ifname)
        self.ipr.link("set", index=idx, state="up", **extra)
        return idx

    def addr(self, ifname: str, ip, prefixlen: int, noprefixroute: bool = False) -> None:
        kw = {"IFA_FLAGS": IFA_F_NOPREFIXROUTE} if noprefixroute else {}
        self.ipr.addr("add", index=self.index(ifname), address=str(ip), prefixlen=prefixlen, **kw)

    def route(self, dst: str, **kw) -> None:
        self.ipr.route("add", dst=dst, **kw)

    def sysctl(self, settings: dict[str, str | int]) -> None:
        nsexec.write_sysctls(self.name, settings)

    def close(self) -> None:
        self.ipr.close()


def open_netns(name: str | None) -> Netns:
    return Netns(name, nsexec.iproute(name))


def create_netns(name: str, record: Callable[..., None]) -> Netns:
    """Journal, then create a named namespace with ``lo`` up; return it with a socket inside."""
    record("netns", name=name)
    nsexec.create_netns(name)
    ns = Netns(name, nsexec.iproute(name))
    ns.ipr.link("set", index=1, state="up")
    return ns


@dataclass
class NodeWiring:
    """Builds one node's part of a lab inside ``node`` (its namespace, already holding ``eth0`` and
    the ``eni<k>`` NICs with no addresses). ``pod_ns(pod)`` names a pod's namespace; ``record``
    journals every object before it is created."""

    spec: Spec
    plan: AddressPlan
    node: Node
    ns: Netns
    pod_ns: Callable[[str], str]
    record: Callable[..., None]
    pods: list[PodIface] = field(default_factory=list)

    @property
    def me(self) -> NodePlan:
        return self.plan.nodes[self.node.name]

    # ------------------------------------------------------------ node
    def setup_node(self) -> None:
        ns, me, vpc = self.ns, self.me, self.plan.vpc
        ns.ipr.link("set", index=1, state="up")
        ns.sysctl({"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0})
        ns.up("eth0", mtu=1500)
        ns.addr("eth0", me.primary.ip, vpc.prefixlen)
        ns.route("default", gateway=str(self.plan.vpc_gateway), oif=ns.index("eth0"))
        exclusive = set(me.exclusive.values())
        for nic in me.nics[1:]:
            if nic.index in exclusive:
                continue  # moved into its pod as is
            ns.up(nic.ifname, mtu=1500)
            ns.addr(nic.ifname, nic.ip, vpc.prefixlen, noprefixroute=True)
            # the ENI's table sends everything to the VPC gateway, even VPC neighbours: an ENI's
            # macvlan/ipvlan slaves are unreachable from the ENI itself, but reachable via the router
            table = ENI_TABLE_BASE + nic.index
            ns.route("default", gateway=str(self.plan.vpc_gateway), oif=ns.index(nic.ifname), table=table,
                     flags=RTNH_F_ONLINK)
            # …but this node's own pod subnets go back to the main table: a reply that kube-proxy
            # de-NATs here must not leave and come back (it would arrive as a stray, INVALID packet)
            local = [str(s) for s in (me.native_subnet, me.overlay_subnet) if s]
            local += [f"{self.plan.pods[p.name].ip}/32" for p in self.node.pods
                      if p.mode in ("eni-policy-route", "eni-exclusive")]  # reached over their lx- veth
            for dst in local:
                ns.route(dst, table=table, type=RTN_THROW)
        modes = {p.mode for p in self.node.pods}
        if "bridge" in modes:
            self._bridge("cbr0", me.native_subnet.network_address + 1, me.native_subnet.prefixlen, 1500)
            ns.sysctl({"net.ipv4.conf.cbr0.proxy_arp": 1})
        if me.overlay_subnet is not None:
            self._vxlan()
            if "overlay" in modes:
                self._bridge("cni0", me.overlay_subnet.network_address + 1, me.overlay_subnet.prefixlen,
                             1500 - VXLAN_OVERHEAD)
        if modes & {"bridge", "overlay"}:
            self._br_netfilter()

    def _bridge(self, name: str, ip: IPv4Address, prefixlen: int, mtu: int) -> None:
        self.ns.ipr.link("add", ifname=name, kind="bridge")
        self.ns.up(name, mtu=mtu)
        self.ns.addr(name, ip, prefixlen)

    def _br_netfilter(self) -> None:
        try:
            self.ns.sysctl({"net.bridge.bridge-nf-call-iptables": 1})
        except FileNotFoundError:
            pass  # no br_netfilter: Service hairpin between two pods of one bridge is not DNATed back

    def _vxlan(self) -> None:
        ns, me = self.ns, self.me
        ns.ipr.link("add", ifname="vxlan0", kind="vxlan", vxlan_id=VXLAN_VNI, vxlan_local=str(me.primary.ip),
                    vxlan_port=VXLAN_PORT, vxlan_learning=0, vxlan_link=ns.index("eth0"))
        ns.up("vxlan0", mtu=1500 - VXLAN_OVERHEAD, address=me.vxlan_mac)
        ns.addr("vxlan0", me.overlay_subnet.network_address, 32)
        vx = ns.index("vxlan0")
        for other in self.plan.nodes.values():
            if other.name == me.name:
                continue
            gw = str(other.overlay_subnet.network_address)
            ns.ipr.neigh("add", dst=gw, lladdr=other.vxlan_mac, ifindex=vx, state=NUD_PERMANENT)
            ns.ipr.fdb("add", ifindex=vx, lladdr=other.vxlan_mac, dst=str(other.primary.ip))
            ns.route(str(other.overlay_subnet), gateway=gw, oif=vx, flags=RTNH_F_ONLINK)

    # ------------------------------------------------------------ pods
    def add_pod(self, pod: Pod) -> PodIface:
        pp = self.plan.pods[pod.name]
        name = self.pod_ns(pod.name)
        pns = create_netns(name, self.record)
        try:
            wire = {"eni-exclusive": self._exclusive, "eni-ipvlan": self._slave, "macvlan": self._slave,
                    "eni-policy-route": self._routed, "veth": self._routed,
                    "bridge": self._bridged, "overlay": self._bridged}[pod.mode]
            iface = wire(pod, pp, pns)
        finally:
            pns.close()
        self.pods.append(iface)
        return iface

    def _veth(self, pod: str, pns: Netns, pod_ifname: str, mtu: int) -> str:
        host = f"lx-{pod}"
        self.ns.ipr.link("add", ifname=host, kind="veth", mtu=mtu,
                         peer={"ifname": pod_ifname, "net_ns_fd": pns.name, "mtu": mtu})
        return host

    def _pod_eth0(self, pns: Netns, pp: PodPlan, ifname: str = "eth0", default: bool = True) -> None:
        pns.up(ifname, mtu=pp.mtu)
        pns.addr(ifname, pp.ip, pp.prefixlen)
        if not default:
            return
        idx = pns.index(ifname)
        if pp.prefixlen == 32:
            pns.route(f"{pp.gateway}/32", oif=idx, scope=RT_SCOPE_LINK)
        pns.route("default", gateway=str(pp.gateway), oif=idx)

    def _routed(self, pod: Pod, pp: PodPlan, pns: Netns) -> PodIface:
        """veth (pod CIDR) and eni-policy-route (ENI secondary address + source policy routing)."""
        host = self._veth(pod.name, pns, "eth0", pp.mtu)
        idx = self.ns.up(host)
        self.ns.addr(host, ROUTED_GATEWAY, 32)
        self.ns.route(f"{pp.ip}/32", oif=idx, scope=RT_SCOPE_LINK)
        self._pod_eth0(pns, pp)
        if pod.mode == "eni-policy-route":
            # only what comes from the pod's veth: the same source seen again on eth0 must not loop
            self.ns.ipr.rule("add", table=ENI_TABLE_BASE + pp.nic, priority=POLICY_PRIORITY, src=str(pp.ip),
                             src_len=32, iifname=host)
        return PodIface(pod.name, host, pns.name, str(pp.ip), pod.mode)

    def _bridged(self, pod: Pod, pp: PodPlan, pns: Netns) -> PodIface:
        bridge = "cbr0" if pod.mode == "bridge" else "cni0"
        host = self._veth(pod.name, pns, "eth0", pp.mtu)
        idx = self.ns.up(host, master=self.ns.index(bridge))
        # Hairpin, as the CNI bridge plugin's hairpinMode and kubelet's hairpin-veth set it: a pod
        # reaching itself through a Service comes back, DNATed by br_netfilter, to the port it left
        # from; without it every such connection timed out.
        self.ns.ipr.brport("set", index=idx, mode=1)  # IFLA_BRPORT_MODE: hairpin
        self._pod_eth0(pns, pp)
        return PodIface(pod.name, host, pns.name, str(pp.ip), pod.mode)

    def _exclusive(self, pod: Pod, pp: PodPlan, pns: Netns) -> PodIface:
        """Move the ENI into the pod, plus a veth to the node for ClusterIP traffic (Terway)."""
        self.ns.move(f"eni{pp.nic}", pns, "eth0")
        self._pod_eth0(pns, pp)
        host = self._veth(pod.name, pns, "veth1", 1500)
        idx = self.ns.up(host)
        self.ns.addr(host, ROUTED_GATEWAY, 32)
        self.ns.route(f"{pp.ip}/32", oif=idx, scope=RT_SCOPE_LINK)
        vidx = pns.up("veth1")
        pns.route(f"{ROUTED_GATEWAY}/32", oif=vidx, scope=RT_SCOPE_LINK)
        pns.route(self.spec.service_cidr, gateway=str(ROUTED_GATEWAY), oif=vidx, prefsrc=str(pp.ip))
        return PodIface(pod.name, host, pns.name, str(pp.ip), pod.mode)

    def _slave(self, pod: Pod, pp: PodPlan, pns: Netns) -> PodIface:
        """macvlan / ipvlan slave of an ENI (or of eth0), created in the node and moved in."""
        parent = self.ns.index("eth0" if pp.nic == 0 else f"eni{pp.nic}")
        tmp = f"lx-{pod.name}"
        if pod.mode == "macvlan":
            self.ns.ipr.link("add", ifname=tmp, kind="macvlan", link=parent, macvlan_mode="bridge")
        else:
            self.ns.ipr.link("add", ifname=tmp, kind="ipvlan", link=parent, ipvlan_mode=IPVLAN_MODES[pod.ipvlan_mode])
        self.ns.move(tmp, pns, "eth0")
        if pod.mode == "eni-ipvlan" and pod.ipvlan_mode != "l2":
            self._pod_eth0(pns, pp, default=False)
            pns.route("default", oif=pns.index("eth0"))
        else:
            self._pod_eth0(pns, pp)
        # the node cannot talk to its own slaves directly: go round through the VPC router
        self.ns.route(f"{pp.ip}/32", gateway=str(self.plan.vpc_gateway), oif=self.ns.index("eth0"))
        return PodIface(pod.name, "", pns.name, str(pp.ip), pod.mode)


def pod_ifaces(spec: Spec, plan: AddressPlan, node_name: str, netns_of: Callable[[str], str]) -> tuple[PodIface, ...]:
    """A node's pods as datapaths see them: the node-side interface facing each pod (``lx-<pod>``;
    none for macvlan/ipvlan slaves, which hang off an ENI) and the pod's namespace and address."""
    node = next(n for n in spec.nodes if n.name == node_name)
    return tuple(PodIface(p.name, "" if p.mode in ("eni-ipvlan", "macvlan") else f"lx-{p.name}", netns_of(p.name),
                          str(plan.pods[p.name].ip), p.mode) for p in node.pods)


def vpc_routes(plan: AddressPlan) -> list[tuple[str, dict]]:
    """The VPC route table as (destination, {via NIC router-side name, gateway or on-link}) entries."""
    routes: list[tuple[str, dict]] = []
    for node in plan.nodes.values():
        for nic in node.nics:
            routes.append((f"{nic.ip}/32", {"dev": nic.router_ifname}))
        primary = node.primary
        routes.append((str(node.native_subnet), {"dev": primary.router_ifname, "gateway": str(primary.ip)}))
        if node.overlay_subnet is not None:
            routes.append((str(node.overlay_subnet), {"dev": primary.router_ifname, "gateway": str(primary.ip)}))
    for pod in plan.pods.values():
        if pod.nic is None or pod.mode == "eni-exclusive":
            continue
        nic = plan.nodes[pod.node].nics[pod.nic]
        if pod.mode == "macvlan":
            routes.append((f"{pod.ip}/32", {"dev": nic.router_ifname}))
        else:
            routes.append((f"{pod.ip}/32", {"dev": nic.router_ifname, "gateway": str(nic.ip)}))
    return routes


__all__ = ["Netns", "NodeWiring", "create_netns", "open_netns", "vpc_routes"]
