"""kube-proxy's iptables mode, on either iptables backend (``iptables-legacy``, ``iptables-nft``).

The rules are the ones kube-proxy (``pkg/proxy/iptables/proxier.go``) writes for ClusterIP services
with the default options (``--cluster-cidr`` set, masquerade bit 14, localhost NodePorts, no
``masqueradeAll``, ``nf_conntrack_tcp_be_liberal`` off), written in the canonical form
``iptables-save`` prints them in (kube-proxy writes the same matches in another argument order; the
kernel holds the same rule either way). Probabilities are kube-proxy's ``%0.10f`` of ``1/(n-i)``.

Naming (kube-proxy's, bit for bit):
  ``KUBE-SVC-`` + first 16 chars of base32(sha256(servicePortName + protocol))
  ``KUBE-SEP-`` + first 16 chars of base32(sha256(servicePortName + protocol + "ip:port"))
where servicePortName is ``ns/name:port`` (``ns/name`` when the port is unnamed) and protocol is
lower case. Every chain this module creates starts with ``KUBE-``; :meth:`IptablesDatapath.cleanup`
deletes by that prefix (kube-proxy's ``CleanupLeftovers``).

Per service port with endpoints (nat table): one ``KUBE-SERVICES`` rule jumping to ``KUBE-SVC-…``;
that chain marks traffic from outside the cluster CIDR for masquerade and picks an endpoint with
``-m statistic --mode random`` rules; each ``KUBE-SEP-…`` marks hairpin traffic and DNATs. Without
endpoints: a filter-table ``KUBE-SERVICES`` REJECT rule. Above 1000 endpoints in all kube-proxy
enters "large cluster mode" and drops the per-endpoint comments; so does this module.

Syncs, as kube-proxy does them:
  full     one ``iptables-restore --noflush`` that declares (so flushes) every KUBE chain it
           writes, inserts the jump rules from the built-in chains that the kernel does not hold
           yet (kube-proxy's ``EnsureRule`` calls, done here in the same restore), and flushes and
           deletes (``-X``) stale KUBE-SVC/SEP chains (state read with ``iptables-save``; on the
           nf_tables backend see :class:`IptablesNft`);
  partial  kube-proxy's minimised restore: the filter table and the top-level nat chains in full
           (so ``KUBE-SERVICES`` with every service), plus only the SVC/SEP chains of added or
           changed services, plus ``-X`` of the chains the change made stale.
``iptables-restore`` commits each table atomically, filter first, then nat: a restore that fails
leaves the previous rules of the table it failed in (and of any table after it), and the base
class then forces a full sync (kube-proxy has the same per-table atomicity). The jump rules from
built-in chains are never in a partial restore (kube-proxy also only ensures them on full syncs).
On the nf_tables backend each table starts with ``-Z``; :class:`IptablesNft` says why.

Measured here (2 vCPUs, shared; ``benchmarks/bench_datapath_load.py``; 3 endpoints per service):
iptables-legacy loads 20,000 services in 4.3-4.5 s, of which iptables-legacy-restore is ~4 s of
CPU, then ~2 s per added service. The prototype's rule file for the same 20,000 services took
7.6-8.5 s on the same machine at the same time (its notes say 3.8-4.1 s: the machine has since
become ~2x slower), so this renders 30-35 % less restore work: chains are declared in descending
name order (see :func:`_decls`), per-endpoint comments go in large-cluster mode, and the input is
streamed so that rendering overlaps the restore. The restore cannot start on the nat table before
every chain name is known (the declarations come first, sorted): the 80,000 names are hashed in
one batch (:func:`hash16_many`, 0.25 s instead of 0.63 s; the load went from 5.3 s to 4.4 s).
What remains is inside iptables: libxtables' list of known chain names (512 hash buckets for
80,000 names, walked on every declaration and every ``-j``: a third of the restore's time, mostly
cache misses; reordering declarations and rules to shorten those walks cut 11 % of its
instructions but no wall time), libiptc's commit and the kernel's table translation (~0.9 s).

Not rendered (no such services in labkit): NodePorts, externalIPs, LoadBalancer, session affinity,
topology, ``KUBE-PROXY-CANARY`` (flush detection) and kubelet's ``KUBE-FIREWALL`` copy.

kube-proxy versions (``kube_proxy=``, :data:`KUBE_PROXY`). ``"current"`` is everything above.
``"1.18"`` is what kube-proxy v1.18 wrote, the version the Alibaba Terway study (2020) measured
(:class:`V1_18` says where each rule comes from): before kubernetes PR #96959 (2020-11-30)
``KUBE-SERVICES`` held TWO rules per service port, ``! -s <cluster CIDR> … -j KUBE-MARK-MASQ`` and
the jump to ``KUBE-SVC-…``, so a new connection to the last of N services is checked against 2N-1
rules there instead of N-1. Its ``KUBE-SVC-…`` chains have no masquerade rule and no per-endpoint
comments; ``KUBE-POSTROUTING``, ``KUBE-MARK-MASQ``, ``KUBE-FORWARD`` and the jump rules are v1.18's.
The total of nat rules is the same in both (the masquerade rule only moves): what differs is how
many of them a connection walks. A full sync of one version removes what the other left (jump
rules and filter chains only one of them has), so a lab can switch versions between runs.

Service order (``order=``). kube-proxy writes ``KUBE-SERVICES`` while ranging over a Go map, so
a service's place in the chain is not its creation order and moves from sync to sync.
``"install"`` (default) writes the table's order; ``"go-map"`` writes Go's (:class:`GoMapOrder`,
seeded by ``order_seed``: a run is reproducible), drawn anew at every full sync. Either way
:meth:`IptablesDatapath.place` says where a service port sits in nat ``KUBE-SERVICES`` and how
many rules a new connection to it is checked against there before its jump matches, and
:meth:`IptablesDatapath.describe` counts the rules (from what was applied: no kernel read).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

from .. import nsexec
from ..errors import DatapathError
from ..registry import Registry, UnknownName
from ..services import Endpoint, ServicePort, ServiceTable, TableDiff
from .base import Datapath, NodeContext, register

MASQ_MARK = "0x4000"  # 1 << 14, kube-proxy's default --iptables-masquerade-bit
LARGE_CLUSTER_ENDPOINTS = 1000  # kube-proxy's largeClusterEndpointsThreshold

SERVICES, EXTERNAL, FORWARD, NODEPORTS = "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES", "KUBE-FORWARD", "KUBE-NODEPORTS"
FIREWALL, POSTROUTING, MARK_MASQ = "KUBE-PROXY-FIREWALL", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"
FILTER_CHAINS = (SERVICES, EXTERNAL, FORWARD, NODEPORTS, FIREWALL)
NAT_CHAINS = (SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ)
XT_TABLES = ("filter", "nat", "mangle", "raw", "security")
SERVICE_CHAIN_PREFIXES = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-FW-", "KUBE-EXT-")  # isServiceChainName


# ---------------------------------------------------------------- names

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"  # RFC 4648 alphabet (Go's base32.StdEncoding)
_B32_PAIRS = [a + b for a in _B32 for b in _B32]  # 10 bits -> 2 characters


@lru_cache(maxsize=1 << 18)
def b32_prefix(text: str, n: int) -> str:
    """The first ``n`` (even) characters of base32(sha256(text)), encoding only the bytes needed
    (``base64.b32encode`` is pure Python: it was 60 % of rendering 20,000 services). Cached:
    a sync names each chain several times."""
    bits = 5 * n
    v = int.from_bytes(hashlib.sha256(text.encode()).digest()[:(bits + 7) // 8], "big") >> (-bits % 8)
    return "".join([_B32_PAIRS[(v >> (bits - 10 * (i + 1))) & 1023] for i in range(n // 2)])


def _hash16(text: str) -> str:
    return b32_prefix(text, 16)


def hash16_many(texts: list[str]) -> list[str]:
    """``_hash16`` of many texts at once: the 10-byte digest prefixes are base32-encoded together
    (10 bytes are exactly 16 characters), with numpy where it is installed (a VM's agent may not
    have it: then ``base64.b32encode``, pure Python). For the 80,000 chain names of 20,000
    services: 0.09 s with numpy, 0.33 s one by one."""
    sha = hashlib.sha256
    raw = b"".join([sha(t.encode()).digest()[:10] for t in texts])
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - the host venv has numpy
        enc = base64.b32encode(raw).decode()
    else:
        five = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 5).astype(np.uint64)
        v = five[:, 0] << 32 | five[:, 1] << 24 | five[:, 2] << 16 | five[:, 3] << 8 | five[:, 4]
        digits = v[:, None] >> np.arange(35, -1, -5, dtype=np.uint64) & 31
        enc = np.frombuffer(_B32.encode(), dtype=np.uint8)[digits].tobytes().decode()
    return [enc[i:i + 16] for i in range(0, len(enc), 16)]


def service_chain(sp: ServicePort) -> str:
    """kube-proxy's ``servicePortPolicyClusterChain``: ``KUBE-SVC-`` + portProtoHash."""
    return "KUBE-SVC-" + _hash16(sp.key + sp.proto)


