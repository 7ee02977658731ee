"""``macvlan``: a macvlan slave (bridge mode) of a shared ENI, or of ``eth0`` when the node has no
shared ENI, with a VPC address (the classic macvlan CNI on a cloud NIC). Like IPVLAN, its traffic
leaves through the parent directly and the node's netfilter never sees it.
"""

from __future__ import annotations

from . import MODES
from .base import EniSlave


class Macvlan(EniSlave):
    name = "macvlan"
    path = (("pod", "pod's stack"), ("device", "macvlan slave → its ENI (bridge mode)"),
            ("nic", "the shared ENI, onto the VPC"))
    order = 70
    short = "mv"
    color = "#9467bd"
    summary = "a macvlan slave (bridge mode) of a shared ENI, or of eth0, with a VPC address"
    nic = "shared-or-primary"
    pool = "vpc"
    features = ("macvlan",)
    kernel_modules = ("macvlan",)
    slave_kind = "macvlan"

    def link_args(self, pod):
        return {"kind": "macvlan", "macvlan_mode": "bridge"}

    def vpc_route(self, pp, nic):
        return {"dev": nic.router_ifname}  # its own MAC on the NIC's segment: on-link


MODES.register(Macvlan())
