"""``veth``: a routed veth, gateway 169.254.1.1, an address from the node's pod subnet (Calico and
Cilium style).
"""

from __future__ import annotations

from . import MODES
from .base import ROUTED_GATEWAY, VPC_MTU, PodAddress, RoutedVeth


class Veth(RoutedVeth):
    name = "veth"
    path = (("pod", "pod's stack"), ("device", "veth pair"), ("node", "node's stack: routing, netfilter"),
            ("nic", "eth0, onto the VPC"))
    order = 40
    short = "ve"
    color = "#ff7f0e"
    summary = "a routed veth with an address from the node's pod subnet (Calico/Cilium style)"
    pool = "native"

    def address(self, pools, nic):
        return PodAddress(pools.take_native(), 32, ROUTED_GATEWAY, VPC_MTU)


MODES.register(Veth())
