"""``bridge``: a veth into the node bridge ``cbr0`` (kubenet), an address from the node's pod subnet.
``cbr0`` answers ARP for the subnet (``proxy_arp``) so that bridged pods reach routed-veth pods of the
same subnet.
"""

from __future__ import annotations

from . import MODES
from .base import VPC_MTU, BridgedVeth, PodAddress


class Bridge(BridgedVeth):
    name = "bridge"
    path = (("pod", "pod's stack"), ("device", "veth → the node's bridge"),
            ("node", "node's stack: bridge, routing, netfilter"), ("nic", "eth0, onto the VPC"))
    order = 50
    short = "br"
    color = "#bcbd22"
    summary = "a veth into the node bridge cbr0 with an address from the node's pod subnet (kubenet)"
    pool = "native"
    bridge = "cbr0"
    features = ("bridge",)

    def address(self, pools, nic):
        return PodAddress(pools.take_native(), pools.native.prefixlen, pools.native.network_address + 1, VPC_MTU)

    def prepare_node(self, w, local):
        if local:
            native = w.me.native_subnet
            w.add_bridge(self.bridge, native.network_address + 1, native.prefixlen, VPC_MTU)
            w.ns.sysctl({f"net.ipv4.conf.{self.bridge}.proxy_arp": 1})


MODES.register(Bridge())
