"""What a pod mode is: :class:`PodMode`, and the three wirings the modes share.

A mode is a small class with class attributes (what it needs and allows) and four hooks called by
the node builder (:class:`labkit.topology.NodeWiring`) and the address plan (:mod:`labkit.addressing`):

- :meth:`PodMode.address`       the pod's address, prefix length, gateway and MTU, from the pools
- :meth:`PodMode.prepare_node`  node-wide objects the mode needs (a bridge, the VXLAN device)
- :meth:`PodMode.wire`          the pod's own interfaces, in its namespace and the node's
- :meth:`PodMode.vpc_route`     how the VPC router reaches the pod (ENI-addressed pods only)

Shared wirings, as Mininet derives ``TCIntf`` from ``Intf``: :class:`RoutedVeth` (a veth to the node,
routed, gateway 169.254.1.1), :class:`BridgedVeth` (a veth into a node bridge) and :class:`EniSlave`
(a macvlan/ipvlan slave of an ENI, moved into the pod).
"""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import TYPE_CHECKING, ClassVar, NamedTuple

from .. import naming

if TYPE_CHECKING:  # the builder and the plan call the hooks; modes only use what they pass in
    from ..addressing import AddressPools, NicPlan, PodPlan
    from ..spec import Pod
    from ..topology import Netns, NodeWiring

ROUTED_GATEWAY = IPv4Address("169.254.1.1")  # node side of routed veths, as Calico/Terway do
VPC_MTU = 1500
RT_SCOPE_LINK = 253
ENI_TABLE_BASE = 100  # a node's routing table of ENI k is 100 + k


class PodAddress(NamedTuple):
    ip: IPv4Address
    prefixlen: int  # on the pod's eth0
    gateway: IPv4Address
    mtu: int


class PodMode:
    """One pod network mode. Subclasses set the class attributes and implement :meth:`address` and
    :meth:`wire`; they register with ``@MODES.register``."""

    name: ClassVar[str]
    order: ClassVar[int]  # place in listings and charts (the study's order)
    short: ClassVar[str]  # two letters, for names derived from a mode (experiments' pod names)
    color: ClassVar[str]  # in every chart
    summary: ClassVar[str]  # one line: what the mode is
    # the node NIC the pod uses: "exclusive" (an ENI of its own, moved into the pod), "shared" (a
    # shared ENI; the spec's `eni` picks which), "shared-or-primary" (a shared ENI if the node has
    # one, else eth0), None (no NIC: the pod is behind the node)
    nic: ClassVar[str | None] = None
    # where the address comes from: "nic" (the ENI's own), "vpc" (a secondary VPC address),
    # "native" (the node's pod subnet), "overlay" (the node's overlay subnet)
    pool: ClassVar[str]
    node_iface: ClassVar[bool] = True  # a node-side interface lx-<pod> faces the pod
    bypasses_node: ClassVar[bool] = False  # pod-to-pod traffic never crosses the node's stack
    service_via_node: ClassVar[bool] = True  # ClusterIP traffic crosses the node's stack (kube-proxy sees it)
    bridge: ClassVar[str | None] = None  # the node bridge the pod's veth is a port of
    features: ClassVar[tuple[str, ...]] = ()  # `labkit doctor` names the mode needs
    kernel_modules: ClassVar[tuple[str, ...]] = ()  # loaded where modules exist (VM nodes)
    options: ClassVar[dict[str, tuple[str, ...]]] = {}  # Pod fields only this mode takes: allowed values
    # the kind of slave device the pod is on its NIC ("ipvlan", "macvlan"): Linux allows one kind of
    # slave per parent device, so pods of different kinds need different ENIs
    slave_kind: ClassVar[str | None] = None
    # the hops a packet takes from the pod towards a pod on another node, as (layer, what) with layer
    # "pod", "device", "node" (the node's routing and netfilter), "bpf" or "nic" (plots.packet_paths)
    path: ClassVar[tuple[tuple[str, str], ...]] = ()

    # ---------------------------------------------------------------- planning
    def address(self, pools: AddressPools, nic: int | None) -> PodAddress:
        """The pod's address from ``pools`` (``nic``: the node NIC it takes, see :attr:`nic`)."""
        raise NotImplementedError

    def eni_table_throws(self, pp: PodPlan) -> list[str]:
        """Destinations an ENI's policy routing table sends back to the main table because the node
        reaches them over the pod's node-side veth (a reply de-NATed on the node must not leave)."""
        return []

    def vpc_route(self, pp: PodPlan, nic: NicPlan) -> dict | None:
        """How the VPC router reaches this pod, if by a route of its own: ``{"dev": router-side
        interface, "gateway": …}`` (on-link without a gateway)."""
        return None

    def served_by(self, datapath) -> bool:
        """Whether Service datapath class ``datapath`` load-balances this pod's ClusterIP traffic:
        node-level datapaths (kube-proxy) see only what crosses the node; per-pod ones (eBPF in the
        pod's cgroup or on its own interface) see every pod."""
        scope = getattr(datapath, "scope", "node")
        return scope == "pod" or (scope == "node" and self.service_via_node)

    # ---------------------------------------------------------------- building
    def prepare_node(self, w: NodeWiring, local: bool) -> None:
        """Node-wide objects, once per node for every mode the lab has (``local``: this node has pods
        of this mode)."""

    def wire(self, w: NodeWiring, pod: Pod, pp: PodPlan, pns: Netns) -> str:
        """Wire ``pod`` (namespace ``pns``, already made) to its node; returns its node-side interface
        (``""`` when :attr:`node_iface` is false)."""
        raise NotImplementedError

    def host_ifname(self, pod: str) -> str:
        return naming.node_iface(pod) if self.node_iface else ""

    def __repr__(self) -> str:
        return f"<pod mode {self.name}>"


