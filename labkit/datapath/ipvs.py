"""kube-proxy's IPVS mode (``pkg/proxy/ipvs/proxier.go``): IPVS virtual servers plus ipset-based
iptables rules, inside the node.

What it creates on the node (its own namespace, or the VM that is the node):
  * dummy interface ``kube-ipvs0`` holding every ClusterIP as a /32 (left down, as kube-proxy does:
    the addresses only need to be local for IPVS to see the traffic);
  * one IPVS virtual server per service port (``-s rr``), real servers in NAT mode (``-m``, weight 1);
  * ipsets ``KUBE-CLUSTER-IP`` (hash:ip,port: ClusterIP,proto:port), ``KUBE-LOOP-BACK``
    (hash:ip,port,ip: endpoint,proto:port,endpoint, for hairpin), ``KUBE-IPVS-IPS`` (hash:ip: the
    addresses on kube-ipvs0), and the empty sets the fixed rules reference;
  * iptables (nat, filter): ``KUBE-SERVICES`` marks ``! -s <cluster CIDR>`` traffic matching
    ``--match-set KUBE-CLUSTER-IP dst,dst`` for masquerade and accepts it; ``KUBE-POSTROUTING``
    masquerades hairpin traffic (``KUBE-LOOP-BACK dst,dst,src``) and marked traffic; the filter
    chains (``KUBE-FORWARD``, ``KUBE-IPVS-FILTER`` …) as kube-proxy writes them;
  * sysctls kube-proxy sets, written only in the node: ``net.ipv4.vs.conntrack=1`` (so iptables
    masquerade sees IPVS-forwarded flows), ``expire_nodest_conn=1``, ``expire_quiescent_template=1``,
    ``net.ipv4.ip_forward=1``.
A service without endpoints is a virtual server without real servers: IPVS drops its SYNs (kube-proxy
behaves the same; it has no REJECT in IPVS mode).

Renderers are pure (``render_ipvsadm``, ``render_ipset``, ``render_iptables``); the datapath applies
``ipset restore`` then ``ipvsadm -R`` then ``iptables-restore --noflush``. (Not Debian's
``ipvsadm-restore``: that script runs ``ipvsadm -C`` first, so a diff applied through it would leave
only the services it adds.) IPVS has no
transactions: ``render_ipvsadm`` diffs against the state read from ``ipvsadm-save`` (kube-proxy
does the same through netlink), so a failed apply leaves earlier services in place and the base class
forces a full sync next time. Preflight needs ``ip_vs`` (absent from this host's kernel: use the VM
backend; ``labkit doctor`` says so).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import ClassVar

from .. import nsexec
from ..services import ServiceTable, TableDiff
from .base import Datapath, register
from .iptables import MASQ_MARK, Jump, SavedTable, parse_save, render_cleanup

DUMMY = "kube-ipvs0"
SCHEDULER = "rr"
SYSCTLS = {
    "net.ipv4.vs.conntrack": 1,
    "net.ipv4.vs.expire_nodest_conn": 1,
    "net.ipv4.vs.expire_quiescent_template": 1,
    "net.ipv4.ip_forward": 1,
}

# name -> (type, comment used in rules); kube-proxy's ipsetInfo (the ones a ClusterIP lab uses or
# that the fixed rules reference)
IPSETS = {
    "KUBE-LOOP-BACK": ("hash:ip,port,ip", "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    "KUBE-CLUSTER-IP": ("hash:ip,port", "Kubernetes service cluster ip + port for masquerade purpose"),
    "KUBE-EXTERNAL-IP": ("hash:ip,port", "Kubernetes service external ip + port for masquerade and filter purpose"),
    "KUBE-EXTERNAL-IP-LOCAL": ("hash:ip,port", "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    "KUBE-LOAD-BALANCER": ("hash:ip,port", "Kubernetes service lb portal"),
    "KUBE-HEALTH-CHECK-NODE-PORT": ("bitmap:port", "Kubernetes health check node port"),
    "KUBE-IPVS-IPS": ("hash:ip", "Kubernetes all IPVS IPs"),
}

NAT_CHAINS = ("KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER", "KUBE-MARK-MASQ")
FILTER_CHAINS = ("KUBE-FORWARD", "KUBE-NODE-PORT", "KUBE-PROXY-FIREWALL", "KUBE-SOURCE-RANGES-FIREWALL",
                 "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER")
JUMPS = (  # kube-proxy's iptablesJumpChain for IPVS mode, prepended in this order
    Jump("nat", "OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
    Jump("nat", "PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
    Jump("nat", "POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
    Jump("filter", "FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules"),
    Jump("filter", "INPUT", "KUBE-NODE-PORT", "kubernetes health check rules"),
    Jump("filter", "INPUT", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    Jump("filter", "FORWARD", "KUBE-PROXY-FIREWALL", "kube-proxy firewall rules"),
    Jump("filter", "INPUT", "KUBE-IPVS-FILTER", "kubernetes ipvs access filter"),
    Jump("filter", "OUTPUT", "KUBE-IPVS-OUT-FILTER", "kubernetes ipvs access filter"),
)

_FLAG = {"tcp": "-t", "udp": "-u", "sctp": "--sctp-service"}


# ---------------------------------------------------------------- IPVS

VirtualServers = Mapping[tuple[str, str], tuple[str, ...]]  # (proto, "vip:port") -> ("ip:port" real servers)


def virtual_servers(table: ServiceTable) -> dict[tuple[str, str], tuple[str, ...]]:
    return {(sp.proto, f"{sp.cluster_ip}:{sp.port}"): tuple(f"{ep.ip}:{ep.port}" for ep in sp.endpoints)
            for sp in table}


def parse_ipvsadm_save(text: str) -> dict[tuple[str, str], tuple[str, ...]]:
    """``ipvsadm-save -n`` output as virtual servers and their real servers."""
    flags = {v: k for k, v in _FLAG.items()}
    found: dict[tuple[str, str], list[str]] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 3 and f[0] == "-A":
            found.setdefault((flags[f[1]], f[2]), [])
        elif len(f) >= 5 and f[0] == "-a":
            found.setdefault((flags[f[1]], f[2]), []).append(f[4])
    return {k: tuple(v) for k, v in found.items()}


def render_ipvsadm(current: VirtualServers, desired: VirtualServers) -> str:
    """``ipvsadm-restore`` input turning ``current`` into ``desired`` (kube-proxy's per-service
    add / update / delete of virtual and real servers), in ``desired`` order."""
    out = [f"-D {_FLAG[p]} {vs}" for (p, vs) in current if (p, vs) not in desired]
    for (p, vs), reals in desired.items():
        have = current.get((p, vs))
        if have is None:
            out.append(f"-A {_FLAG[p]} {vs} -s {SCHEDULER}")
            have = ()
        out += [f"-d {_FLAG[p]} {vs} -r {rs}" for rs in have if rs not in reals]
        out += [f"-a {_FLAG[p]} {vs} -r {rs} -m -w 1" for rs in reals if rs not in have]
    return "\n".join(out) + "\n" if out else ""


# ---------------------------------------------------------------- ipsets

def _set_entries(table: ServiceTable) -> dict[str, list[str]]:
    entries: dict[str, list[str]] = {name: [] for name in IPSETS}
    for sp in table:
        entries["KUBE-CLUSTER-IP"].append(f"{sp.cluster_ip},{sp.proto}:{sp.port}")
        entries["KUBE-IPVS-IPS"].append(sp.cluster_ip)
        for ep in sp.endpoints:
            entries["KUBE-LOOP-BACK"].append(f"{ep.ip},{sp.proto}:{ep.port},{ep.ip}")
    return {k: list(dict.fromkeys(v)) for k, v in entries.items()}


def _create(name: str) -> str:
    typ = IPSETS[name][0]
    opts = "range 0-65535" if typ.startswith("bitmap") else "family inet hashsize 1024 maxelem 65536"
    return f"create {name} {typ} {opts} -exist"


def render_ipset(table: ServiceTable, old: ServiceTable | None = None) -> str:
    """``ipset restore`` input: with ``old`` None every set is created, flushed and filled;
    otherwise only the entries that differ are added or deleted."""
    new = _set_entries(table)
    if old is None:
        out = []
        for name, items in new.items():
            out += [_create(name), f"flush {name}", *(f"add {name} {e}" for e in items)]
        return "\n".join(out) + "\n"
    prev = _set_entries(old)
    out = [_create(name) for name in IPSETS]
    for name in IPSETS:
        gone, added = set(prev[name]) - set(new[name]), set(new[name]) - set(prev[name])
        out += [f"del {name} {e} -exist" for e in prev[name] if e in gone]
        out += [f"add {name} {e} -exist" for e in new[name] if e in added]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- iptables

def _c(name: str) -> str:
    return IPSETS[name][1]


def render_iptables(table: ServiceTable, cluster_cidr: str, jumps: Iterable[Jump] = JUMPS) -> str:
    """``iptables-restore --noflush`` input for IPVS mode (kube-proxy's ``writeIptablesRules``);
    set rules are written only for non-empty sets, as kube-proxy does."""
    has_svc = len(table) > 0
    has_eps = any(sp.endpoints for sp in table)
    jumps = list(jumps)
    nat = ["*nat", *(f":{c} - [0:0]" for c in NAT_CHAINS)]
    nat += [f"-I {j.src} 1 {j.spec}" for j in jumps if j.table == "nat"]
    nat.append("-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN")
    if has_eps:
        nat.append(f'-A KUBE-POSTROUTING -m comment --comment "{_c("KUBE-LOOP-BACK")}" '
                   "-m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE")
    if has_svc:
        nat.append(f'-A KUBE-SERVICES ! -s {cluster_cidr} -m comment --comment "{_c("KUBE-CLUSTER-IP")}" '
                   "-m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ")
    nat += ["-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
            "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ"]
    if has_svc:
        nat.append("-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT")
    nat += [f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
            f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
            '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
            f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}", "COMMIT"]
    flt = ["*filter", *(f":{c} - [0:0]" for c in FILTER_CHAINS)]
    flt += [f"-I {j.src} 1 {j.spec}" for j in jumps if j.table == "filter"]
    flt += [
        "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
        f'-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT',
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT',
        f'-A KUBE-NODE-PORT -m comment --comment "{_c("KUBE-HEALTH-CHECK-NODE-PORT")}" '
        "-m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN",
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT "
        "--reject-with icmp-port-unreachable",
        "COMMIT",
    ]
    return "\n".join(nat + flt) + "\n"


# ---------------------------------------------------------------- the datapath

@register
class IpvsDatapath(Datapath):
    """kube-proxy IPVS mode. Needs ``ip_vs`` in the node's kernel (the VM backend)."""

    name = "ipvs"
    iptables_backend: ClassVar[str] = "legacy"
    features = ("ip_vs", "ipvsadm", "ipset", "iptables-legacy")

    def _ipt(self, verb: str) -> str:
        return f"iptables-{self.iptables_backend}-{verb}"

    def _sync_dummy(self, ips: set[str]) -> None:
        """kube-ipvs0 holds exactly ``ips`` as /32 addresses."""
        from pyroute2 import IPRoute

        def work() -> None:
            with IPRoute() as ipr:
                found = ipr.link_lookup(ifname=DUMMY)
                if not found:
                    ipr.link("add", ifname=DUMMY, kind="dummy")
                    found = ipr.link_lookup(ifname=DUMMY)
                idx = found[0]
                have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=2)}
                for ip in have - ips:
                    ipr.addr("del", index=idx, address=ip, prefixlen=32)
                for ip in ips - have:
                    ipr.addr("add", index=idx, address=ip, prefixlen=32)

        nsexec.in_netns(self.ctx.netns, work)

    def apply(self, desired: ServiceTable, changes: TableDiff) -> None:
        old = None if changes.full else self._applied
        nsexec.write_sysctls(self.ctx.netns, SYSCTLS)
        self._sync_dummy({sp.cluster_ip for sp in desired})
        self.ctx.run(["ipset", "restore"], input=render_ipset(desired, old))
        current = (parse_ipvsadm_save(self.ctx.run(["ipvsadm-save", "-n"]).stdout) if old is None
                   else virtual_servers(old))
        text = render_ipvsadm(current, virtual_servers(desired))
        if text:
            self.ctx.run(["ipvsadm", "-R"], input=text)  # a diff: never through ipvsadm-restore (it clears)
        saved = parse_save(self.ctx.run([self._ipt("save")]).stdout)
        missing = [j for j in JUMPS if j.save_line not in set(saved.get(j.table, SavedTable([], [])).rules)]
        self.ctx.run([self._ipt("restore"), "-w", "--noflush"],
                     input=render_iptables(desired, self.ctx.pod_cidr, missing))

    def cleanup(self) -> None:
        text = render_cleanup(parse_save(self.ctx.run([self._ipt("save")], check=False).stdout))
        if text:
            self.ctx.run([self._ipt("restore"), "-w", "--noflush"], input=text)
        self.ctx.run(["ipvsadm", "-C"], check=False)
        for name in IPSETS:
            self.ctx.run(["ipset", "destroy", name], check=False)

        def drop_dummy() -> None:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                for idx in ipr.link_lookup(ifname=DUMMY):
                    ipr.link("del", index=idx)

        nsexec.in_netns(self.ctx.netns, drop_dummy)
        self._applied = None
