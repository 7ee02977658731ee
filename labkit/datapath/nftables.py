"""kube-proxy's nftables mode (``pkg/proxy/nftables/proxier.go``) in table ``ip kube-proxy``.

The table is kube-proxy's own name: the node's network namespace belongs to the lab, so nothing else
uses it there (inside a VM node it is the VM's, which is the lab's too). Everything lives in that
table; :meth:`NftablesDatapath.cleanup` is ``delete table ip kube-proxy`` (kube-proxy's
``CleanupLeftovers``).

Shape, as kube-proxy writes it for ClusterIP services (cluster CIDR set, masquerade bit 14):
  base chains  filter-{prerouting,input,forward,output} at priority dstnat-10 (-110),
               filter-output-post-dnat at dstnat+10 (-90), nat-{prerouting,output} at dstnat (-100),
               nat-postrouting at srcnat (100) — written as numbers, because nft 1.0.6 rejects the
               symbolic ``dstnat`` in the output hook;
  dispatch     ``services``: ``ip daddr . meta l4proto . th dport vmap @service-ips``;
  no endpoint  ``@no-endpoint-services`` elements ``goto reject-chain`` (checked from the filter
               chains at ``ct state new``), so a client is refused at once, not left to time out;
  per service  ``service-<hash8>-ns/name/proto/port`` (masquerade mark for sources outside the
               cluster CIDR, then endpoint selection) and ``endpoint-<hash8>-ns/name/proto/port__ip/port``
               (hairpin mark, ``meta l4proto tcp dnat to ip:port``); ``<hash8>`` is kube-proxy's
               ``hashAndTruncate``: base32(sha256(the rest of the name)), 8 characters.

Endpoint selection — the one deliberate difference. kube-proxy writes one rule
``numgen random mod N vmap { 0 : goto endpoint-…, … }``: an anonymous set per service. Measured here
(6.18, 2 vCPUs, a machine shared with other work; ``time`` and ``perf`` on ``nft -f`` of generated
files in a throwaway netns; 3 endpoints per service):
  * in one transaction the time grows faster than the square: 1.3 s for 2,000 services, 9.1 s for
    4,000 (the prototype notes give 180-284 s for 20,000); ``__nft_set_trans_bind`` walks the
    whole transaction for every anonymous set it binds (42 % of the time at 4,000);
  * 20 transactions of 1,000 still took 105-121 s (the prototype notes: 39.5 s on a quieter day),
    the last ones 14 s each: every new set walks the table's whole list of sets three times
    (``nf_tables_newset``'s name lookup and its ``__map%d`` name allocation with sscanf,
    ``nft_set_lookup_global`` for the rule) — 80 % of the time at 20,000. The kernel keeps sets in
    a plain list, so any layout with one set per service is quadratic: named per-service maps
    (``vmap @svc-map``, 20 x 1,000) took 92 s;
  * one shared map keyed by ``numgen … offset`` is quadratic the other way: each element added is
    validated against every rule bound to the map (``nft_add_set_elem``, ``nft_rhash_walk`` at
    bind): 155 s in one transaction;
  * with no per-service set at all — one rule per endpoint, ``numgen random mod (N-i) == 0 goto
    endpoint-…`` and an unconditional ``goto`` for the last, i.e. kube-proxy's iptables
    ``--probability 1/(N-i)`` cascade in nft — 20,000 services load in ONE transaction in 9.5 s
    (13.6 s with the machine busy), linearly.
So the default selection is that cascade (``selection="rules"``). Everything that depends on the
number of services — the ``service-ips`` hash lookup, a chain per service and per endpoint, every
other rule — is kube-proxy's; per new connection the kernel evaluates up to N-1 ``numgen``/``cmp``
pairs instead of one ``numgen`` and a lookup in an N-element set (N = endpoints of that service,
independent of the number of services). ``nftables-vmap`` registers kube-proxy's exact rule
(``selection="vmap"``) for fidelity checks at small N; it loads in super-quadratic time (minutes
at 20,000).

Transactions. A full sync is ONE ``nft -f`` transaction that replaces the table (``add table`` +
``delete table`` + one ``table ip kube-proxy { … }`` block holding everything, sets declared once
with all their elements), so a failure leaves the previous rules untouched; kube-proxy instead
flushes its maps and re-adds, with the same end state. (The block form costs 20 % less nft CPU
than one command per object: 3.2 s instead of 4.0 s of user time for 20,000 services, plus ~4 s
in the kernel.) A partial sync writes objects as declarations (``add chain X { rule ; rule ; }``,
``add map M { …; elements = { … } ; }``) rather than ``add rule``/``add element`` lines:
nft 1.0.6 (Debian 12) dumps every chain of the ruleset before running any ``add rule``,
``add element`` or ``delete`` command — 0.8-1.3 s with 80,000 chains, from ``nf_tables_dump_chains``
restarting its walk per netlink message — but not before a declaration (measured: adding one
service at 20,000 takes 0.03-0.06 s this way, ~1 s the other). A partial sync adds the chains and
elements of new services, flushes and rewrites the chains of changed ones, and deletes elements,
then flushes and deletes the chains, of removed ones — in that order, in one transaction.
Deleting a chain in the transaction that drops its last reference works on this 6.18 kernel;
kube-proxy defers it by a second because kernels before 6.2 may still count the reference (not
tried on the VMs' 6.1 kernel: should it fail there, the sync raises and the next one is full,
which replaces the table). Deletions pay nft's chain dump (~1 s at 20,000 services); additions and
endpoint changes do not.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from ..services import Endpoint, ServicePort, ServiceTable, TableDiff
from .base import Datapath, register
from .iptables import b32_prefix

TABLE = "ip kube-proxy"
MASQ_MARK = "0x004000"  # kube-proxy's "%#08x" of 1 << 14
CHAIN_NAME_BASE_MAX = 256 - 16  # knftables.NameLengthMax - chainNamePrefixLengthMax
SELECTIONS = ("rules", "vmap")

SETS = {  # name -> (type, comment), in kube-proxy's setupNFTables order
    "cluster-ips": ("ipv4_addr", "Active ClusterIPs"),
    "no-endpoint-services": ("ipv4_addr . inet_proto . inet_service : verdict",
                             "vmap to drop or reject packets to services with no endpoints"),
    "no-endpoint-nodeports": ("inet_proto . inet_service : verdict",
                              "vmap to drop or reject packets to service nodeports with no endpoints"),
    "firewall-ips": ("ipv4_addr . inet_proto . inet_service : verdict",
                     "destinations that are subject to LoadBalancerSourceRanges"),
    "service-ips": ("ipv4_addr . inet_proto . inet_service : verdict",
                    "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
    "service-nodeports": ("inet_proto . inet_service : verdict", "NodePort traffic"),
}

# (name, type, hook, priority): kube-proxy's nftablesBaseChains
BASE_CHAINS = (
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)

# (destination, source base chain, extra match): kube-proxy's nftablesJumpChains, in order
JUMPS = (
    ("nodeport-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-forward", "ct state new"),
    ("service-endpoints-check", "filter-output", "ct state new"),
    ("firewall-check", "filter-prerouting", "ct state new"),
    ("firewall-check", "filter-output", "ct state new"),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new"),
    ("cluster-ips-check", "filter-output-post-dnat", "ct state new"),
)


# ---------------------------------------------------------------- names

def hash_and_truncate(name: str) -> str:
    """kube-proxy's ``hashAndTruncate``: ``<8 chars of base32(sha256(name))>-<name>``, truncated."""
    name = f"{b32_prefix(name, 8)}-{name}"
    return name if len(name) <= CHAIN_NAME_BASE_MAX else name[:CHAIN_NAME_BASE_MAX - 3] + "..."