def endpoint_chain(sp: ServicePort, ep: Endpoint) -> str:
    """kube-proxy's ``servicePortEndpointChainName`` (endpoint as ``ip:port``)."""
    return "KUBE-SEP-" + _hash16(f"{sp.key}{sp.proto}{ep.ip}:{ep.port}")


def service_chains(sp: ServicePort) -> list[str]:
    """Every nat chain a service port owns (none without endpoints)."""
    if not sp.endpoints:
        return []
    return [service_chain(sp)] + [endpoint_chain(sp, ep) for ep in sp.endpoints]


def is_service_chain(name: str) -> bool:
    return name.startswith(SERVICE_CHAIN_PREFIXES)


def probability(n: int) -> str:
    """kube-proxy's ``computeProbability``."""
    return "%0.10f" % (1.0 / n)


# ---------------------------------------------------------------- jump rules

@dataclass(frozen=True)
class Jump:
    """A rule in a built-in chain jumping to one of ours (kube-proxy's ``iptablesJumpChains``)."""

    table: str
    src: str
    dst: str
    comment: str
    new_only: bool = False  # "-m conntrack --ctstate NEW"

    @property
    def spec(self) -> str:
        ct = "-m conntrack --ctstate NEW " if self.new_only else ""
        return f'{ct}-m comment --comment "{self.comment}" -j {self.dst}'

    @property
    def save_line(self) -> str:
        """The line ``iptables-save`` prints for it."""
        return f"-A {self.src} {self.spec}"


# In kube-proxy's order; each is prepended, so in a chain the last listed ends up first.
JUMPS = (
    Jump("filter", "INPUT", EXTERNAL, "kubernetes externally-visible service portals", True),
    Jump("filter", "FORWARD", EXTERNAL, "kubernetes externally-visible service portals", True),
    Jump("filter", "INPUT", NODEPORTS, "kubernetes health check service ports"),
    Jump("filter", "FORWARD", SERVICES, "kubernetes service portals", True),
    Jump("filter", "OUTPUT", SERVICES, "kubernetes service portals", True),
    Jump("filter", "FORWARD", FORWARD, "kubernetes forwarding rules"),
    Jump("filter", "INPUT", FIREWALL, "kubernetes load balancer firewall", True),
    Jump("filter", "OUTPUT", FIREWALL, "kubernetes load balancer firewall", True),
    Jump("filter", "FORWARD", FIREWALL, "kubernetes load balancer firewall", True),
    Jump("nat", "OUTPUT", SERVICES, "kubernetes service portals"),
    Jump("nat", "PREROUTING", SERVICES, "kubernetes service portals"),
    Jump("nat", "POSTROUTING", POSTROUTING, "kubernetes postrouting rules"),
)

