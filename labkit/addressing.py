"""The address plan of a lab: which address every NIC, ENI and pod gets. Pure; deterministic.

The VPC (``vpc_cidr``) is the cloud network. Its first host address is the VPC gateway (the virtual
router). From host address 10 on, in node order: the node's primary NIC, its ENIs' primary
addresses, then one secondary address per pod of a mode that takes one (``PodMode.pool == "vpc"``).

Pod-CIDR pods get addresses from per-node subnets of ``pod_cidr`` (``/node_pod_prefix`` each):
node *i* (0-based) owns the *native* subnet number *i* (routed by the VPC route table to the node's
primary address, for pods of the ``native`` pool) and, when the lab has overlay pods, the *overlay*
subnet number ``len(nodes) + i`` (routed only through VXLAN, Flannel style). In a native subnet ``.1``
is the node bridge's address and pods start at ``.2``; in an overlay subnet ``.0`` is the node's VXLAN
address, ``.1`` the overlay bridge's and pods start at ``.2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from . import modes
from .spec.types import Node, Pod, Spec

VPC_FIRST_HOST = 10
POD_FIRST_HOST = 2


@dataclass(frozen=True)
class NicPlan:
    """A node NIC on the VPC: ``index`` 0 is the primary NIC (``eth0``), k ≥ 1 is ENI k (``eni<k>``)."""

    node: str
    index: int
    ip: IPv4Address

    @property
    def ifname(self) -> str:
        return "eth0" if self.index == 0 else f"eni{self.index}"

    @property
    def router_ifname(self) -> str:
        """This NIC's peer interface inside the VPC router namespace."""
        return f"{self.node}-e{self.index}"


@dataclass(frozen=True)
class PodPlan:
    node: str
    name: str
    mode: str
    ip: IPv4Address
    prefixlen: int  # on the pod's eth0
    gateway: IPv4Address
    nic: int | None  # node NIC the pod hangs off (modes with a NIC: see PodMode.nic)
    mtu: int


@dataclass(frozen=True)
class NodePlan:
    name: str
    index: int
    nics: tuple[NicPlan, ...]
    native_subnet: IPv4Network
    overlay_subnet: IPv4Network | None
    exclusive: dict[str, int]  # pod with an ENI of its own -> ENI index it takes

    @property
    def primary(self) -> NicPlan:
        return self.nics[0]

    @property
    def vxlan_mac(self) -> str:
        return "02:6c:6b:%02x:%02x:%02x" % ((self.index >> 16) & 0xFF, (self.index >> 8) & 0xFF, self.index & 0xFF)


@dataclass(frozen=True)
class AddressPlan:
    vpc: IPv4Network
    vpc_gateway: IPv4Address
    pod_cidr: IPv4Network
    nodes: dict[str, NodePlan]
    pods: dict[str, PodPlan]


@dataclass
class AddressPools:
    """Where a node's pods take addresses from, in the order they are planned (what a mode's
    :meth:`~labkit.modes.base.PodMode.address` draws on)."""

    vpc: IPv4Network
    vpc_gateway: IPv4Address
    nics: tuple[NicPlan, ...]
    native: IPv4Network
    overlay: IPv4Network | None
    next_vpc: int  # the next secondary VPC address (an int), shared by every node
    _hosts: dict[str, int] = field(default_factory=lambda: {"native": POD_FIRST_HOST, "overlay": POD_FIRST_HOST})

    def nic_ip(self, nic: int) -> IPv4Address:
        return self.nics[nic].ip

    def take_vpc(self) -> IPv4Address:
        ip = IPv4Address(self.next_vpc)
        self.next_vpc += 1
        return ip

    def _take(self, pool: str, net: IPv4Network | None) -> IPv4Address:
        ip = net.network_address + self._hosts[pool]
        self._hosts[pool] += 1
        return ip

    def take_native(self) -> IPv4Address:
        return self._take("native", self.native)

    def take_overlay(self) -> IPv4Address:
        return self._take("overlay", self.overlay)


def _subnet(net: IPv4Network, prefix: int, k: int) -> IPv4Network:
    size = 1 << (32 - prefix)
    return IPv4Network((int(net.network_address) + k * size, prefix))


def default_nic(node: Node, pod: Pod) -> int | None:
    """The node NIC a pod uses: its own ENI (exclusive), the chosen or first shared ENI, else eth0
    (see :attr:`labkit.modes.base.PodMode.nic`)."""
    kind = modes.get(pod.mode).nic
    if kind is None:
        return None
    exclusive = [p.name for p in node.pods if modes.get(p.mode).nic == "exclusive"]
    if kind == "exclusive":
        return exclusive.index(pod.name) + 1
    if pod.eni is not None:
        return pod.eni
    first_shared = len(exclusive) + 1
    if first_shared <= node.enis:
        return first_shared
    return 0  # a "shared-or-primary" pod without a shared ENI hangs off the primary NIC


