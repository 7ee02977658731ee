"""Node-level wiring: pods in every network mode, node bridges, VXLAN, routes and rules. pyroute2 only.

This is the part of a lab that is the same on every backend: a node is a network namespace here and
a VM's own namespace on the ``vagrant`` backend; pods are namespaces inside it. The VPC fabric
(how node NICs and ENIs reach each other) belongs to the backend.

Names inside a node: ``eth0`` primary NIC, ``eni<k>`` ENIs, ``lx-<pod>`` the node side of a pod's veth;
node-wide objects of a mode are named in its module (bridges, the VXLAN device). Inside a pod:
``eth0``, and whatever else its mode adds.

How each pod is wired is its mode's business (:mod:`labkit.modes`): this module builds the node
(NICs, ENI routing tables, the node-wide objects modes ask for) and gives modes the small steps they
are made of (:meth:`NodeWiring.veth`, :meth:`NodeWiring.routed_host`, :meth:`NodeWiring.pod_eth0`,
:meth:`NodeWiring.add_bridge`).

Sysctls are written only inside the lab's namespaces: in a node ``net.ipv4.ip_forward=1``,
``rp_filter=0``, what a mode sets on its own objects (``proxy_arp`` on a bridge), in a pod the
kernel's default ARP settings (:data:`POD_SYSCTLS`, not the machine's), and
``net.bridge.bridge-nf-call-iptables=1`` where pods sit on a bridge (kube-proxy needs it for traffic
between two pods on one bridge).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from pyroute2 import IPRoute  # noqa: F401  (type of Netns.ipr)

from . import modes, naming, nsexec
from .addressing import AddressPlan, NodePlan, PodPlan
from .datapath.base import PodIface
from .modes.base import ENI_TABLE_BASE, ROUTED_GATEWAY, RT_SCOPE_LINK
from .spec import Node, Pod, Spec

IFA_F_NOPREFIXROUTE = 0x200
RTNH_F_ONLINK = 4
RTN_THROW = 9
# a pod's ARP behaviour is the kernel's default, whatever the machine's: a new namespace copies its
# IPv4 settings from the machine's own (net.core.devconf_inherit_init_net=0), and a VM node sets
# arp_ignore=1 there (its NICs share one segment), with which an exclusive-ENI pod never answers its
# node's ARP on veth1 (the address is on the ENI): the node then could not reach it
POD_SYSCTLS = {"net.ipv4.conf.all.arp_ignore": 0, "net.ipv4.conf.default.arp_ignore": 0,
               "net.ipv4.conf.all.arp_announce": 0, "net.ipv4.conf.default.arp_announce": 0}


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


def device_mac(lab: str, node: str, ifname: str) -> str:
    """The fixed, locally administered MAC of a device a node creates (bridges, the node side of veths),
    given at creation: a new device's random MAC is what udev's MACAddressPolicy=persistent replaces,
    some time after creation, racing with whatever labkit does next; a MAC set at creation is left alone."""
    digest = hashlib.sha1(f"{lab}/{node}/{ifname}".encode()).digest()
    return "0a:" + ":".join(f"{b:02x}" for b in digest[:5])


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

    def mac(self, ifname: str) -> str:
        return device_mac(self.spec.name, self.node.name, ifname)

    # ------------------------------------------------------------ node
    def setup_node(self) -> None:
        ns, me, vpc = self.ns, self.me, self.plan.vpc
        ns.ipr.link("set", index=1, state="up")
        ns.sysctl({"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0})
        ns.up("eth0", mtu=1500)
        ns.addr("eth0", me.primary.ip, vpc.prefixlen)
        if self.spec.backend == "hosts":
            # a host keeps its own default route (its management interface): the lab's traffic leaves
            # through the VPC NIC only for the pod CIDR (the service CIDR is DNATed before routing)
            ns.route(self.spec.pod_cidr, gateway=str(self.plan.vpc_gateway), oif=ns.index("eth0"))
        else:
            ns.route("default", gateway=str(self.plan.vpc_gateway), oif=ns.index("eth0"))
        exclusive = set(me.exclusive.values())
        # this node's own pod subnets, and pods it reaches over their node-side veth, go back from an
        # ENI's table to the main table: a reply that kube-proxy de-NATs here must not leave and come
        # back (it would arrive as a stray, INVALID packet)
        local = [str(s) for s in (me.native_subnet, me.overlay_subnet) if s]
        local += [t for p in self.node.pods for t in modes.get(p.mode).eni_table_throws(self.plan.pods[p.name])]
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
            for dst in local:
                ns.route(dst, table=table, type=RTN_THROW)
        here = {p.mode for p in self.node.pods}
        lab_modes = self.spec.modes()
        for name in (m for m in modes.names() if m in lab_modes):  # in registry order, every node alike
            modes.get(name).prepare_node(self, local=name in here)
        if any(modes.get(m).bridge for m in here):
            self._br_netfilter()

    def add_bridge(self, name: str, ip: IPv4Address, prefixlen: int, mtu: int) -> None:
        """A node bridge with an address (a mode's, e.g. kubenet's cbr0)."""
        self.ns.ipr.link("add", ifname=name, kind="bridge", address=self.mac(name))
        self.ns.up(name, mtu=mtu)
        self.ns.addr(name, ip, prefixlen)

    def _br_netfilter(self) -> None:
        try:
            self.ns.sysctl({"net.bridge.bridge-nf-call-iptables": 1})
        except FileNotFoundError:
            pass  # no br_netfilter: Service hairpin between two pods of one bridge is not DNATed back

    # ------------------------------------------------------------ pods
    def add_pod(self, pod: Pod) -> PodIface:
        pp = self.plan.pods[pod.name]
        name = self.pod_ns(pod.name)
        pns = create_netns(name, self.record)
        try:
            pns.sysctl(POD_SYSCTLS)
            host = modes.get(pod.mode).wire(self, pod, pp, pns)
        finally:
            pns.close()
        iface = PodIface(pod.name, host, name, str(pp.ip), pod.mode)
        self.pods.append(iface)
        return iface

    # ------------------------------------------------------------ steps modes are made of
    def veth(self, pod: str, pns: Netns, pod_ifname: str, mtu: int) -> str:
        """A veth pair: ``lx-<pod>`` here (down), ``pod_ifname`` in the pod. Returns the node side."""
        host = naming.node_iface(pod)
        self.ns.ipr.link("add", ifname=host, kind="veth", mtu=mtu, address=self.mac(host),
                         peer={"ifname": pod_ifname, "net_ns_fd": pns.name, "mtu": mtu})
        return host

    def netkit(self, pod: str, pns: Netns, pod_ifname: str, mtu: int) -> str:
        """An L3 netkit pair: the primary ``lx-<pod>`` here (down), its peer ``pod_ifname`` in the pod.
        Returns the node side."""
        from .modes.netkit import link_add_args

        host = naming.node_iface(pod)
        self.ns.ipr.link("add", **link_add_args(host, pod_ifname, pns.name, mtu))
        return host

    def routed_host(self, host: str, pp: PodPlan) -> int:
        """The node side of a routed veth: up, 169.254.1.1/32, a /32 route to the pod through it."""
        idx = self.ns.up(host)
        self.ns.addr(host, ROUTED_GATEWAY, 32)
        self.ns.route(f"{pp.ip}/32", oif=idx, scope=RT_SCOPE_LINK)
        return idx

    def pod_eth0(self, pns: Netns, pp: PodPlan, ifname: str = "eth0", default: bool = True) -> None:
        """The pod's address on ``ifname``, up, and (``default``) its default route via its gateway."""
        pns.up(ifname, mtu=pp.mtu)
        pns.addr(ifname, pp.ip, pp.prefixlen)
        if not default:
            return
        idx = pns.index(ifname)
        if pp.prefixlen == 32:
            pns.route(f"{pp.gateway}/32", oif=idx, scope=RT_SCOPE_LINK)
        pns.route("default", gateway=str(pp.gateway), oif=idx)


def pod_ifaces(spec: Spec, plan: AddressPlan, node_name: str, netns_of: Callable[[str], str]) -> tuple[PodIface, ...]:
    """A node's pods as datapaths see them: the node-side interface facing each pod (``lx-<pod>``;
    none for modes without one) and the pod's namespace and address."""
    node = next(n for n in spec.nodes if n.name == node_name)
    return tuple(PodIface(p.name, modes.get(p.mode).host_ifname(p.name), netns_of(p.name), str(plan.pods[p.name].ip),
                          p.mode) for p in node.pods)


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
        if pod.nic is None:
            continue
        via = modes.get(pod.mode).vpc_route(pod, plan.nodes[pod.node].nics[pod.nic])
        if via is not None:
            routes.append((f"{pod.ip}/32", via))
    return routes


__all__ = ["Netns", "NodeWiring", "POD_SYSCTLS", "create_netns", "device_mac", "open_netns", "vpc_routes"]