class RoutedVeth(PodMode):
    """A veth to the node, routed: the node side holds 169.254.1.1/32 and a /32 route to the pod."""

    def wire(self, w: NodeWiring, pod: Pod, pp: PodPlan, pns: Netns) -> str:
        host = w.veth(pod.name, pns, "eth0", pp.mtu)
        w.routed_host(host, pp)
        w.pod_eth0(pns, pp)
        return host


class BridgedVeth(PodMode):
    """A veth into the node bridge :attr:`bridge`, in hairpin mode."""

    def wire(self, w: NodeWiring, pod: Pod, pp: PodPlan, pns: Netns) -> str:
        host = w.veth(pod.name, pns, "eth0", pp.mtu)
        idx = w.ns.up(host, master=w.ns.index(self.bridge))
        # Hairpin, as the CNI bridge plugin's hairpinMode and kubelet's hairpin-veth set it: a pod
        # reaching itself through a Service comes back, DNATed by br_netfilter, to the port it left
        # from; without it every such connection timed out.
        w.ns.ipr.brport("set", index=idx, mode=1)  # IFLA_BRPORT_MODE: hairpin
        w.pod_eth0(pns, pp)
        return host


class EniSlave(PodMode):
    """A slave device of the pod's NIC, made in the node and moved into the pod. The node cannot talk
    to its own slaves directly (Linux keeps a parent and its slaves apart), so it routes to them round
    through the VPC router."""

    node_iface = False
    bypasses_node = True
    service_via_node = False  # leaves through its ENI: the node's netfilter never sees it

    def link_args(self, pod: Pod) -> dict:
        """pyroute2 ``link("add")`` arguments of the slave device."""
        raise NotImplementedError

    def default_on_link(self, pod: Pod) -> bool:
        """Whether the pod's default route is on-link (an L3 slave has no neighbours to ARP)."""
        return False

    def address(self, pools: AddressPools, nic: int | None) -> PodAddress:
        # /32 and everything via the VPC gateway (as AWS's VPC CNI does): neighbours on the same ENI
        # would be ARPed on-link and never answer
        return PodAddress(pools.take_vpc(), 32, pools.vpc_gateway, VPC_MTU)

    def wire(self, w: NodeWiring, pod: Pod, pp: PodPlan, pns: Netns) -> str:
        parent = w.ns.index(w.me.nics[pp.nic].ifname)
        tmp = naming.node_iface(pod.name)
        w.ns.ipr.link("add", ifname=tmp, link=parent, **self.link_args(pod))
        w.ns.move(tmp, pns, "eth0")
        if self.default_on_link(pod):
            w.pod_eth0(pns, pp, default=False)
            pns.route("default", oif=pns.index("eth0"))
        else:
            w.pod_eth0(pns, pp)
        w.ns.route(f"{pp.ip}/32", gateway=str(w.plan.vpc_gateway), oif=w.ns.index("eth0"))
        return ""


__all__ = ["PodMode", "PodAddress", "RoutedVeth", "BridgedVeth", "EniSlave", "ROUTED_GATEWAY", "VPC_MTU", "ENI_TABLE_BASE"]
