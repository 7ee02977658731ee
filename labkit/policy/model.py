"""The NetworkPolicy model every policy engine consumes: a spec's policies resolved to addresses.

Two views of the same policies, kept apart on purpose:

- :func:`allowed` is the *oracle*: Kubernetes' semantics evaluated directly on the spec (selectors,
  ``ipBlock`` with ``except``, ports) for one connection. ``labkit check`` computes its expected
  allow/deny matrix with it; it never looks at what the engines install.
- :func:`compile_table` is what engines install: per node, each policy's rules with peers resolved to
  *peer sets* (disjoint CIDR lists, named by a hash of the peer definition so that identical
  definitions share one set and a set keeps its name while its members change, as Calico names
  ipsets by selector), and per pod the policies that isolate it in each direction.
  :func:`diff` compares two tables once for every engine (kube-proxy's change-tracker role).

Kubernetes semantics implemented (one namespace, the lab's): a pod selected by a policy with
``Ingress`` (``Egress``) in its types is isolated for ingress (egress); traffic of an isolated pod is
allowed if any rule of any policy selecting it matches (union; order does not matter). A rule with
no peers matches every peer, with no ports every port and protocol. ``ipBlock`` matches an address in
``cidr`` and in no ``except``; it applies to pod addresses too. A connection needs the egress side of
its client and the ingress side of its server; replies of an allowed connection are allowed.

Bulk groups (``count``) expand with :func:`expand`: policy ``<name>-<i>`` selects the group's pods
and has ``rules`` rules per type; rule ``k`` allows the peer ``peer_cidr[i*rules + k]/32`` on TCP
port ``10000 + k``. Those peers are addresses no pod has: bulk policies isolate the pods they select
and add rules to walk, but let no lab traffic through themselves.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from .. import addressing
from ..spec import (BULK_BASE_PORT, DEFAULT_BULK_PEER_CIDR, IPBlock, PolicyPeer, PolicyPort, PolicyRule,
                    PolicySpec, Spec)

INGRESS, EGRESS = "Ingress", "Egress"
_ALL = (IPv4Network("0.0.0.0/1"), IPv4Network("128.0.0.0/1"))  # 0/0 as ipset hash:net can hold it


# ---------------------------------------------------------------- expansion

def expand(policies: Iterable[PolicySpec]) -> list[PolicySpec]:
    """Every policy of a spec, bulk groups expanded, in spec order."""
    out: list[PolicySpec] = []
    for pol in policies:
        if not pol.bulk:
            out.append(pol)
            continue
        base = int(IPv4Network(pol.peer_cidr or DEFAULT_BULK_PEER_CIDR).network_address)
        rules = 1 if pol.rules is None else pol.rules
        types = pol.types
        for i in range(pol.count):
            made = tuple(PolicyRule((PolicyPeer(ip_block=IPBlock(f"{IPv4Address(base + i * rules + k)}/32")),),
                                    (PolicyPort("TCP", BULK_BASE_PORT + k),)) for k in range(rules))
            out.append(PolicySpec(f"{pol.name}-{i}", pol.pod_selector, types,
                                  made if INGRESS in types else (), made if EGRESS in types else ()))
    return out


# ---------------------------------------------------------------- the oracle

def _peer_matches(peer: PolicyPeer, ip: IPv4Address, labels: Mapping[str, str] | None) -> bool:
    if peer.ip_block is not None:
        b = peer.ip_block
        return ip in IPv4Network(b.cidr) and not any(ip in IPv4Network(e) for e in b.except_)
    if labels is None:  # not a pod
        return False
    return all(labels.get(k) == v for k, v in (peer.pod_selector or {}).items())


def _port_matches(ports: tuple[PolicyPort, ...], proto: str, port: int) -> bool:
    return not ports or any(p.protocol == proto and (p.port is None or p.port == port) for p in ports)


def _side_allows(policies: list[PolicySpec], labels: Mapping[str, str], direction: str, peer_ip: IPv4Address,
                 peer_labels: Mapping[str, str] | None, proto: str, port: int) -> bool:
    selecting = [pol for pol in policies if direction in pol.types and pol.selects_labels(labels)]
    if not selecting:
        return True  # not isolated in this direction
    for pol in selecting:
        for rule in (pol.ingress if direction == INGRESS else pol.egress):
            if _port_matches(rule.ports, proto, port) and (
                    not rule.peers or any(_peer_matches(x, peer_ip, peer_labels) for x in rule.peers)):
                return True
    return False


class Oracle:
    """Kubernetes' verdict for connections between a spec's pods (and to outside addresses)."""

    def __init__(self, spec: Spec, plan: addressing.AddressPlan | None = None):
        self.spec = spec
        self.plan = plan or addressing.plan(spec)
        self.policies = expand(spec.policies)
        self.pods = {p.name: p for _, p in spec.pods()}
        self.by_ip = {str(pp.ip): name for name, pp in self.plan.pods.items()}

    def ip(self, pod: str) -> IPv4Address:
        return IPv4Address(str(self.plan.pods[pod].ip))

    def isolated(self, pod: str, direction: str) -> bool:
        labels = self.pods[pod].labels
        return any(direction in p.types and p.selects_labels(labels) for p in self.policies)

    def allowed(self, src: str, dst: str, port: int, proto: str = "TCP") -> bool:
        """Whether a new connection from pod ``src`` to pod ``dst`` on ``port``/``proto`` is allowed."""
        s, d = self.pods[src], self.pods[dst]
        return (_side_allows(self.policies, s.labels, EGRESS, self.ip(dst), d.labels, proto, port)
                and _side_allows(self.policies, d.labels, INGRESS, self.ip(src), s.labels, proto, port))

    def allowed_ip(self, src: str | None, src_ip: str, dst: str | None, dst_ip: str, port: int,
                   proto: str = "TCP") -> bool:
        """Like :meth:`allowed` for any addresses (``None`` for a side that is not a lab pod)."""
        s = self.pods[src].labels if src else None
        d = self.pods[dst].labels if dst else None
        ok_egress = s is None or _side_allows(self.policies, s, EGRESS, IPv4Address(dst_ip), d, proto, port)
        ok_ingress = d is None or _side_allows(self.policies, d, INGRESS, IPv4Address(src_ip), s, proto, port)
        return ok_egress and ok_ingress


def matrix_ports(spec: Spec, limit: int = 6) -> list[tuple[str, int]]:
    """(protocol, port) pairs a policy matrix probes: TCP 8080 (every pod's server) plus the ports
    explicit policies name, at most ``limit``; every one is served by every pod (lkserver)."""
    out = [("TCP", 8080)]
    for pol in spec.policies:
        if pol.bulk:
            continue
        for rule in pol.ingress + pol.egress:
            for p in rule.ports:
                key = (p.protocol, p.port if p.port is not None else 8080)
                if key not in out:
                    out.append(key)
    return out[:limit]


def server_ports(spec: Spec) -> set[int]:
    """Ports the in-pod servers must listen on for the policy matrix (TCP and UDP each)."""
    return {port for _, port in matrix_ports(spec)} if spec.policies else set()


# ---------------------------------------------------------------- compiled tables

@dataclass(frozen=True, order=True)
class PortMatch:
    """One compiled port: ``protocol`` None = every protocol (then ``port`` is None too)."""

    protocol: str | None
    port: int | None


@dataclass(frozen=True)
class PeerSet:
    """A rule's peers as disjoint CIDRs (pod addresses as /32s). ``name``: ``LKPOL-S-<hash>``."""

    name: str
    cidrs: tuple[str, ...]
    static: bool = False  # only ipBlocks: the members never change with pods


@dataclass(frozen=True)
class CompiledRule:
    peers: str | None  # PeerSet name; None: every peer
    ports: tuple[PortMatch, ...]  # empty: every port and protocol


@dataclass(frozen=True)
class CompiledPolicy:
    name: str
    ingress: tuple[CompiledRule, ...] | None  # None: the policy does not have the Ingress type
    egress: tuple[CompiledRule, ...] | None


@dataclass(frozen=True)
class PodPolicy:
    """One pod of the node as engines see it: its address, where it can be enforced, and which
    policies isolate it in each direction (None: not isolated in that direction)."""

    pod: str
    ip: str
    mode: str
    ingress: tuple[str, ...] | None
    egress: tuple[str, ...] | None

    @property
    def isolated(self) -> bool:
        return self.ingress is not None or self.egress is not None


@dataclass(frozen=True)
class PolicyTable:
    """What one node enforces. Empty = no policy touches its pods."""

    policies: Mapping[str, CompiledPolicy] = field(default_factory=dict)
    sets: Mapping[str, PeerSet] = field(default_factory=dict)
    pods: Mapping[str, PodPolicy] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.policies)

    def rules(self) -> int:
        return sum(len(p.ingress or ()) + len(p.egress or ()) for p in self.policies.values())


