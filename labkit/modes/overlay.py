"""``overlay``: a veth into the node bridge ``cni0``, an address from the node's overlay subnet;
other nodes' overlay subnets are reached through the VXLAN device ``vxlan0`` (VNI 1, UDP 8472, MTU
1450) with static FDB and ARP entries, as Flannel programs them (``cni0`` / ``flannel.1``).

Every node of a lab with overlay pods gets ``vxlan0`` (so that it can reach the others' pods); only
nodes with overlay pods get ``cni0``.
"""

from __future__ import annotations

from . import MODES
from .base import VPC_MTU, BridgedVeth, PodAddress

VXLAN_PORT = 8472  # Flannel's
VXLAN_VNI = 1
VXLAN_OVERHEAD = 50
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 4


class Overlay(BridgedVeth):
    name = "overlay"
    path = (("pod", "pod's stack"), ("device", "veth → the node's bridge"),
            ("node", "node's stack: routing, netfilter"), ("device", "vxlan0: UDP/VXLAN encapsulation (+50 bytes)"), ("node", "node's stack again: the outer packet"),
            ("nic", "eth0, onto the VPC"))
    order = 60
    short = "ov"
    color = "#d62728"
    summary = "a veth into cni0 with an overlay-subnet address, VXLAN between nodes (Flannel)"
    pool = "overlay"
    bridge = "cni0"
    features = ("vxlan", "bridge")
    kernel_modules = ("vxlan",)

    def address(self, pools, nic):
        over = pools.overlay
        return PodAddress(pools.take_overlay(), over.prefixlen, over.network_address + 1, VPC_MTU - VXLAN_OVERHEAD)

    def prepare_node(self, w, local):
        self._vxlan(w)
        if local:
            over = w.me.overlay_subnet
            w.add_bridge(self.bridge, over.network_address + 1, over.prefixlen, VPC_MTU - VXLAN_OVERHEAD)

    @staticmethod
    def _vxlan(w) -> None:
        ns, me = w.ns, w.me
        # the MAC the other nodes' FDB and ARP entries name, given at creation: a MAC set afterwards loses
        # a race with udev (systemd's MACAddressPolicy=persistent replaces a new device's random MAC,
        # as it did to Flannel's flannel.1; seen in the VM lab: cross-node overlay traffic black-holed)
        ns.ipr.link("add", ifname="vxlan0", kind="vxlan", vxlan_id=VXLAN_VNI, vxlan_local=str(me.primary.ip),
                    vxlan_port=VXLAN_PORT, vxlan_learning=0, vxlan_link=ns.index("eth0"), address=me.vxlan_mac)
        ns.up("vxlan0", mtu=VPC_MTU - VXLAN_OVERHEAD)
        ns.addr("vxlan0", me.overlay_subnet.network_address, 32)
        vx = ns.index("vxlan0")
        for other in w.plan.nodes.values():
            if other.name == me.name:
                continue
            gw = str(other.overlay_subnet.network_address)
            ns.ipr.neigh("add", dst=gw, lladdr=other.vxlan_mac, ifindex=vx, state=NUD_PERMANENT)
            ns.ipr.fdb("add", ifindex=vx, lladdr=other.vxlan_mac, dst=str(other.primary.ip))
            ns.route(str(other.overlay_subnet), gateway=gw, oif=vx, flags=RTNH_F_ONLINK)


MODES.register(Overlay())