def _base(sp: ServicePort) -> str:
    return f"{sp.namespace}/{sp.name}/{sp.proto}/{sp.port_name}"


def service_chain(sp: ServicePort) -> str:
    return "service-" + hash_and_truncate(_base(sp))


def endpoint_chain(sp: ServicePort, ep: Endpoint) -> str:
    return "endpoint-" + hash_and_truncate(f"{_base(sp)}__{ep.ip.replace(':', '.')}/{ep.port}")


def service_chains(sp: ServicePort) -> list[str]:
    """The chains a service port owns: endpoints first (they must exist before the service chain
    that jumps to them), then the service chain; none without endpoints."""
    if not sp.endpoints:
        return []
    return [endpoint_chain(sp, ep) for ep in sp.endpoints] + [service_chain(sp)]


# ---------------------------------------------------------------- objects
#
# Every object is (kind, name, statements). A full sync writes them inside one
# ``table ip kube-proxy { … }`` block; a partial sync writes ``add <kind> ip kube-proxy <name>
# { … }`` commands (the same objects; nft fills the table block in the order chains, sets with
# their elements, rules, so references resolve either way).

Obj = tuple[str, str, list[str]]


def _command(obj: Obj) -> str:
    kind, name, body = obj
    return f"add {kind} {TABLE} {name}" + (" { " + " ; ".join(body) + " ; }" if body else "")


def _in_block(obj: Obj) -> str:
    kind, name, body = obj
    return f"\t{kind} {name} {{ " + " ; ".join(body) + (" ; }" if body else "}")


def endpoint_rules(sp: ServicePort, ep: Endpoint) -> list[str]:
    return [f"ip saddr {ep.ip} jump mark-for-masquerade",
            f"meta l4proto {sp.proto} dnat to {ep.ip}:{ep.port}"]