def has_overlay(spec: Spec) -> bool:
    """Whether some pod takes an overlay address (then every node gets an overlay subnet)."""
    return any(modes.get(m).pool == "overlay" for m in spec.modes())


def plan(spec: Spec) -> AddressPlan:
    vpc = IPv4Network(spec.vpc_cidr)
    pod_cidr = IPv4Network(spec.pod_cidr)
    gateway = vpc.network_address + 1
    nxt = int(vpc.network_address) + VPC_FIRST_HOST
    overlay = has_overlay(spec)
    nodes: dict[str, NodePlan] = {}
    pods: dict[str, PodPlan] = {}
    n_nodes = len(spec.nodes)
    for i, node in enumerate(spec.nodes):
        nics = tuple(NicPlan(node.name, k, IPv4Address(nxt + k)) for k in range(node.enis + 1))
        pools = AddressPools(vpc, gateway, nics, _subnet(pod_cidr, spec.node_pod_prefix, i),
                             _subnet(pod_cidr, spec.node_pod_prefix, n_nodes + i) if overlay else None,
                             nxt + len(nics))
        exclusive = {}
        for pod in node.pods:
            mode = modes.get(pod.mode)
            nic = default_nic(node, pod)
            if mode.nic == "exclusive":
                exclusive[pod.name] = nic
            ip, plen, gw, mtu = mode.address(pools, nic)
            pods[pod.name] = PodPlan(node.name, pod.name, pod.mode, ip, plen, gw, nic, mtu)
        nxt = pools.next_vpc
        nodes[node.name] = NodePlan(node.name, i, nics, pools.native, pools.overlay, exclusive)
    return AddressPlan(vpc, gateway, pod_cidr, nodes, pods)


def exhaustion_problems(spec: Spec) -> list[tuple[str, str]]:
    """Address exhaustion, found by counting (cheap even for huge specs)."""
    problems = []
    vpc = IPv4Network(spec.vpc_cidr)
    pod_cidr = IPv4Network(spec.pod_cidr)
    pools = {name: modes.get(name).pool for name in spec.modes()}
    need_vpc = sum(n.enis + 1 + sum(pools[p.mode] == "vpc" for p in n.pods) for n in spec.nodes)
    have_vpc = vpc.num_addresses - VPC_FIRST_HOST - 1
    if need_vpc > have_vpc:
        problems.append(("vpc_cidr", f"{vpc} has {max(have_vpc, 0)} usable addresses for NICs and ENI pods but the "
                                     f"lab needs {need_vpc}; use a larger vpc_cidr"))
    overlay = "overlay" in pools.values()
    subnets_needed = len(spec.nodes) * (2 if overlay else 1)
    subnets_have = 1 << (spec.node_pod_prefix - pod_cidr.prefixlen)
    if subnets_needed > subnets_have:
        problems.append(("pod_cidr", f"{pod_cidr} splits into {subnets_have} /{spec.node_pod_prefix} node subnets but "
                                     f"{len(spec.nodes)} nodes need {subnets_needed}"
                                     + (" (a native and an overlay subnet each)" if overlay else "")
                                     + "; use a larger pod_cidr or a longer node_pod_prefix"))
    per_subnet = (1 << (32 - spec.node_pod_prefix)) - POD_FIRST_HOST - 1
    for ni, node in enumerate(spec.nodes):
        for kind in ("native", "overlay"):
            count = sum(pools[p.mode] == kind for p in node.pods)
            if count > per_subnet:
                problems.append((f"nodes[{ni}].pods", f"{count} {kind} pods do not fit a /{spec.node_pod_prefix} "
                                                      f"node subnet ({per_subnet} addresses); lower node_pod_prefix"))
    return problems


def service_ips(spec: Spec):
    """ClusterIPs for every service in spec order: explicit ``cluster_ip`` kept, others allocated in
    order from ``service_cidr`` starting at its 10th address (``.1`` is the API server's by custom)."""
    net = IPv4Network(spec.service_cidr)
    taken = {IPv4Address(s.cluster_ip) for s in spec.services if s.cluster_ip}
    nxt = int(net.network_address) + 10
    last = int(net.broadcast_address)

    def alloc() -> IPv4Address:
        nonlocal nxt
        while True:
            if nxt >= last:
                nxt = int(net.network_address) + 2
            ip = IPv4Address(nxt)
            nxt += 1
            if ip not in taken:
                taken.add(ip)
                return ip

    for svc in spec.services:
        if svc.bulk:
            yield svc, [alloc() for _ in range(svc.count)]
        else:
            yield svc, [IPv4Address(svc.cluster_ip) if svc.cluster_ip else alloc()]


__all__ = ["AddressPlan", "AddressPools", "NodePlan", "NicPlan", "PodPlan", "plan", "default_nic", "has_overlay",
           "exhaustion_problems", "service_ips"]