def hash16(text: str) -> str:
    """kube-proxy's chain-name hash: first 16 characters of base32(sha256(text))."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def peer_cidrs(peers: Iterable[PolicyPeer], pods: Mapping[str, tuple[Mapping[str, str], str]]) -> list[IPv4Network]:
    """Disjoint CIDRs of a rule's peers: matching pods as /32s, ipBlocks minus their excepts."""
    nets: list[IPv4Network] = []
    for peer in peers:
        if peer.ip_block is None:
            sel = peer.pod_selector or {}
            nets += [IPv4Network(f"{ip}/32") for labels, ip in pods.values()
                     if all(labels.get(k) == v for k, v in sel.items())]
            continue
        parts = [IPv4Network(peer.ip_block.cidr)]
        for exc in peer.ip_block.except_:
            e = IPv4Network(exc)
            nxt = []
            for net in parts:
                if e.subnet_of(net):
                    nxt += list(net.address_exclude(e)) if e != net else []
                elif not net.subnet_of(e):
                    nxt.append(net)
            parts = nxt
        nets += parts
    out: list[IPv4Network] = []
    for net in ipaddress.collapse_addresses(nets):
        out += _ALL if net.prefixlen == 0 else [net]
    return out


def _peer_key(peers: tuple[PolicyPeer, ...]) -> str:
    parts = []
    for x in peers:
        if x.ip_block is None:
            parts.append("pod:" + ",".join(f"{k}={v}" for k, v in sorted((x.pod_selector or {}).items())))
        else:
            parts.append(f"ip:{x.ip_block.cidr}-" + ",".join(sorted(x.ip_block.except_)))
    return "|".join(sorted(parts))


