"""Every name a Vagrant lab uses on the host, and its folder.

``P`` = ``lk-<lab>``, ``h`` = 8 hex digits of a hash of the lab name (bridge and veth names must fit
15 characters): libvirt networks ``P.mgmt`` (bridge ``lkm<h>``) and ``P.vpc`` (bridge ``lkv<h>``), the
VPC router namespace ``P.vpc`` joined by veth ``lkr<h>``, domains ``P.<node>``, the lab's Vagrant folder
``/run/labkit/<lab>/vagrant``. MACs are fixed per node and NIC, so labkit knows every VM's addresses
before Vagrant does.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from pathlib import Path

from ... import naming
from ...errors import BackendError
from ...state import LabState


class VmNames:
    """Every name a vagrant lab uses on the host."""

    def __init__(self, lab: str):
        self.lab = lab
        self.prefix = naming.lab_prefix(lab)
        h = hashlib.sha1(lab.encode()).hexdigest()[:8]
        self.mgmt_net, self.vpc_net = f"{self.prefix}.mgmt", f"{self.prefix}.vpc"
        self.mgmt_bridge, self.vpc_bridge, self.router_veth = f"lkm{h}", f"lkv{h}", f"lkr{h}"
        self.router_ns = naming.netns_name(lab, "vpc")
        self.domain_prefix = f"{self.prefix}."

    def domain(self, node: str) -> str:
        return f"{self.domain_prefix}{node}"

    @staticmethod
    def mac(node_index: int, nic: int) -> str:
        """VPC NIC MACs: 52:54:00 (QEMU's OUI), 0x6c ('l'), node index, NIC index."""
        return "52:54:00:6c:%02x:%02x" % (node_index & 0xFF, nic & 0xFF)

    @staticmethod
    def mgmt_mac(node_index: int) -> str:
        """Management NIC MACs: 52:54:00, 0x6d ('m'), node index, 0."""
        return "52:54:00:6d:%02x:00" % (node_index & 0xFF)


def vagrant_dir(lab: str) -> Path:
    return LabState(lab).dir / "vagrant"


def vagrantfile_source() -> Path:
    here = Path(__file__).resolve()  # labkit/backends/vagrant/names.py
    for cand in (here.parents[3] / "vagrant" / "Vagrantfile", here.parents[2] / "_vagrant" / "Vagrantfile"):
        if cand.exists():
            return cand
    raise BackendError("vagrant/Vagrantfile not found next to the labkit package")


def mgmt_ip(mgmt: ipaddress.IPv4Network, node_index: int) -> ipaddress.IPv4Address:
    """The fixed management address of the ``node_index``-th VM (DHCP host entry)."""
    return mgmt.network_address + 10 + node_index


def host_routes() -> list[ipaddress.IPv4Network]:
    """The destinations of this host's IPv4 routes, every table (netlink, as ``ip route show table all``)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [ipaddress.IPv4Network(f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}", strict=False)
                for r in ipr.route("dump", family=socket.AF_INET)]


def pick_mgmt_subnet(lab: str, used: list[ipaddress.IPv4Network] | None = None) -> ipaddress.IPv4Network:
    """A /24 in 192.168.100-199.0 for a lab's management network (the hash of its name first) that no
    route of this host (``used``, default :func:`host_routes`; default routes aside) overlaps."""
    used = host_routes() if used is None else used
    start = int(hashlib.sha1(lab.encode()).hexdigest(), 16) % 100
    for k in range(100):
        net = ipaddress.IPv4Network(f"192.168.{100 + (start + k) % 100}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise BackendError("no free /24 in 192.168.100.0-192.168.199.0 for the management network")
