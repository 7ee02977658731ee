"""``eni-policy-route``: a routed veth to the node and a secondary VPC address of a shared ENI;
source-based policy routing sends the pod's traffic out of that ENI (Terway's shared-ENI veth mode).
"""

from __future__ import annotations

from . import MODES
from .base import ENI_TABLE_BASE, ROUTED_GATEWAY, VPC_MTU, PodAddress, RoutedVeth

POLICY_PRIORITY = 1000


class EniPolicyRoute(RoutedVeth):
    name = "eni-policy-route"
    path = (("pod", "pod's stack"), ("device", "veth pair"),
            ("node", "node's stack: ip rule → the ENI's table; netfilter"),
            ("nic", "the shared ENI, onto the VPC"))
    order = 30
    short = "pr"
    color = "#2ca02c"
    summary = "a routed veth with a secondary address of a shared ENI, policy-routed out of that ENI (Terway veth)"
    nic = "shared"
    pool = "vpc"

    def address(self, pools, nic):
        return PodAddress(pools.take_vpc(), 32, ROUTED_GATEWAY, VPC_MTU)

    def eni_table_throws(self, pp):
        return [f"{pp.ip}/32"]  # reached over its lx- veth

    def vpc_route(self, pp, nic):
        return {"dev": nic.router_ifname, "gateway": str(nic.ip)}

    def wire(self, w, pod, pp, pns):
        host = super().wire(w, pod, pp, pns)
        # only what comes from the pod's veth: the same source seen again on eth0 must not loop
        w.ns.ipr.rule("add", table=ENI_TABLE_BASE + pp.nic, priority=POLICY_PRIORITY, src=str(pp.ip), src_len=32,
                      iifname=host)
        return host


MODES.register(EniPolicyRoute())
