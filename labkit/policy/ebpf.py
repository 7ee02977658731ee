"""``ebpf`` policy engine: tc programs on every pod's interface and per-pod policy maps (Cilium's
model, with LPM tries of allowed peers instead of security identities).

``bpf/bpf_policy.c`` is compiled with bcc once per node, its two programs pinned, and attached with
tc clsact (priority :data:`TC_PREF`, before the ``ebpf-tc`` Service datapath's filters, which still
run since allowed packets return ``TC_ACT_UNSPEC``):

  pods whose traffic crosses the node (their mode's ``bypasses_node`` is false: veth, bridge,
  overlay, eni-policy-route), on the node-side interface ``lx-<pod>``
      tc ingress of ``lx-<pod>`` → ``lk_pol_from_pod``; tc egress → ``lk_pol_to_pod``
  pods whose traffic bypasses the node (eni-exclusive: its own ENI; eni-ipvlan, macvlan), and any
  pod without a node-side interface, inside the pod on every interface but ``lo``
      tc egress → ``lk_pol_from_pod``; tc ingress → ``lk_pol_to_pod``

A :class:`~labkit.policy.model.PolicyTable` is *flattened* per pod (:func:`flatten`, pure): one
``lk_pol_ep`` entry with the pod's isolated directions, and one ``lk_pol_v4`` LPM entry per
(direction, rule peer CIDR, port) of every policy isolating it. A sync writes only the entries of the
pods a change touches (the pods whose own entry changed, or whose policies or peer sets did), in one
batch per map and kind: rules are written before the endpoint entries that make them matter and
deleted after, so no packet meets an isolated pod whose rules are half written.

Established traffic: the programs remember each allowed flow and its reply in ``lk_pol_flow`` (an
LRU), per pod and direction, so later packets and replies skip the lookup, as conntrack's
ESTABLISHED rule does for iptables. As with conntrack, a policy change does not cut flows already
allowed; evicted entries are re-checked, and a reply whose flow was evicted is judged as new.

Loading and attaching are the eBPF runtime's (:mod:`labkit.ebpf`), shared with the eBPF Service
datapaths: pins in the private bpffs under the node's state folder, folder ``policy-ebpf/``, and
``policy-ebpf.json`` recording where filters were attached (for cleanup after the loader is gone).
The engine's filters are told from the Service datapath's by their priority and ``lk_pol_`` names.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .. import nsexec
from ..ebpf.libbpf import PROG_SCHED_CLS
from ..ebpf.loader import Bpffs, Program
from ..ebpf.maps import PinnedMap
from ..ebpf.netlink import netlink
from ..ebpf.tc import CLIENTS, TC_EGRESS, TC_INGRESS, TcAttachments, TcHook
from ..errors import DatapathError
from . import ebpf_structs as S
from .base import PolicyEngine, register
from .model import PolicyDiff, PolicyTable

TC_NAMES = "lk_pol_"  # prefix of the filters' names (the programs')
TC_PREF = CLIENTS[TC_NAMES]  # 0x4C40: before the ebpf-tc Service datapath; lower runs first
FROM_POD, TO_POD = "lk_pol_from_pod", "lk_pol_to_pod"
PROGRAMS = (Program(FROM_POD, PROG_SCHED_CLS), Program(TO_POD, PROG_SCHED_CLS))
SOURCE = "bpf_policy.c"
FOLDER = "policy-ebpf"


# ---------------------------------------------------------------- flattening (pure)

@dataclass
class PodEntries:
    """What one pod holds in the maps: its lk_pol_ep value and its lk_pol_v4 entries (packed)."""

    endpoint: bytes  # packed policy_endpoint
    rules: dict[bytes, bytes] = field(default_factory=dict)  # packed policy_key -> packed policy_entry


def flatten(table: PolicyTable, pods: Iterable[str] | None = None) -> dict[bytes, PodEntries]:
    """Packed map entries of ``pods`` (default: every pod of ``table``), by packed pod address."""
    index = {name: i for i, name in enumerate(table.policies)}
    nets: dict[str, tuple[bytes, int]] = {}
    out: dict[bytes, PodEntries] = {}
    pack_key, pack_val = S.POLICY_KEY.pack, S.POLICY_ENTRY.pack
    for name in (table.pods if pods is None else pods):
        pp = table.pods.get(name)
        if pp is None:
            continue
        ep = socket.inet_aton(pp.ip)
        isolated = (S.POL_INGRESS if pp.ingress is not None else 0) | (S.POL_EGRESS if pp.egress is not None else 0)
        policies = set(pp.ingress or ()) | set(pp.egress or ())
        entries = PodEntries(S.POLICY_ENDPOINT.pack(isolated, len(policies)))
        rules = entries.rules
        for direction, names in ((S.POL_INGRESS, pp.ingress), (S.POL_EGRESS, pp.egress)):
            for pol_name in names or ():
                pol = table.policies[pol_name]
                value = pack_val(index[pol_name], 0)
                for rule in (pol.ingress if direction == S.POL_INGRESS else pol.egress) or ():
                    cidrs = table.sets[rule.peers].cidrs if rule.peers else ("0.0.0.0/0",)
                    ports = [(S.IPPROTO[p.protocol] if p.protocol else 0, p.port or 0) for p in rule.ports] or [(0, 0)]
                    for cidr in cidrs:
                        net = nets.get(cidr)
                        if net is None:  # compiled CIDRs are canonical: no need for ipaddress (slow)
                            addr, _, plen = cidr.partition("/")
                            net = nets[cidr] = (socket.inet_aton(addr), int(plen or 32))
                        for proto, port in ports:
                            key = pack_key(S.PREFIX_FIXED + net[1], ep, direction, proto, port.to_bytes(2, "big"),
                                           net[0])
                            rules.setdefault(key, value)
        out[ep] = entries
    return out


def affected_pods(old: PolicyTable | None, new: PolicyTable, changes: PolicyDiff) -> set[str]:
    """Pods whose map entries may differ between ``old`` and ``new``."""
    if old is None or changes.full:
        return set(new.pods) | set(old.pods if old else ())
    pols = set(changes.policies_added + changes.policies_removed + changes.policies_changed)
    sets = set(changes.sets_added + changes.sets_removed + changes.sets_changed)
    for table in (old, new):
        for name, pol in table.policies.items():
            if any(r.peers in sets for r in (pol.ingress or ()) + (pol.egress or ())):
                pols.add(name)
    out = set(changes.pods_changed)
    for table in (old, new):
        for name, pp in table.pods.items():
            if pols & (set(pp.ingress or ()) | set(pp.egress or ())):
                out.add(name)
    return out


@dataclass
class MapOps:
    """Packed writes of one sync, in the order of :meth:`PolicyMaps.write`."""

    rule_upd: dict[bytes, bytes] = field(default_factory=dict)
    ep_upd: dict[bytes, bytes] = field(default_factory=dict)
    ep_del: list[bytes] = field(default_factory=list)
    rule_del: list[bytes] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"rule_upd": len(self.rule_upd), "ep_upd": len(self.ep_upd), "ep_del": len(self.ep_del),
                "rule_del": len(self.rule_del)}


def render(old: dict[bytes, PodEntries], new: dict[bytes, PodEntries]) -> MapOps:
    """Operations turning the entries ``old`` (of some pods) into ``new`` (of the same pods)."""
    ops = MapOps()
    for ep, entries in new.items():
        before = old.get(ep)
        if before is None:
            ops.rule_upd.update(entries.rules)
            ops.ep_upd[ep] = entries.endpoint
            continue
        ops.rule_upd.update({k: v for k, v in entries.rules.items() if before.rules.get(k) != v})
        if before.endpoint != entries.endpoint:
            ops.ep_upd[ep] = entries.endpoint
        ops.rule_del += [k for k in before.rules if k not in entries.rules]
    for ep, before in old.items():
        if ep not in new:
            ops.ep_del.append(ep)
            ops.rule_del += list(before.rules)
    return ops


# ---------------------------------------------------------------- maps

class PolicyMaps:
    """The loader-written maps, opened from their pins."""

    def __init__(self, maps_dir: Path):
        self.ep = PinnedMap(S.BY_NAME["lk_pol_ep"], maps_dir / "lk_pol_ep")
        self.rules = PinnedMap(S.BY_NAME["lk_pol_v4"], maps_dir / "lk_pol_v4")
        self.dir = maps_dir

    def close(self) -> None:
        self.ep.close()
        self.rules.close()

    def read(self) -> dict[bytes, PodEntries]:
        """What the maps hold, per pod (rules of addresses without an endpoint entry included)."""
        out = {k: PodEntries(v) for k, v in self.ep.items()}
        for key, value in self.rules.items():
            ep = key[4:8]
            out.setdefault(ep, PodEntries(b"")).rules[key] = value
        return out

    def write(self, ops: MapOps) -> None:
        self.rules.update(list(ops.rule_upd), list(ops.rule_upd.values()))
        self.ep.update(list(ops.ep_upd), list(ops.ep_upd.values()))
        self.ep.delete(ops.ep_del)
        self.rules.delete(ops.rule_del)

    def stats(self) -> dict[str, int]:
        """lk_pol_stats summed over CPUs."""
        stats = PinnedMap(S.BY_NAME["lk_pol_stats"], self.dir / "lk_pol_stats")
        try:
            per_cpu = {name: stats.get_percpu(i.to_bytes(4, sys.byteorder)) for i, name in enumerate(S.STATS)}
        finally:
            stats.close()
        return {name: sum(int.from_bytes(v, sys.byteorder) for v in values) for name, values in per_cpu.items()}


# ---------------------------------------------------------------- the engine

@register
class EbpfPolicy(PolicyEngine):
    name = "ebpf"
    features: ClassVar[tuple[str, ...]] = ("bpf", "bpf-jit", "bcc", "bcc-compile", "kernel-headers", "tc-clsact")

    def __init__(self, ctx, datapath: str = ""):
        super().__init__(ctx, datapath)
        self.fs = Bpffs(ctx.state_dir, FOLDER)
        self.state_file = self.fs.state_file
        self.attachments = TcAttachments(self.fs.state, TC_PREF, TC_NAMES, self.fs.links)
        self._maps: PolicyMaps | None = None
        self._held: dict[bytes, PodEntries] | None = None  # what the maps hold (None: read them)
        self.last_ops: dict[str, int] = {}
        self.compile_seconds: float | None = None

    def _where(self) -> str:
        return f"policy engine ebpf on node {self.ctx.node}"

    # -- where
    def hooks(self) -> list[TcHook]:
        out = []
        for pod in self.ctx.pods:
            if pod.pod_mode.bypasses_node or not pod.ifname:
                if not pod.netns or not nsexec.netns_path(pod.netns).exists():
                    raise DatapathError(f"{self._where()}: namespace of pod {pod.pod} is missing")
                for ifname in netlink(pod.netns, _pod_interfaces):
                    out += [TcHook(pod.netns, ifname, TC_EGRESS, FROM_POD), TcHook(pod.netns, ifname, TC_INGRESS, TO_POD)]
            else:
                out += [TcHook(self.ctx.netns, pod.ifname, TC_INGRESS, FROM_POD),
                        TcHook(self.ctx.netns, pod.ifname, TC_EGRESS, TO_POD)]
        return out

    # -- loading
    def _ensure_loaded(self) -> PolicyMaps:
        if self._maps is not None:
            return self._maps
        if not self.ctx.pods:
            raise DatapathError(f"{self._where()}: the node has no pods to attach tc programs to")
        compiled = self.fs.load(SOURCE, PROGRAMS, (m.name for m in S.MAPS), self._where())
        if compiled is not None:
            self.compile_seconds = compiled
        with self.fs.opened_programs(p.name for p in PROGRAMS) as fds:  # attached again: replace is idempotent
            self.attachments.attach(self.hooks(), fds, self._where())
        self._maps = PolicyMaps(self.fs.maps)
        return self._maps

    # -- PolicyEngine
    def apply(self, desired: PolicyTable, changes: PolicyDiff) -> None:
        maps = self._ensure_loaded()
        if changes.full or self._held is None or self._applied is None:
            held = maps.read()
            new = flatten(desired)
            ops = render(held, new)  # also removes entries of addresses that are no pod of the table
        else:
            pods = affected_pods(self._applied, desired, changes)
            old_entries = flatten(self._applied, pods)
            new = flatten(desired, pods)
            ops = render(old_entries, new)
            held = self._held
        self._held = None  # unknown until the write went through
        maps.write(ops)
        if changes.full or self._applied is None:
            self._held = new
        else:
            for ep in set(old_entries) - set(new):
                held.pop(ep, None)
            held.update(new)
            self._held = held
        self.last_ops = ops.counts()

    def cleanup(self) -> None:
        self.close()
        self._applied = None
        self._held = None
        self.attachments.detach(self.hooks)
        self.fs.remove()

    def close(self) -> None:
        if self._maps is not None:
            self._maps.close()
            self._maps = None

    def maps(self) -> PolicyMaps:
        return self._ensure_loaded()

    def describe(self) -> dict:
        info = super().describe()
        info["pinned"] = self.fs.mounted() and (self.fs.maps / "lk_pol_v4").exists()
        if info["pinned"]:
            maps = PolicyMaps(self.fs.maps)
            try:
                info["endpoints"] = len(maps.ep)
                info["rules"] = len(maps.rules)
                info["stats"] = maps.stats()
            finally:
                maps.close()
        return info


def _pod_interfaces(ipr) -> list[str]:
    """Every interface of a pod but lo (eth0; and veth1 of an eni-exclusive pod)."""
    return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links() if link.get_attr("IFLA_IFNAME") != "lo")


__all__ = ["EbpfPolicy", "flatten", "render", "affected_pods", "PolicyMaps", "MapOps", "PodEntries"]