def selection_rules(sp: ServicePort, selection: str) -> list[str]:
    """How the service chain picks an endpoint (see the module docstring)."""
    chains = [endpoint_chain(sp, ep) for ep in sp.endpoints]
    n = len(chains)
    if selection == "vmap":
        return [f"numgen random mod {n} vmap {{ " + " , ".join(f"{i} : goto {c}" for i, c in enumerate(chains)) + " }"]
    return [(f"numgen random mod {n - i} == 0 " if i < n - 1 else "") + f"goto {c}" for i, c in enumerate(chains)]


def service_rules(sp: ServicePort, cluster_cidr: str, selection: str) -> list[str]:
    return [f"ip daddr {sp.cluster_ip} {sp.proto} dport {sp.port} ip saddr != {cluster_cidr} jump mark-for-masquerade",
            *selection_rules(sp, selection)]


def service_objects(sp: ServicePort, cluster_cidr: str, selection: str) -> list[Obj]:
    """The chains of one service port with their rules, endpoints first (as :func:`service_chains`)."""
    out: list[Obj] = [("chain", endpoint_chain(sp, ep), endpoint_rules(sp, ep)) for ep in sp.endpoints]
    if sp.endpoints:
        out.append(("chain", service_chain(sp), service_rules(sp, cluster_cidr, selection)))
    return out


def _key(sp: ServicePort) -> str:
    return f"{sp.cluster_ip} . {sp.proto} . {sp.port}"


def _set(name: str, elems: list[str] | None = None) -> Obj:
    typ, comment = SETS[name]
    body = [f"type {typ}", f'comment "{comment}"'] + ([f"elements = {{ {', '.join(elems)} }}"] if elems else [])
    return ("map" if ":" in typ else "set", name, body)


def element_objects(ports: Iterable[ServicePort]) -> list[Obj]:
    """cluster-ips, service-ips and no-endpoint-services carrying the elements of ``ports`` (one
    declaration per set: elements are batched)."""
    ports = list(ports)
    elems = {
        "cluster-ips": list(dict.fromkeys(sp.cluster_ip for sp in ports)),
        "service-ips": [f"{_key(sp)} : goto {service_chain(sp)}" for sp in ports if sp.endpoints],
        "no-endpoint-services": [f'{_key(sp)} comment "{sp.key}" : goto reject-chain' for sp in ports if not sp.endpoints],
    }
    return [_set(name, e) for name, e in elems.items() if e]


def element_deletes(ports: Iterable[ServicePort], keep_ips: set[str]) -> list[str]:
    """Delete the elements of ``ports``; a ClusterIP leaves @cluster-ips only when no port in
    ``keep_ips`` (the desired table) still uses it (a Service with several ports shares one IP)."""
    ports = list(ports)
    ips = [ip for ip in dict.fromkeys(sp.cluster_ip for sp in ports) if ip not in keep_ips]
    out = [f"delete element {TABLE} cluster-ips {{ {', '.join(ips)} }}"] if ips else []
    with_eps = [_key(sp) for sp in ports if sp.endpoints]
    without = [_key(sp) for sp in ports if not sp.endpoints]
    if with_eps:
        out.append(f"delete element {TABLE} service-ips {{ {', '.join(with_eps)} }}")
    if without:
        out.append(f"delete element {TABLE} no-endpoint-services {{ {', '.join(without)} }}")
    return out


def setup_objects(service_cidr: str) -> list[Obj]:
    """kube-proxy's ``setupNFTables``: sets and maps, the regular chains with their fixed rules, then
    the base chains with the jumps."""
    out = [_set(name) for name in SETS]
    out += [
        ("chain", "mark-for-masquerade", [f"mark set mark or {MASQ_MARK}"]),
        ("chain", "masquerading", [f"mark and {MASQ_MARK} == 0 return", f"mark set mark xor {MASQ_MARK}",
                                   "masquerade fully-random"]),
        ("chain", "reject-chain", ['comment "helper for @no-endpoint-services / @no-endpoint-nodeports"', "reject"]),
        ("chain", "services", ["ip daddr . meta l4proto . th dport vmap @service-ips",
                               "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"]),
        ("chain", "service-endpoints-check", ["ip daddr . meta l4proto . th dport vmap @no-endpoint-services"]),
        ("chain", "nodeport-endpoints-check", ["ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports"]),
        ("chain", "firewall-check", ["ip daddr . meta l4proto . th dport vmap @firewall-ips"]),
        ("chain", "cluster-ips-check", ['ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"',
                                        f'ip daddr {{ {service_cidr} }} drop comment "Drop traffic to unallocated ClusterIPs"']),
    ]
    for name, typ, hook, prio in BASE_CHAINS:
        jumps = [f"{extra} jump {dst}".strip() for dst, src, extra in JUMPS if src == name]
        out.append(("chain", name, [f"type {typ} hook {hook} priority {prio}", *jumps]))
    return out


