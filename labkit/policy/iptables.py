"""``iptables`` policy engine: per-pod chains, per-policy chains and ipsets, as Calico and
kube-router enforce NetworkPolicy with netfilter.

Where (an *enforcement target* is one namespace and its pods):
  node   pods with a node-side path (``veth``, ``eni-policy-route``: routed ``lx-<pod>``;
         ``bridge``, ``overlay``: ports of ``cbr0``/``cni0``): ``FORWARD`` of the node jumps to
         ``LKPOL-FORWARD``, which sends traffic from a pod (``-i lx-<pod>``, or ``-s <ip>`` for a
         bridge port, where ``-i`` is the bridge) to its egress chain and traffic to it
         (``-o lx-<pod>`` / ``-d <ip>``) to its ingress chain. Bridged pod-to-pod traffic reaches
         ``FORWARD`` through ``br_netfilter`` (required for bridge/overlay pods).
  pod    pods whose traffic never crosses the node (``eni-exclusive``: its own ENI;
         ``eni-ipvlan``, ``macvlan``: slaves of an ENI): ``INPUT``/``OUTPUT`` inside the pod's
         namespace jump to ``LKPOL-INPUT``/``LKPOL-OUTPUT`` (loopback exempt).

Chains (names as kube-proxy makes them: a prefix and 16 characters of base32(sha256)):
  LKPOL-FORWARD / LKPOL-INPUT / LKPOL-OUTPUT   conntrack ESTABLISHED,RELATED returns first (replies
                                               and later packets of allowed connections), then
                                               the jumps to pod chains
  LKPOL-IN-<pod> / LKPOL-OUT-<pod>             clear mark 0x20000, jump to each policy chain that
                                               isolates the pod (spec order), RETURN as soon as
                                               one set the mark; DROP at the end (default deny)
  LKPOL-PI-<policy> / LKPOL-PE-<policy>        one rule per rule × port: peer ipset and port match
                                               set the mark (rules without peers: any peer)
ipsets ``LKPOL-S-<hash>`` (``hash:net``) hold each rule's peers (pod /32s and ipBlocks minus their
excepts), shared by rules with the same peer definition; a set's content changes by filling
``LKPOL-T-<hash>`` and swapping, so no packet sees a half-filled set. A rule whose peers are ipBlocks
amounting to one CIDR matches it inline (``-s``/``-d``), as Calico writes static CIDRs into rules.

Syncs, per target: full = one ``iptables-restore --noflush`` declaring every LKPOL chain (plus the
missing jump from the built-in chain and ``-X`` of stale LKPOL chains found by ``iptables-save``);
partial = only the chains of changed pods and policies, and ``-X`` of removed ones. Sets are
created/refilled before the restore and destroyed after it. The iptables flavour follows the lab's
Service datapath (``iptables-legacy`` with ``iptables-legacy``, else ``iptables-nft``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from .. import nsexec
from ..datapath.base import PodIface
from .base import PolicyEngine, register
from .model import INGRESS, CompiledRule, PodPolicy, PolicyDiff, PolicyTable, diff, hash16

MARK = "0x20000"  # bit 17: kube-proxy uses 14 (masquerade) and 15 (drop)
PREFIX = "LKPOL-"
TOP = {"node": ("FORWARD",), "pod": ("INPUT", "OUTPUT")}


# ---------------------------------------------------------------- names

def pod_chain(pod: str, direction: str) -> str:
    return f"{PREFIX}{'IN' if direction == INGRESS else 'OUT'}-{hash16(pod)}"


def policy_chain(policy: str, direction: str) -> str:
    return f"{PREFIX}{'PI' if direction == INGRESS else 'PE'}-{hash16(policy)}"


def top_chain(builtin: str) -> str:
    return f"{PREFIX}{builtin}"


def temp_set(name: str) -> str:
    return name.replace("LKPOL-S-", "LKPOL-T-", 1)


@dataclass(frozen=True)
class Target:
    """Where a group of pods is enforced: the node's namespace or one pod's own."""

    kind: str  # "node" or "pod"
    netns: str | None
    pods: tuple[PodIface, ...]


def targets(node_netns: str | None, pods: Iterable[PodIface]) -> list[Target]:
    pods = list(pods)
    out = [Target("node", node_netns, tuple(p for p in pods if not p.pod_mode.bypasses_node))]
    out += [Target("pod", p.netns, (p,)) for p in pods if p.pod_mode.bypasses_node]
    return out


def subset(table: PolicyTable, pods: Iterable[str]) -> PolicyTable:
    """The part of ``table`` that enforces ``pods``: their entries, their policies, those policies' sets."""
    mine = {p: table.pods[p] for p in pods if p in table.pods}
    names = {n for pp in mine.values() for n in (pp.ingress or ()) + (pp.egress or ())}
    pols = {n: pol for n, pol in table.policies.items() if n in names}
    sets = {r.peers for pol in pols.values() for r in (pol.ingress or ()) + (pol.egress or ()) if r.peers}
    return PolicyTable(pols, {s: table.sets[s] for s in table.sets if s in sets}, mine)


