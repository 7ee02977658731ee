"""``netkit``: a netkit pair in L3 mode (kernel 6.7+; Cilium 1.16's replacement of the veth): the
primary device in the node (``lx-<pod>``), its peer as the pod's ``eth0``, routed like ``veth``
(gateway 169.254.1.1, an address from the node's pod subnet). A netkit device has no queue: what the
pod sends is received on the primary at once, on the pod's CPU, where a veth goes through a backlog
queue (Daniel Borkmann, "netkit: BPF-programmable network device", LPC 2023). L3 mode means no ARP
(``IFF_NOARP``); the frames still carry an Ethernet header (``ARPHRD_ETHER``), so labkit's tc programs
(``ebpf-tc``, the eBPF policy engine, eBPF host routing) run on it unchanged. They go into netkit's
own program lists rather than tc (:mod:`labkit.ebpf.tc` decides by the device's kind): what the pod
sends runs them in the pod's transmit (``BPF_NETKIT_PEER``), what goes into the pod in the primary's
(``BPF_NETKIT_PRIMARY``), each a BPF link pinned in the client's bpffs folder
(:mod:`labkit.ebpf.netkit`). That is where the device saves: host routing's redirect to eth0 happens
before the packet is queued anywhere, where a tc filter on a veth's node side runs only after the
veth's backlog.

pyroute2 (0.9) does not know the link kind: :func:`register_netlink` teaches it the attributes of
``include/uapi/linux/if_link.h`` (``IFLA_NETKIT_*``), the peer being an ``ifinfomsg`` with its own
attributes as a veth's peer is.
"""

from __future__ import annotations

from pyroute2.netlink import nla
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg, ifinfveth

from . import MODES
from .base import ROUTED_GATEWAY, VPC_MTU, PodAddress, RoutedVeth

NETKIT_L3 = 1  # enum netkit_mode: NETKIT_L2 = 0, NETKIT_L3 = 1
NETKIT_PASS = 0  # enum netkit_action: the default policy of both ends without a program


class netkit_data(nla):  # noqa: N801 - pyroute2's naming of link kinds
    prefix = "IFLA_"
    nla_map = (
        ("IFLA_NETKIT_UNSPEC", "none"),
        ("IFLA_NETKIT_PEER_INFO", "info_peer"),
        ("IFLA_NETKIT_PRIMARY", "uint8"),
        ("IFLA_NETKIT_POLICY", "uint32"),
        ("IFLA_NETKIT_PEER_POLICY", "uint32"),
        ("IFLA_NETKIT_MODE", "uint32"),
        ("IFLA_NETKIT_SCRUB", "uint32"),
        ("IFLA_NETKIT_PEER_SCRUB", "uint32"),
        ("IFLA_NETKIT_HEADROOM", "uint16"),
        ("IFLA_NETKIT_TAILROOM", "uint16"),
    )

    @staticmethod
    def info_peer(self, *argv, **kwarg):
        return ifinfveth


def register_netlink() -> None:
    """Teach pyroute2 the ``netkit`` link kind (idempotent)."""
    if "netkit" not in ifinfmsg.ifinfo.data_map:
        ifinfmsg.ifinfo.register_link_kind(module={"netkit": netkit_data})


def link_add_args(ifname: str, peer: str, peer_netns: str | None = None, mtu: int | None = None) -> dict:
    """pyroute2 ``link("add", **args)`` arguments of an L3 netkit pair ``ifname`` / ``peer`` (the peer
    in namespace ``peer_netns``), both ends passing packets (no program yet)."""
    register_netlink()
    attrs: list[list] = [["IFLA_IFNAME", peer]]
    if peer_netns:
        attrs.append(["IFLA_NET_NS_FD", peer_netns])
    if mtu:
        attrs.append(["IFLA_MTU", mtu])
    args = {"ifname": ifname, "kind": "netkit", "netkit_mode": NETKIT_L3, "netkit_policy": NETKIT_PASS,
            "netkit_peer_policy": NETKIT_PASS, "netkit_peer_info": {"attrs": attrs}}
    return {**args, "mtu": mtu} if mtu else args


class Netkit(RoutedVeth):
    name = "netkit"
    path = (("pod", "pod's stack"), ("device", "netkit peer → primary (its BPF program runs in the device)"),
            ("node", "node's stack: routing, netfilter"), ("nic", "eth0, onto the VPC"))
    order = 45
    short = "nk"
    color = "#e377c2"
    summary = "a netkit pair (L3, kernel 6.7+) routed like veth: Cilium 1.16's replacement of the veth"
    pool = "native"
    features = ("netkit",)

    def address(self, pools, nic):
        return PodAddress(pools.take_native(), 32, ROUTED_GATEWAY, VPC_MTU)

    def wire(self, w, pod, pp, pns):
        host = w.netkit(pod.name, pns, "eth0", pp.mtu)
        w.routed_host(host, pp)
        w.pod_eth0(pns, pp)
        return host


MODES.register(Netkit())