# kube-proxy v1.18's iptablesJumpChains, in its order (see :class:`V1_18`): INPUT -> KUBE-SERVICES
# instead of the firewall and health-check jumps, no FORWARD -> KUBE-EXTERNAL-SERVICES yet.
JUMPS_1_18 = (
    Jump("filter", "INPUT", EXTERNAL, "kubernetes externally-visible service portals", True),
    Jump("filter", "FORWARD", SERVICES, "kubernetes service portals", True),
    Jump("filter", "OUTPUT", SERVICES, "kubernetes service portals", True),
    Jump("filter", "INPUT", SERVICES, "kubernetes service portals", True),
    Jump("filter", "FORWARD", FORWARD, "kubernetes forwarding rules"),
    Jump("nat", "OUTPUT", SERVICES, "kubernetes service portals"),
    Jump("nat", "PREROUTING", SERVICES, "kubernetes service portals"),
    Jump("nat", "POSTROUTING", POSTROUTING, "kubernetes postrouting rules"),
)


# ---------------------------------------------------------------- rules of one service port

def _clusterip_match(sp: ServicePort) -> str:
    return f"-d {sp.cluster_ip}/32 -p {sp.proto}"


def _cluster_ip_traffic(sp: ServicePort) -> str:
    """The matches of kube-proxy's "<service> cluster IP" rules (jump and masquerade)."""
    return (f'-d {sp.cluster_ip}/32 -p {sp.proto} -m comment --comment "{sp.key} cluster IP" '
            f"-m {sp.proto} --dport {sp.port}")


def services_rule(sp: ServicePort, svc: str | None = None) -> str:
    """The service's rule in nat ``KUBE-SERVICES`` (with endpoints; ``svc``: its chain, if known)
    or filter (without)."""
    if sp.endpoints:
        return f"-A {SERVICES} {_cluster_ip_traffic(sp)} -j {svc or service_chain(sp)}"
    return (f'-A {SERVICES} {_clusterip_match(sp)} -m comment --comment "{sp.key} has no endpoints" '
            f"-m {sp.proto} --dport {sp.port} -j REJECT --reject-with icmp-port-unreachable")


def chain_rules(sp: ServicePort, cluster_cidr: str, large: bool = False,
                chains: list[str] | None = None) -> list[str]:
    """The rules of the service's KUBE-SVC and KUBE-SEP chains (in that order); ``chains``: its
    :func:`service_chains`, if already known."""
    svc, *seps = chains or service_chains(sp)
    out = [f"-A {svc} ! -s {cluster_cidr} {_cluster_ip_traffic(sp)} -j {MARK_MASQ}"]
    n = len(sp.endpoints)
    for i, (ep, sep) in enumerate(zip(sp.endpoints, seps)):
        comment = "" if large else f'-m comment --comment "{sp.key} -> {ep.ip}:{ep.port}" '
        stat = f"-m statistic --mode random --probability {probability(n - i)} " if i < n - 1 else ""
        out.append(f"-A {svc} {comment}{stat}-j {sep}")
    return out + endpoint_rules(sp, seps, large)


def endpoint_rules(sp: ServicePort, seps: Sequence[str], large: bool) -> list[str]:
    """The rules of the service's KUBE-SEP chains (``seps``, one per endpoint): hairpin mark, DNAT."""
    out = []
    comment = "" if large else f'-m comment --comment "{sp.key}" '
    for ep, sep in zip(sp.endpoints, seps):
        out.append(f"-A {sep} -s {ep.ip}/32 {comment}-j {MARK_MASQ}")
        out.append(f"-A {sep} -p {sp.proto} {comment}-m {sp.proto} -j DNAT --to-destination {ep.ip}:{ep.port}")
    return out


def _decl(chain: str) -> str:
    return f":{chain} - [0:0]"


def _decls(chains: Iterable[str]) -> list[str]:
    """Chain declarations in descending name order. libiptc keeps user chains sorted and inserts
    a new one with a linear walk from its chain index, unless the name sorts before every chain it
    has: in this order each insert is O(1). Measured: iptables-legacy-restore of 20,000 services
    takes 4.1-4.7 s of CPU instead of 6.5-7.0 s (the order of declarations means nothing else)."""
    return [_decl(c) for c in sorted(set(chains), reverse=True)]


def is_large(table: ServiceTable) -> bool:
    return sum(len(sp.endpoints) for sp in table) > LARGE_CLUSTER_ENDPOINTS


# ---------------------------------------------------------------- kube-proxy versions

KUBE_PROXY: Registry[type[KubeProxyVersion]] = Registry("kube-proxy version")