def _ports(ports: tuple[PolicyPort, ...]) -> tuple[PortMatch, ...]:
    return tuple(sorted({PortMatch(p.protocol, p.port) for p in ports}, key=lambda m: (m.protocol, m.port or 0)))


def compile_table(spec: Spec, node: str | None = None, plan: addressing.AddressPlan | None = None,
                  policies: list[PolicySpec] | None = None) -> PolicyTable:
    """The table of one node (``None``: of every pod). ``policies`` overrides the spec's (already
    expanded) policies, e.g. for scale experiments that change them on a live lab."""
    plan = plan or addressing.plan(spec)
    policies = expand(spec.policies) if policies is None else policies
    pods = {p.name: (p.labels, str(plan.pods[p.name].ip)) for _, p in spec.pods()}
    mine = [(p, n) for n, p in spec.pods() if node is None or n.name == node]
    sets: dict[str, PeerSet] = {}
    cache: dict[str, str] = {}
    compiled: dict[str, CompiledPolicy] = {}
    pod_pols: dict[str, dict[str, list[str]]] = {p.name: {INGRESS: [], EGRESS: []} for p, _ in mine}

    def rules(rs: tuple[PolicyRule, ...]) -> tuple[CompiledRule, ...]:
        out = []
        for r in rs:
            name = None
            if r.peers:
                key = _peer_key(r.peers)
                name = cache.get(key)
                if name is None:
                    name = cache[key] = "LKPOL-S-" + hash16(key)
                    sets[name] = PeerSet(name, tuple(str(n) for n in peer_cidrs(r.peers, pods)),
                                         all(x.ip_block is not None for x in r.peers))
            out.append(CompiledRule(name, _ports(r.ports)))
        return tuple(out)

    for pol in policies:
        selected = [p for p, _ in mine if pol.selects(p)]
        if not selected:
            continue
        types = pol.types
        compiled[pol.name] = CompiledPolicy(pol.name, rules(pol.ingress) if INGRESS in types else None,
                                            rules(pol.egress) if EGRESS in types else None)
        for p in selected:
            for t in types:
                pod_pols[p.name][t].append(pol.name)
    out_pods = {}
    for p, _ in mine:
        ing, eg = pod_pols[p.name][INGRESS], pod_pols[p.name][EGRESS]
        if ing or eg:
            out_pods[p.name] = PodPolicy(p.name, pods[p.name][1], p.mode, tuple(ing) if ing else None,
                                         tuple(eg) if eg else None)
    return PolicyTable(compiled, sets, out_pods)


# ---------------------------------------------------------------- change tracking

@dataclass(frozen=True)
class PolicyDiff:
    """What changed between two tables. ``full``: nothing is known to be installed."""

    full: bool
    policies_added: tuple[str, ...] = ()
    policies_removed: tuple[str, ...] = ()
    policies_changed: tuple[str, ...] = ()
    sets_added: tuple[str, ...] = ()
    sets_removed: tuple[str, ...] = ()
    sets_changed: tuple[str, ...] = ()
    pods_changed: tuple[str, ...] = ()  # added, removed or with other policies / address

    @property
    def empty(self) -> bool:
        return not self.full and not any((self.policies_added, self.policies_removed, self.policies_changed,
                                          self.sets_added, self.sets_removed, self.sets_changed,
                                          self.pods_changed))

    def counts(self) -> dict[str, int]:
        return {"policies_added": len(self.policies_added), "policies_removed": len(self.policies_removed),
                "policies_changed": len(self.policies_changed), "sets_changed": len(self.sets_added)
                + len(self.sets_removed) + len(self.sets_changed), "pods_changed": len(self.pods_changed)}


def _keyed_diff(old: Mapping, new: Mapping) -> tuple[tuple, tuple, tuple]:
    added = tuple(k for k in new if k not in old)
    removed = tuple(k for k in old if k not in new)
    changed = tuple(k for k in new if k in old and old[k] is not new[k] and old[k] != new[k])
    return added, removed, changed


def diff(old: PolicyTable | None, new: PolicyTable) -> PolicyDiff:
    if old is None:
        return PolicyDiff(True, tuple(new.policies), (), (), tuple(new.sets), (), (), tuple(new.pods))
    pa, pr, pc = _keyed_diff(old.policies, new.policies)
    sa, sr, sc = _keyed_diff(old.sets, new.sets)
    da, dr, dc = _keyed_diff(old.pods, new.pods)
    return PolicyDiff(False, pa, pr, pc, sa, sr, sc, da + dr + dc)
