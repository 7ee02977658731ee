"""``eni-exclusive``: the ENI is moved into the pod, which has the ENI's own VPC address (Terway's
exclusive ENI mode). A veth ``veth1`` in the pod (``lx-<pod>`` on the node) carries only ClusterIP
traffic to the node, as Terway routes it, so that kube-proxy still sees the pod's Service traffic;
everything else leaves through the ENI and never crosses the node.
"""

from __future__ import annotations

from . import MODES
from .base import ROUTED_GATEWAY, RT_SCOPE_LINK, VPC_MTU, PodAddress, PodMode


class EniExclusive(PodMode):
    name = "eni-exclusive"
    # the hops a packet takes from the pod towards another node (plots.packet_paths): (layer, what)
    path = (("pod", "pod's stack: its eth0 is the ENI itself"), ("nic", "the ENI, onto the VPC"))
    order = 10
    short = "ex"
    color = "#1f77b4"
    summary = "an ENI of its own moved into the pod, with the ENI's VPC address (Terway exclusive ENI)"
    nic = "exclusive"
    pool = "nic"
    bypasses_node = True  # its own ENI: pod-to-pod traffic never crosses the node

    def address(self, pools, nic):
        return PodAddress(pools.nic_ip(nic), pools.vpc.prefixlen, pools.vpc_gateway, VPC_MTU)

    def eni_table_throws(self, pp):
        return [f"{pp.ip}/32"]  # reached over its lx- veth

    def wire(self, w, pod, pp, pns):
        w.ns.move(w.me.nics[pp.nic].ifname, pns, "eth0")
        w.pod_eth0(pns, pp)
        host = w.veth(pod.name, pns, "veth1", VPC_MTU)
        w.routed_host(host, pp)
        vidx = pns.up("veth1")
        pns.route(f"{ROUTED_GATEWAY}/32", oif=vidx, scope=RT_SCOPE_LINK)
        pns.route(w.spec.service_cidr, gateway=str(ROUTED_GATEWAY), oif=vidx, prefsrc=str(pp.ip))
        return host


MODES.register(EniExclusive())