class KubeProxyVersion:
    """The rules one kube-proxy version writes for ClusterIP services, as ``iptables-save`` prints
    them; chosen by name from :data:`KUBE_PROXY`. This base class is ``"current"`` (the module
    docstring); a subclass overrides what its version wrote differently."""

    name: ClassVar[str] = "current"
    order: ClassVar[int] = 0  # listed first
    jumps: ClassVar[tuple[Jump, ...]] = JUMPS
    filter_chains: ClassVar[tuple[str, ...]] = FILTER_CHAINS
    services_rules_per_port: ClassVar[int] = 1  # in nat KUBE-SERVICES, per service port with endpoints
    svc_masq_rules: ClassVar[int] = 1  # masquerade rules at the top of each KUBE-SVC chain

    def services_rules(self, ports: Iterable[ServicePort], names: dict[str, list[str]], cluster_cidr: str) -> list[str]:
        """The nat ``KUBE-SERVICES`` rules of ``ports`` (all with endpoints), in that order;
        ``names``: their :func:`service_chains`."""
        return [services_rule(sp, names[sp.key][0]) for sp in ports]

    # the rules of the service's KUBE-SVC and KUBE-SEP chains: (sp, cluster_cidr, large, chains) -> lines
    chain_rules = staticmethod(chain_rules)

    def nat_head(self) -> list[str]:
        """``KUBE-POSTROUTING`` and ``KUBE-MARK-MASQ``."""
        return [f"-A {POSTROUTING} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
                f"-A {POSTROUTING} -j MARK --xor-mark {MASQ_MARK}",
                f'-A {POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
                f"-A {MARK_MASQ} -j MARK --or-mark {MASQ_MARK}"]

    def forward_rules(self) -> list[str]:
        """filter ``KUBE-FORWARD``."""
        return [f"-A {FORWARD} -m conntrack --ctstate INVALID -j DROP",
                f'-A {FORWARD} -m comment --comment "kubernetes forwarding rules" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT',
                f'-A {FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT']

    def nat_rules(self, table: ServiceTable) -> int:
        """How many rules the KUBE chains of the nat table hold for ``table`` (jumps from the
        built-in chains not counted), without rendering them."""
        ports = eps = 0
        for sp in table:
            if sp.endpoints:
                ports += 1
                eps += len(sp.endpoints)
        per_port = self.services_rules_per_port + self.svc_masq_rules
        return len(self.nat_head()) + 1 + ports * per_port + 3 * eps  # 1: the NodePorts jump, last

    def filter_rules(self, table: ServiceTable) -> int:
        """How many rules the KUBE chains of the filter table hold for ``table``."""
        return len(self.forward_rules()) + sum(1 for sp in table if not sp.endpoints)


KUBE_PROXY.register(KubeProxyVersion)