# ---------------------------------------------------------------- transactions

def render_full(table: ServiceTable, cluster_cidr: str, service_cidr: str, selection: str = "rules") -> str:
    """One transaction replacing the table with one holding ``table`` (``add`` + ``delete`` first,
    so that it works whether or not the table exists)."""
    _check(selection)
    objs = setup_objects(service_cidr)
    for sp in table:
        objs += service_objects(sp, cluster_cidr, selection)
    filled = {name: obj for obj in element_objects(table) for name in [obj[1]]}
    objs = [filled.get(o[1], o) if o[0] != "chain" else o for o in objs]  # sets declared once, with elements
    return "\n".join([f"add table {TABLE}", f"delete table {TABLE}", f"table {TABLE} {{",
                      '\tcomment "rules for kube-proxy"', *map(_in_block, objs), "}"]) + "\n"


def render_partial(desired: ServiceTable, changes: TableDiff, cluster_cidr: str, selection: str = "rules") -> str:
    """One transaction applying ``changes``: new chains, rewritten chains, new elements, then element
    deletions, then flush + delete of the chains nothing uses any more."""
    _check(selection)
    out: list[str] = []
    old_chains: set[str] = set()
    for old, _ in changes.changed:
        old_chains.update(service_chains(old))
    touched = {sp.key for sp in changes.added} | {new.key for _, new in changes.changed}
    new_ports = [sp for sp in desired if sp.key in touched]  # in install order
    for sp in new_ports:
        for obj in service_objects(sp, cluster_cidr, selection):
            if obj[1] in old_chains:  # rewrite in place: flush, then the declaration re-adds the rules
                out.append(f"flush chain {TABLE} {obj[1]}")
            out.append(_command(obj))
    # elements whose key or verdict changed: old ones out, new ones in
    moved = [(old, new) for old, new in changes.changed
             if _key(old) != _key(new) or bool(old.endpoints) != bool(new.endpoints)]
    gone = [*changes.removed, *(old for old, _ in moved)]
    out += element_deletes(gone, {sp.cluster_ip for sp in desired})
    out += map(_command, element_objects([*changes.added, *(new for _, new in moved)]))
    kept = {c for sp in new_ports for c in service_chains(sp)}
    stale = [c for sp in [*changes.removed, *(old for old, _ in changes.changed)]
             for c in reversed(service_chains(sp)) if c not in kept]  # service chain before its endpoints
    out += [f"flush chain {TABLE} {c}" for c in stale]
    out += [f"delete chain {TABLE} {c}" for c in stale]
    return "\n".join(out) + "\n" if out else ""


def render_cleanup() -> str:
    """Delete the table whether or not it exists (``add`` first makes ``delete`` always valid)."""
    return f"add table {TABLE}\ndelete table {TABLE}\n"


def _check(selection: str) -> None:
    if selection not in SELECTIONS:
        raise ValueError(f"unknown endpoint selection {selection!r}; known: {', '.join(SELECTIONS)}")


# ---------------------------------------------------------------- the datapath

@register
class NftablesDatapath(Datapath):
    """kube-proxy nftables mode with linear-time endpoint selection (see the module docstring)."""

    name = "nftables"
    features = ("nftables",)
    selection: ClassVar[str] = "rules"

    def _nft(self, text: str) -> None:
        if text:
            self.ctx.run(["nft", "-f", "-"], input=text)

    def apply(self, desired: ServiceTable, changes: TableDiff) -> None:
        if changes.full:
            self._nft(render_full(desired, self.ctx.pod_cidr, self.ctx.service_cidr, self.selection))
        else:
            self._nft(render_partial(desired, changes, self.ctx.pod_cidr, self.selection))

    def cleanup(self) -> None:
        self._nft(render_cleanup())
        self._applied = None

    def describe(self) -> dict:
        d = super().describe()
        d["selection"] = self.selection
        return d

    def walk(self, key: str | None) -> dict:
        """A new connection is one lookup in the service-ips verdict map, whatever its place (a pod
        address misses in one lookup too): the map's elements (one per service port with endpoints)
        say how big the table it looks in is."""
        if self._applied is None or (key is not None and key not in self._applied):
            raise KeyError(f"service port {key!r} is not in the applied table")
        return {"rules_walked": 0, "set_elements": sum(1 for sp in self._applied if sp.endpoints)}


@register
class NftablesVmapDatapath(NftablesDatapath):
    """kube-proxy's exact ``numgen random mod N vmap {…}`` selection; quadratic load time."""

    name = "nftables-vmap"
    selection = "vmap"