# ---------------------------------------------------------------- rendering (pure)

def _decl(chain: str) -> str:
    return f":{chain} - [0:0]"


def inline_cidr(table: PolicyTable, name: str) -> str | None:
    """The one CIDR a static peer set amounts to ("" for none), or None when it needs an ipset."""
    ps = table.sets[name]
    if ps.static and len(ps.cidrs) <= 1:
        return ps.cidrs[0] if ps.cidrs else ""
    return None


def ipsets_of(table: PolicyTable) -> list[str]:
    """The peer sets ``table`` needs as ipsets."""
    return [name for name in table.sets if inline_cidr(table, name) is None]


def rule_lines(chain: str, rules: tuple[CompiledRule, ...], direction: str,
               table: PolicyTable | None = None) -> list[str]:
    """A policy chain's rules: each rule × port sets the mark."""
    side = "src" if direction == INGRESS else "dst"
    out = []
    for rule in rules:
        peer = f" -m set --match-set {rule.peers} {side}" if rule.peers else ""
        cidr = inline_cidr(table, rule.peers) if rule.peers and table is not None else None
        if cidr == "":
            continue  # no peer at all: the rule matches nothing
        if cidr:
            peer = f" {'-s' if direction == INGRESS else '-d'} {cidr}"
        for pm in rule.ports or (None,):
            if pm is None or pm.protocol is None:
                port = ""
            else:
                proto = pm.protocol.lower()
                port = f" -p {proto}" + (f" -m {proto} --dport {pm.port}" if pm.port is not None else "")
            out.append(f"-A {chain}{port}{peer} -j MARK --set-xmark {MARK}/{MARK}")
    return out


def pod_lines(pp: PodPolicy, direction: str) -> list[str]:
    chain = pod_chain(pp.pod, direction)
    names = pp.ingress if direction == INGRESS else pp.egress
    out = [f"-A {chain} -j MARK --set-xmark 0x0/{MARK}"]
    for name in names or ():
        out.append(f"-A {chain} -j {policy_chain(name, direction)}")
        out.append(f"-A {chain} -m mark --mark {MARK}/{MARK} -j RETURN")
    out.append(f'-A {chain} -m comment --comment "default deny {direction.lower()} of {pp.pod}" -j DROP')
    return out


def _match(pod: PodIface, direction: str) -> str:
    """How a node's FORWARD recognises traffic to (ingress) or from (egress) a pod."""
    if pod.pod_mode.bridge:  # on a bridge -i/-o name the bridge: match the address
        return f"-d {pod.ip}/32" if direction == INGRESS else f"-s {pod.ip}/32"
    return f"-o {pod.ifname}" if direction == INGRESS else f"-i {pod.ifname}"


def top_lines(target: Target, table: PolicyTable) -> dict[str, list[str]]:
    """The target's top chains: conntrack first, then egress jumps, then ingress jumps (a packet
    between two pods of one node passes its client's egress and its server's ingress chain)."""
    est = "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
    if target.kind == "node":
        chain = top_chain("FORWARD")
        lines = [f"-A {chain} {est}"]
        for direction in ("Egress", INGRESS):
            for pod in target.pods:
                pp = table.pods.get(pod.pod)
                if pp is not None and (pp.ingress if direction == INGRESS else pp.egress) is not None:
                    lines.append(f"-A {chain} {_match(pod, direction)} -j {pod_chain(pod.pod, direction)}")
        return {chain: lines}
    pod = target.pods[0]
    pp = table.pods.get(pod.pod)
    out = {}
    for builtin, direction, lo in (("INPUT", INGRESS, "-i lo"), ("OUTPUT", "Egress", "-o lo")):
        chain = top_chain(builtin)
        lines = [f"-A {chain} {lo} -j RETURN", f"-A {chain} {est}"]
        if pp is not None and (pp.ingress if direction == INGRESS else pp.egress) is not None:
            lines.append(f"-A {chain} -j {pod_chain(pod.pod, direction)}")
        out[chain] = lines
    return out