@KUBE_PROXY.register
class V1_18(KubeProxyVersion):
    """kube-proxy v1.18 (tag ``v1.18.0``), ``pkg/proxy/iptables/proxier.go``: ``syncProxyRules`` and
    ``iptablesJumpChains``. Read from two stored copies of that file (a v1.18 development
    snapshot, and a 1.19/1.20 one that still has this KUBE-SERVICES code after #87748 replaced
    ``clusterCIDR`` with ``localDetector.JumpIfNotLocal``, which writes the same ``! -s <cluster
    CIDR>`` match) and CHANGELOG-1.18.md (#87748 is in v1.18.0); the upstream repository itself
    was not reachable here, nor v1.18's proxier_test.go. What v1.18 wrote, per ClusterIP port:

      KUBE-SERVICES  "-m comment --comment "<ns/svc:port> cluster IP" -m <proto> -p <proto>
                     -d <ip>/32 --dport <port>", once with "! -s <cluster CIDR> -j KUBE-MARK-MASQ",
                     once with "-j KUBE-SVC-…" (removed by #96959, v1.21);
      KUBE-SVC-…     one "-m comment --comment <ns/svc:port> [-m statistic --mode random
                     --probability 1/(n-i)] -j KUBE-SEP-…" per endpoint (``appendServiceCommentLocked``;
                     dropped above 1000 endpoints, as now);
      KUBE-SEP-…     "-s <ep>/32 -j KUBE-MARK-MASQ", "-m <proto> -p <proto> -j DNAT
                     --to-destination <ep>:<port>", commented like KUBE-SVC (as now);
      KUBE-POSTROUTING  one rule: comment, "-m mark --mark 0x4000/0x4000 -j MASQUERADE
                     --random-fully" (v1.18.0-v1.18.5; #92035, cherry-picked into v1.18.6 as
                     #92256, later split it into today's RETURN / --xor-mark / MASQUERADE);
      KUBE-MARK-MASQ "-j MARK --set-xmark 0x4000/0x4000" (``masqueradeMark`` "%#08x/%#08x");
      KUBE-FORWARD   INVALID drop, the mark accept, and the "pod source" and "pod destination"
                     conntrack accepts, without the ``-s``/``-d <cluster CIDR>`` the development
                     copy still has (inferred: #87748 took ``clusterCIDR`` out of the proxier,
                     and the 1.19/1.20 copy writes them without; filter only, never on a
                     ClusterIP connection's first packet);
      filter chains  KUBE-SERVICES, KUBE-EXTERNAL-SERVICES, KUBE-FORWARD (no KUBE-PROXY-FIREWALL,
                     no filter KUBE-NODEPORTS); jump rules :data:`JUMPS_1_18`.
    The NodePorts rule that ends KUBE-SERVICES and the REJECT rules of services without endpoints
    are as now. Written in ``iptables-save``'s canonical form (match order as it prints them)."""

    name = "1.18"
    order = 1
    jumps = JUMPS_1_18
    filter_chains = (SERVICES, EXTERNAL, FORWARD)
    services_rules_per_port = 2
    svc_masq_rules = 0

    def services_rules(self, ports: Iterable[ServicePort], names: dict[str, list[str]], cluster_cidr: str) -> list[str]:
        out = []
        for sp in ports:
            match = _cluster_ip_traffic(sp)
            out.append(f"-A {SERVICES} ! -s {cluster_cidr} {match} -j {MARK_MASQ}")
            out.append(f"-A {SERVICES} {match} -j {names[sp.key][0]}")
        return out

    @staticmethod
    def chain_rules(sp: ServicePort, cluster_cidr: str, large: bool, chains: list[str]) -> list[str]:
        svc, *seps = chains
        comment = "" if large else f'-m comment --comment "{sp.key}" '
        n = len(seps)
        out = [f"-A {svc} {comment}-m statistic --mode random --probability {probability(n - i)} -j {sep}"
               for i, sep in enumerate(seps[:-1])]
        out.append(f"-A {svc} {comment}-j {seps[-1]}")
        return out + endpoint_rules(sp, seps, large)

    def nat_head(self) -> list[str]:
        masquerade = (f'-A {POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" '
                      f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j MASQUERADE --random-fully")
        return [masquerade, f"-A {MARK_MASQ} -j MARK --set-xmark {MASQ_MARK}/{MASQ_MARK}"]

    def forward_rules(self) -> list[str]:
        return [f"-A {FORWARD} -m conntrack --ctstate INVALID -j DROP",
                f'-A {FORWARD} -m comment --comment "kubernetes forwarding rules" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT',
                f'-A {FORWARD} -m comment --comment "kubernetes forwarding conntrack pod source rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT',
                f'-A {FORWARD} -m comment --comment "kubernetes forwarding conntrack pod destination rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT']


def kube_proxy_version(which: str | KubeProxyVersion) -> KubeProxyVersion:
    """The :class:`KubeProxyVersion` named ``which`` (:class:`~labkit.registry.UnknownName`, listing
    the known ones, otherwise); an instance is returned as it is."""
    return which if isinstance(which, KubeProxyVersion) else KUBE_PROXY.get(which)()


# ---------------------------------------------------------------- whole restores

_NODEPORTS_LAST = (f'-A {SERVICES} -m comment --comment "kubernetes service nodeports; NOTE: this must be the '
                   f'last rule in this chain" -m addrtype --dst-type LOCAL -j {NODEPORTS}')


def _jump_lines(table: str, jumps: Iterable[Jump], unlink: Iterable[Jump]) -> list[str]:
    """Delete the ``unlink`` jump rules of ``table`` (another version's), insert the ``jumps``."""
    return ([f"-D {j.src} {j.spec}" for j in unlink if j.table == table]
            + [f"-I {j.src} 1 {j.spec}" for j in jumps if j.table == table])


def _filter_table(table: ServiceTable, jumps: Iterable[Jump], version: KubeProxyVersion,
                  unlink: Iterable[Jump] = (), drop_chains: Iterable[str] = ()) -> list[str]:
    """filter restore lines; ``drop_chains``: another version's filter chains, flushed and deleted
    (after ``unlink`` removed the jumps to them)."""
    drop_chains = list(drop_chains)
    out = ["*filter", *_decls([*version.filter_chains, *drop_chains]), *_jump_lines("filter", jumps, unlink)]
    out += [services_rule(sp) for sp in table if not sp.endpoints]
    out += version.forward_rules()
    out += [f"-X {c}" for c in drop_chains]
    out.append("COMMIT")
    return out


def _nat_table(table: ServiceTable, cluster_cidr: str, synced: Iterable[ServicePort],
               delete: Iterable[str], jumps: Iterable[Jump], names: dict[str, list[str]],
               version: KubeProxyVersion, order: Sequence[str] | None = None,
               unlink: Iterable[Jump] = ()) -> Iterator[str]:
    """nat restore lines, in chunks: the top-level chains in full (``KUBE-SERVICES`` in ``order``),
    the chains of ``synced`` services, ``-X`` of ``delete``. ``names``: :func:`service_chains` of
    every port of ``table`` with endpoints (each name is a sha256: computed once per sync)."""
    large = is_large(table)
    synced = [sp for sp in synced if sp.endpoints]
    delete = list(delete)
    chains = [c for sp in synced for c in names[sp.key]]
    out = ["*nat", *_decls([*NAT_CHAINS, *chains, *delete]), *_jump_lines("nat", jumps, unlink)]
    out += version.nat_head()
    out += version.services_rules(_in_chain_order(table, names, order), names, cluster_cidr)
    for i, sp in enumerate(synced):
        out += version.chain_rules(sp, cluster_cidr, large, names[sp.key])
        if i % CHUNK == CHUNK - 1:
            yield "\n".join(out) + "\n"
            out = []
    out += [f"-X {c}" for c in delete]
    out += [_NODEPORTS_LAST, "COMMIT"]
    yield "\n".join(out) + "\n"


def _in_chain_order(table: ServiceTable, names: dict[str, list[str]], order: Sequence[str] | None) -> list[ServicePort]:
    """The ports of ``table`` with endpoints (the keys of ``names``) in ``order`` (None: the table's)."""
    if order is None:
        return [sp for sp in table if sp.endpoints]
    if len(order) != len(names) or names.keys() != set(order):
        raise ValueError("order must name every service port with endpoints once")
    return [table[k] for k in order]


CHUNK = 1000  # services per chunk of a streamed restore


def iter_full(table: ServiceTable, cluster_cidr: str, *, stale_chains: Iterable[str] = (),
              jumps: Iterable[Jump] | None = None, kube_proxy: str | KubeProxyVersion = "current",
              order: Sequence[str] | None = None, unlink: Iterable[Jump] = (),
              drop_chains: Iterable[str] = ()) -> Iterator[str]:
    """:func:`render_full` in chunks, so that iptables-restore parses while the rest is rendered."""
    version = kube_proxy_version(kube_proxy)
    jumps = list(version.jumps if jumps is None else jumps)
    unlink = list(unlink)
    yield "\n".join(_filter_table(table, jumps, version, unlink, drop_chains)) + "\n"
    names = _names(table)
    active = {c for chains in names.values() for c in chains}
    stale = sorted(set(stale_chains) - active)
    yield from _nat_table(table, cluster_cidr, table, stale, jumps, names, version, order, unlink)


def render_full(table: ServiceTable, cluster_cidr: str, *, stale_chains: Iterable[str] = (),
                jumps: Iterable[Jump] | None = None, kube_proxy: str | KubeProxyVersion = "current",
                order: Sequence[str] | None = None, unlink: Iterable[Jump] = (),
                drop_chains: Iterable[str] = ()) -> str:
    """One ``iptables-restore --noflush`` input with every KUBE chain of ``table``.

    ``stale_chains``: KUBE-SVC/SEP chains present in the kernel but not in ``table`` (flushed and
    deleted). ``jumps``: jump rules to insert (by default all of the version's; the datapath passes
    the missing ones). ``kube_proxy``: which version's rules (:data:`KUBE_PROXY`). ``order``: the
    keys of the service ports with endpoints in the order ``KUBE-SERVICES`` gets them (None: the
    table's). ``unlink`` / ``drop_chains``: another version's jump rules and filter chains to
    remove."""
    return "".join(iter_full(table, cluster_cidr, stale_chains=stale_chains, jumps=jumps, kube_proxy=kube_proxy,
                             order=order, unlink=unlink, drop_chains=drop_chains))


def _names(table: ServiceTable) -> dict[str, list[str]]:
    """:func:`service_chains` of every port of ``table`` with endpoints, hashed in one batch (the
    names of 20,000 services took 0.63 s one by one, and the restore waits for all of them: the
    declarations come first, sorted)."""
    ports = [(sp.key, sp) for sp in table if sp.endpoints]
    texts: list[str] = []
    for key, sp in ports:
        base = key + sp.proto
        texts.append(base)
        texts += [f"{base}{ep.ip}:{ep.port}" for ep in sp.endpoints]
    hashes = iter(hash16_many(texts))
    return {key: ["KUBE-SVC-" + next(hashes)] + ["KUBE-SEP-" + next(hashes) for _ in sp.endpoints]
            for key, sp in ports}


def render_partial(desired: ServiceTable, changes: TableDiff, cluster_cidr: str, *,
                   kube_proxy: str | KubeProxyVersion = "current", order: Sequence[str] | None = None) -> str:
    """kube-proxy's minimised restore for ``changes``: top-level chains in full, SVC/SEP chains of
    added and changed services only, ``-X`` for the chains they no longer use. ``kube_proxy`` and
    ``order`` as for :func:`render_full`."""
    version = kube_proxy_version(kube_proxy)
    touched = {sp.key for sp in changes.added} | {new.key for _, new in changes.changed}
    synced = [sp for sp in desired if sp.key in touched]  # in install order
    old_chains = [c for sp in changes.removed for c in service_chains(sp)]
    old_chains += [c for old, _ in changes.changed for c in service_chains(old)]
    new_chains = {c for sp in synced for c in service_chains(sp)}
    delete = [c for c in dict.fromkeys(old_chains) if c not in new_chains]
    return ("\n".join(_filter_table(desired, (), version)) + "\n"
            + "".join(_nat_table(desired, cluster_cidr, synced, delete, (), _names(desired), version, order)))


# ---------------------------------------------------------------- reading iptables-save

@dataclass
class SavedTable:
    chains: list[str]
    rules: list[str]  # "-A CHAIN ..." lines as printed


def parse_save(text: str) -> dict[str, SavedTable]:
    """``iptables-save`` output by table."""
    tables: dict[str, SavedTable] = {}
    cur: SavedTable | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            cur = tables.setdefault(line[1:].strip(), SavedTable([], []))
        elif cur is None or not line or line.startswith("#") or line == "COMMIT":
            continue
        elif line.startswith(":"):
            cur.chains.append(line[1:].split()[0])
        elif line.startswith("-A "):
            cur.rules.append(line)
    return tables


def zero_counters_first(text: str) -> str:
    """Start every table of a restore with ``-Z`` (iptables-nft only; see :class:`IptablesNft`)."""
    for table in XT_TABLES:  # "*table" only ever appears as a table header line
        text = text.replace(f"*{table}\n", f"*{table}\n-Z\n")
    return text


def render_cleanup(saved: dict[str, SavedTable]) -> str:
    """Restore input removing every KUBE-* chain and every rule elsewhere that jumps to one; ""
    if there is nothing to remove. Other rules and chains are left alone."""
    out: list[str] = []
    for name, t in saved.items():
        ours = [c for c in t.chains if c.startswith("KUBE-")]
        unlink = [r for r in t.rules if not r.split()[1].startswith("KUBE-") and " -j KUBE-" in r]
        if not ours and not unlink:
            continue
        out += [f"*{name}", *_decls(ours), *("-D" + r[2:] for r in unlink)]
        out += [f"-X {c}" for c in ours] + ["COMMIT"]
    return "\n".join(out) + "\n" if out else ""


# ---------------------------------------------------------------- service order

ORDERS = ("install", "go-map")  # how KUBE-SERVICES orders the services: the table's, or Go's
_U64 = (1 << 64) - 1


class GoMapOrder:
    """The order in which kube-proxy's ``for svcName, svc := range proxier.serviceMap`` meets the
    service ports, sync after sync (kube-proxy writes ``KUBE-SERVICES`` in that loop).

    Go's maps (``runtime/map.go`` before Go 1.24's Swiss tables; kube-proxy v1.18 was built with
    Go 1.13) keep keys in buckets picked by a hash with a per-map random seed, and every
    ``range`` starts at a random bucket (``mapiterinit``: ``startBucket``, ``offset``) and wraps
    around. ``serviceMap`` lives as long as kube-proxy, so the services keep one cyclic order and
    each sync enters it at a random point: a service's position is uniform over the chain and
    changes at every sync, while its neighbours stay its neighbours. Modelled as a seeded 64-bit
    hash per key (the map's seed) and a start point drawn per full sync; the rotation of the
    (up to 8) keys inside a bucket and the reshuffle when the map grows are not modelled. A
    partial sync keeps the start, so a service keeps its place (an added one lands where its hash
    puts it); kube-proxy v1.18 rewrote the chain at every sync, so draw again with a full sync.
    One ``seed`` gives one sequence of orders: a run is reproducible."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)
        self._salt = self._rng.getrandbits(64).to_bytes(8, "little")
        self._start = 0
        self._hashes: dict[str, int] = {}

    def _hash(self, key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, key=self._salt).digest(), "little")

    def order(self, keys: Iterable[str], full: bool) -> list[str]:
        """``keys`` in the order the next sync writes them (``full``: a full sync, a new start)."""
        keys = list(keys)
        hashes = self._hashes
        if full:
            self._start = self._rng.getrandbits(64)
            hashes = self._hashes = {k: hashes[k] if k in hashes else self._hash(k) for k in keys}  # gone keys go
        else:
            for k in keys:
                if k not in hashes:
                    hashes[k] = self._hash(k)
        start = self._start
        return sorted(keys, key=lambda k: (hashes[k] - start) & _U64)


@dataclass(frozen=True)
class ServicePlace:
    """Where a service port's rules sit in nat ``KUBE-SERVICES`` after the last sync, for the
    "rules walked" axis of the experiments. ``rules_before`` is what a new connection to the
    service is checked against there before its jump to ``KUBE-SVC-…`` matches: 0-based, it is
    that jump rule's index among the chain's rules (``iptables -t nat -S KUBE-SERVICES`` without
    the ``-N`` line, or the chain's ``-A`` lines in ``iptables-save``). v1.18 counts the
    service's own masquerade rule in it. Rules walked in ``PREROUTING``/``OUTPUT`` before the jump
    to ``KUBE-SERVICES`` and in ``KUBE-SVC-…`` after it are not counted."""

    key: str
    position: int  # among the service ports in KUBE-SERVICES, 0-based
    rules_before: int
    services: int  # service ports in KUBE-SERVICES (those with endpoints)
    rules: int  # rules in KUBE-SERVICES, the final NodePorts rule included


# ---------------------------------------------------------------- the datapath

class IptablesDatapath(Datapath):
    """kube-proxy iptables mode; subclasses pick the backend (``iptables-<backend>-restore``).

    Keywords (all optional; ``Datapath(ctx)`` is today's kube-proxy in table order), listed in
    :attr:`options` so that a runtime can pass only what a datapath class takes:
      ``kube_proxy``  which kube-proxy's rules: ``"current"`` or ``"1.18"`` (:data:`KUBE_PROXY`);
      ``order``       ``KUBE-SERVICES`` in the table's order (``"install"``) or Go's (``"go-map"``);
      ``order_seed``  the seed of the Go map order (an int)."""

    backend: ClassVar[str]
    # constructor keyword -> the values it takes (None: any int)
    options: ClassVar[dict[str, tuple[str, ...] | None]] = {
        "kube_proxy": tuple(KUBE_PROXY.names()), "order": ORDERS, "order_seed": None}

    def __init__(self, ctx: NodeContext, *, kube_proxy: str = "current", order: str = "install",
                 order_seed: int = 0):
        super().__init__(ctx)
        self.kube_proxy = kube_proxy_version(kube_proxy)
        if order not in ORDERS:
            raise UnknownName("service order", order, list(ORDERS))
        self.order, self.order_seed = order, int(order_seed)
        self._go_map = GoMapOrder(self.order_seed) if order == "go-map" else None
        self._chain_keys: list[str] | None = None  # KUBE-SERVICES order of the last sync (None: table's)
        self._places: dict[str, int] | None = None  # key -> position, built when first asked

    def _tool(self, verb: str) -> str:
        return f"iptables-{self.backend}-{verb}"

    def _save(self) -> dict[str, SavedTable]:
        """The chains of every table and the rules of the chains that are not ours (all a full
        sync and a cleanup look at)."""
        return parse_save(self.ctx.run([self._tool("save")]).stdout)

    def _restore(self, chunks: str | Iterable[str]) -> None:
        """``iptables-restore -w --noflush`` fed as the chunks are rendered: on 2 CPUs the render
        (0.7-1.2 s for 20,000 services) overlaps the restore instead of preceding it."""
        chunks = [chunks] if isinstance(chunks, str) else chunks
        argv = [self._tool("restore"), "-w", "--noflush"]
        with tempfile.TemporaryFile() as err:
            proc = nsexec.spawn(argv, self.ctx.netns, stdin=subprocess.PIPE, stderr=err)
            try:
                for chunk in chunks:
                    proc.stdin.write(self._prepare(chunk).encode())
                proc.stdin.close()
            except BrokenPipeError:  # it stopped reading: its exit status and stderr say why
                pass
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            rc = proc.wait()
            if rc != 0:
                err.seek(0)
                raise subprocess.CalledProcessError(rc, argv, "", err.read().decode(errors="replace")[-2000:])

    def _prepare(self, text: str) -> str:
        """A chunk of restore input as this backend needs it (chunks hold whole lines)."""
        return text

    def apply(self, desired: ServiceTable, changes: TableDiff) -> None:
        cidr, version = self.ctx.pod_cidr, self.kube_proxy
        order = None
        if self._go_map is not None:
            order = self._go_map.order((sp.key for sp in desired if sp.endpoints), changes.full)
        if not changes.full:
            self._restore(render_partial(desired, changes, cidr, kube_proxy=version, order=order))
        else:
            saved = self._save()
            present = {t: set(s.rules) for t, s in saved.items()}
            missing = [j for j in version.jumps if j.save_line not in present.get(j.table, ())]
            # what another version left: its jump rules, then its filter chains
            unlink = [j for j in _all_jumps() if j not in version.jumps and j.save_line in present.get(j.table, ())]
            there = set(saved["filter"].chains) if "filter" in saved else set()
            drop = [c for c in _all_filter_chains() if c not in version.filter_chains and c in there]
            stale = [c for c in saved["nat"].chains if is_service_chain(c)] if "nat" in saved else []
            self._restore(iter_full(desired, cidr, stale_chains=stale, jumps=missing, kube_proxy=version,
                                    order=order, unlink=unlink, drop_chains=drop))
        self._chain_keys, self._places = order, None  # only once the kernel holds it

    def cleanup(self) -> None:
        text = render_cleanup(self._save())
        if text:
            self._restore(text)
        self._applied = None
        self._chain_keys = self._places = None

    def chain_order(self) -> list[str]:
        """The keys of the service ports in nat ``KUBE-SERVICES`` as the last sync wrote them."""
        return list(self._keys())

    def _keys(self) -> list[str]:
        table = self._applied
        if table is None:
            raise DatapathError(f"{self.name} on node {self.ctx.node}: no sync is known to have succeeded, "
                                "so the order of KUBE-SERVICES is unknown")
        if self._chain_keys is None:  # table order: derived once per sync, when first asked
            self._chain_keys = [sp.key for sp in table if sp.endpoints]
        return self._chain_keys

    def place(self, key: str) -> ServicePlace:
        """Where service port ``key`` sits in nat ``KUBE-SERVICES`` and how many rules a new
        connection to it is checked against there before its jump (:class:`ServicePlace`).
        Computed from the last sync, not read from the kernel (the kernel test checks they agree).
        KeyError for a port without endpoints (its REJECT rule is in filter) or not in the table."""
        keys = self._keys()
        if self._places is None:
            self._places = {k: i for i, k in enumerate(keys)}
        pos = self._places.get(key)
        if pos is None:
            why = "has no endpoints: no rule in nat KUBE-SERVICES" if key in self._applied else "is not in the table"
            raise KeyError(f"service port {key!r} {why}")
        per = self.kube_proxy.services_rules_per_port
        n = len(self._places)
        return ServicePlace(key, pos, pos * per + per - 1, n, n * per + 1)

    def walk(self, key: str | None) -> dict:
        """Rules of nat KUBE-SERVICES a new connection to ``key`` is checked against before its jump
        (to an address no service has, such as a pod's: every rule of the chain, none matching), and
        the rules of the nat table's KUBE chains in all."""
        if key is None:
            ports = sum(1 for sp in self._applied if sp.endpoints) if self._applied is not None else 0
            walked = ports * self.kube_proxy.services_rules_per_port + 1
        else:
            walked = self.place(key).rules_before
        return {"rules_walked": walked, "nat_rules": self.kube_proxy.nat_rules(self._applied)}

    def describe(self) -> dict:
        """Also the version, the order and the rule counts of the last sync (computed, cheap):
        ``nat_rules`` (rules in the nat KUBE chains), ``kube_services_rules`` (in nat
        KUBE-SERVICES) and ``filter_rules`` (in the filter KUBE chains); jump rules from the
        built-in chains are not counted."""
        d = super().describe()
        d.update(backend=self.backend, kube_proxy=self.kube_proxy.name, order=self.order)
        if self._go_map is not None:
            d["order_seed"] = self.order_seed
        table = self._applied
        if table is not None:
            ports = sum(1 for sp in table if sp.endpoints)
            d.update(nat_rules=self.kube_proxy.nat_rules(table),
                     kube_services_rules=ports * self.kube_proxy.services_rules_per_port + 1,
                     filter_rules=self.kube_proxy.filter_rules(table))
        return d


def _all_jumps() -> list[Jump]:
    """Every version's jump rules, each once."""
    return list(dict.fromkeys(j for v in KUBE_PROXY for j in v.jumps))


def _all_filter_chains() -> list[str]:
    return list(dict.fromkeys(c for v in KUBE_PROXY for c in v.filter_chains))


@register
class IptablesLegacy(IptablesDatapath):
    name = "iptables-legacy"
    backend = "legacy"
    features = ("iptables-legacy",)


@register
class IptablesNft(IptablesDatapath):
    """On the nf_tables backend every restore starts each table with ``-Z`` (zero the counters).

    iptables-nft 1.8.9 (Debian 12), with ``--noflush``, records every chain a restore line names in
    a sorted linked list (``nft_cache_level_set`` → ``cache_chain_list_insert``), one linear scan
    per line: 75 s of CPU for 5,000 services, hours for 20,000. A command naming no chain makes it
    cache the whole table instead and skip that list; ``-Z`` is the only such command that changes
    no rule (it resets packet counters, also those of other rules in nat/filter). With it: 20,000
    services load in 14 s of CPU; adding one costs 5 s (11.6 s without).

    ``iptables-nft-save`` is not used: with 20,000 services it overflows the default 8 MiB stack
    (SIGSEGV) and, given a bigger one, takes 105 s of CPU (4.8 s at 5,000: quadratic). The chain
    names come from ``nft -j list chains`` (1.1 s at 20,000) and the rules of the chains that are
    not ours from ``iptables-nft -t <table> -S <chain>`` (milliseconds each): that is all a full
    sync and a cleanup read."""

    name = "iptables-nft"
    backend = "nft"
    features = ("iptables-nft",)

    def _prepare(self, text: str) -> str:
        return zero_counters_first(text)

    def _save(self) -> dict[str, SavedTable]:
        listed = json.loads(self.ctx.run(["nft", "-j", "list", "chains"]).stdout or '{"nftables": []}')
        saved: dict[str, SavedTable] = {}
        for item in listed["nftables"]:
            chain = item.get("chain")
            if chain and chain["family"] == "ip" and chain["table"] in XT_TABLES:
                saved.setdefault(chain["table"], SavedTable([], [])).chains.append(chain["name"])
        for table, t in saved.items():
            for chain in t.chains:
                if not chain.startswith("KUBE-"):
                    listing = self.ctx.run(["iptables-nft", "-w", "-t", table, "-S", chain]).stdout
                    t.rules += [ln for ln in listing.splitlines() if ln.startswith("-A ")]
        return saved
