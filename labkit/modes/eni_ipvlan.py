"""``eni-ipvlan``: an IPVLAN slave (``l2``, ``l3`` or ``l3s``: the pod's ``ipvlan_mode``) of a shared
ENI, with a secondary VPC address (Terway's shared-ENI IPVLAN mode). Its traffic leaves through the
ENI directly: the node's netfilter never sees it, so kube-proxy cannot serve its Services (Terway
solved that with eBPF on the slave, as labkit's eBPF datapaths do).
"""

from __future__ import annotations

from . import MODES
from .base import EniSlave

IPVLAN_MODES = {"l2": 0, "l3": 1, "l3s": 2}


class EniIpvlan(EniSlave):
    name = "eni-ipvlan"
    path = (("pod", "pod's stack"), ("device", "ipvlan slave → its ENI (L2 switch in the driver)"),
            ("nic", "the shared ENI, onto the VPC"))
    order = 20
    short = "iv"
    color = "#17becf"
    summary = "an IPVLAN slave of a shared ENI with a secondary VPC address (Terway shared ENI + IPVLAN)"
    nic = "shared"
    pool = "vpc"
    features = ("ipvlan",)
    kernel_modules = ("ipvlan",)
    slave_kind = "ipvlan"
    options = {"ipvlan_mode": tuple(IPVLAN_MODES)}

    def link_args(self, pod):
        return {"kind": "ipvlan", "ipvlan_mode": IPVLAN_MODES[pod.ipvlan_mode]}

    def default_on_link(self, pod):
        return pod.ipvlan_mode != "l2"

    def vpc_route(self, pp, nic):
        return {"dev": nic.router_ifname, "gateway": str(nic.ip)}  # the slave shares the ENI's MAC


MODES.register(EniIpvlan())