def _policy_chains(table: PolicyTable, names: Iterable[str]) -> dict[str, list[str]]:
    out = {}
    for name in names:
        pol = table.policies[name]
        for direction, rules in ((INGRESS, pol.ingress), ("Egress", pol.egress)):
            if rules is not None:
                chain = policy_chain(name, direction)
                out[chain] = rule_lines(chain, rules, direction, table)
    return out


def _pod_chains(table: PolicyTable, pods: Iterable[str]) -> dict[str, list[str]]:
    out = {}
    for name in pods:
        pp = table.pods.get(name)
        if pp is None:
            continue
        for direction, names in ((INGRESS, pp.ingress), ("Egress", pp.egress)):
            if names is not None:
                out[pod_chain(name, direction)] = pod_lines(pp, direction)
    return out


def chains_of(table: PolicyTable, target: Target) -> set[str]:
    """Every LKPOL chain ``table`` needs in ``target``."""
    return (set(top_lines(target, table)) | set(_policy_chains(table, table.policies))
            | set(_pod_chains(table, table.pods)))


def render_restore(target: Target, desired: PolicyTable, changes: PolicyDiff, *, missing_jumps: Iterable[str] = (),
                   stale: Iterable[str] = (), old: PolicyTable | None = None) -> str:
    """The ``iptables-restore --noflush`` input of one sync of one target.

    Full: every chain; ``missing_jumps`` are built-in chains that lack their jump to LKPOL-<chain>;
    ``stale`` are LKPOL chains in the kernel that ``desired`` does not need (flushed, deleted).
    Partial: top chains (cheap: one rule per pod), the chains of changed pods and of added/changed
    policies, and deletion of the chains of removed ones (their pods are rewritten in the same
    restore, so nothing references them any more)."""
    chains = dict(top_lines(target, desired))
    if changes.full:
        chains.update(_policy_chains(desired, desired.policies))
        chains.update(_pod_chains(desired, desired.pods))
        gone = set(stale)
    else:
        chains.update(_policy_chains(desired, changes.policies_added + changes.policies_changed))
        chains.update(_pod_chains(desired, changes.pods_changed))
        gone = set()
        if old is not None:
            gone = chains_of(old, target) - chains_of(desired, target)
    gone -= set(chains)
    lines = ["*filter"] + [_decl(c) for c in chains] + [_decl(c) for c in sorted(gone)]
    for builtin in missing_jumps:
        lines.append(f"-I {builtin} 1 -j {top_chain(builtin)}")
    for body in chains.values():
        lines += body
    lines += [f"-X {c}" for c in sorted(gone)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def render_sets(desired: PolicyTable, names: Iterable[str]) -> str:
    """``ipset restore`` input that makes each named set hold exactly its peers, atomically per set
    (fill a temporary set, swap it in)."""
    lines = []
    for name in names:
        tmp = temp_set(name)
        lines += [f"create {name} hash:net family inet hashsize 64 maxelem 1048576 -exist",
                  f"create {tmp} hash:net family inet hashsize 64 maxelem 1048576 -exist", f"flush {tmp}"]
        lines += [f"add {tmp} {cidr}" for cidr in desired.sets[name].cidrs]
        lines += [f"swap {tmp} {name}", f"destroy {tmp}"]
    return "\n".join(lines) + ("\n" if lines else "")


def parse_save(text: str) -> tuple[set[str], set[str]]:
    """(LKPOL chains, built-in chains holding a jump to their LKPOL top chain) of ``iptables-save -t filter``."""
    chains, jumped = set(), set()
    for line in text.splitlines():
        if line.startswith(f":{PREFIX}"):
            chains.add(line[1:].split()[0])
        elif line.startswith("-A ") and f"-j {PREFIX}" in line:
            parts = line.split()
            if not parts[1].startswith(PREFIX) and parts[-1] == top_chain(parts[1]):
                jumped.add(parts[1])
    return chains, jumped


def render_cleanup(save_text: str) -> str | None:
    """Restore input that removes every LKPOL chain and every jump to one (None: nothing to do)."""
    chains, _ = parse_save(save_text)
    jumps = [line.replace("-A ", "-D ", 1) for line in save_text.splitlines()
             if line.startswith("-A ") and not line.split()[1].startswith(PREFIX) and f"-j {PREFIX}" in line]
    if not chains and not jumps:
        return None
    return "\n".join(["*filter", *(_decl(c) for c in sorted(chains)), *jumps,
                      *(f"-X {c}" for c in sorted(chains)), "COMMIT"]) + "\n"


# ---------------------------------------------------------------- the engine

@register
class IptablesPolicy(PolicyEngine):
    name = "iptables"
    features: ClassVar[tuple[str, ...]] = ("ipset",)

    def __init__(self, ctx, datapath: str = ""):
        super().__init__(ctx, datapath)
        self.flavour = "legacy" if datapath == "iptables-legacy" else "nft"
        self._views: dict[str | None, PolicyTable] = {}

    @classmethod
    def preflight(cls, datapath: str = "") -> None:
        from .. import doctor

        super().preflight(datapath)
        doctor.require("iptables-legacy" if datapath == "iptables-legacy" else "iptables-nft",
                       "policy engine iptables")

    def _tool(self, verb: str = "") -> str:
        return f"iptables-{self.flavour}" + (f"-{verb}" if verb else "")

    def _run(self, netns: str | None, argv: list[str], input: str | None = None, check: bool = True):
        return nsexec.run(argv, netns, input=input, check=check)

    def targets(self) -> list[Target]:
        return targets(self.ctx.netns, self.ctx.pods)

    def apply(self, desired: PolicyTable, changes: PolicyDiff) -> None:
        if changes.full:
            self._views = {}
        for target in self.targets():
            self._apply_target(target, subset(desired, [p.pod for p in target.pods]))

    def _apply_target(self, target: Target, view: PolicyTable) -> None:
        old = self._views.get(target.netns)
        if old is None and not view.pods and target.kind == "pod":
            return  # a pod target nobody isolates: nothing to install, nothing known to remove
        self._views.pop(target.netns, None)  # unknown until this target is done
        changes = diff(old, view)
        if changes.empty:
            self._views[target.netns] = view
            return
        if changes.full:
            save = self._run(target.netns, [self._tool("save"), "-t", "filter"]).stdout
            have, jumped = parse_save(save)
            missing = [b for b in TOP[target.kind] if b not in jumped]
            stale = have - chains_of(view, target)
            sets = ipsets_of(view)
            text = render_restore(target, view, changes, missing_jumps=missing, stale=stale)
        else:
            needed = set(ipsets_of(view))
            sets = [n for n in changes.sets_added + changes.sets_changed if n in needed]
            text = render_restore(target, view, changes, old=old)
        if sets:
            self._run(target.netns, ["ipset", "restore"], input=render_sets(view, sets))
        self._run(target.netns, [self._tool("restore"), "-w", "--noflush"], input=text)
        self._destroy_sets(target.netns, keep=set(ipsets_of(view)),
                           only=None if changes.full else set(changes.sets_removed))
        self._views[target.netns] = view

    def _destroy_sets(self, netns: str | None, keep: set[str], only: set[str] | None) -> None:
        if only is not None and not only:
            return
        names = self._run(netns, ["ipset", "list", "-n"]).stdout.split()
        gone = [n for n in names if n.startswith(PREFIX) and n not in keep and (only is None or n in only)]
        if gone:
            self._run(netns, ["ipset", "restore"], input="".join(f"destroy {n}\n" for n in gone))

    def cleanup(self) -> None:
        self._applied = None
        self._views = {}
        for target in self.targets():
            if target.netns and not nsexec.netns_path(target.netns).exists():
                continue  # gone with its rules and sets
            for flavour in ("nft", "legacy"):  # whichever an earlier engine used
                tool = f"iptables-{flavour}"
                save = self._run(target.netns, [f"{tool}-save", "-t", "filter"], check=False)
                text = render_cleanup(save.stdout) if save.returncode == 0 else None
                if text:
                    self._run(target.netns, [f"{tool}-restore", "-w", "--noflush"], input=text)
            self._destroy_sets(target.netns, keep=set(), only=None)

    def describe(self) -> dict:
        info = super().describe()
        rules = 0
        for target in self.targets():
            if target.netns and not nsexec.netns_path(target.netns).exists():
                continue
            save = self._run(target.netns, [self._tool("save"), "-t", "filter"], check=False).stdout
            rules += sum(1 for line in save.splitlines() if line.startswith(f"-A {PREFIX}"))
        info["rules"] = rules
        return info
