"""``ebpf`` policy engine: tc programs on every pod's interface and per-pod policy maps (Cilium's
model, with LPM tries of allowed peers instead of security identities).

``bpf/bpf_policy.c`` is compiled with bcc once per node, its two programs pinned, and attached with
tc clsact (priority :data:`TC_PREF`, before the ``ebpf-tc`` Service datapath's filters, which still
run since allowed packets return ``TC_ACT_UNSPEC``):

  pods with a node-side interface (``lx-<pod>``: veth, bridge, overlay, eni-policy-route)
      tc ingress of ``lx-<pod>`` → ``lk_pol_from_pod``; tc egress → ``lk_pol_to_pod``
  pods whose traffic bypasses the node (eni-exclusive: its own ENI; eni-ipvlan, macvlan)
      inside the pod, on every interface but ``lo``: tc egress → ``lk_pol_from_pod``;
      tc ingress → ``lk_pol_to_pod``

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

Pins and state as the eBPF Service datapaths keep them (:mod:`labkit.datapath.ebpf`): a private
bpffs under the node's state folder, folder ``policy-ebpf/``, and ``policy-ebpf.json`` recording
where filters were attached (for cleanup after the loader is gone).
"""

from __future__ import annotations

import ctypes as ct
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .. import nsexec, tc
from ..datapath.ebpf import Bpffs, PinnedMap, TcHook, obj_get
from ..errors import DatapathError
from . import ebpf_structs as S
from .base import PolicyEngine, register
from .model import PolicyDiff, PolicyTable

PROG_SCHED_CLS = 3
TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"
TC_PREF = 0x4C40  # before the ebpf-tc Service datapath (0x4C4B): lower runs first
TC_HANDLE = 1
FROM_POD, TO_POD = "lk_pol_from_pod", "lk_pol_to_pod"
PROGRAMS = (FROM_POD, TO_POD)
IN_POD_MODES = ("eni-exclusive", "eni-ipvlan", "macvlan")
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
        ncpu = _possible_cpus()
        fd = obj_get(self.dir / "lk_pol_stats")
        try:
            from ..datapath.ebpf import _lib

            out = {}
            for i, name in enumerate(S.STATS):
                buf = ct.create_string_buffer(8 * ncpu)
                key = ct.c_uint32(i)
                if _lib().bpf_map_lookup_elem(fd, ct.byref(key), buf) != 0:
                    raise OSError(ct.get_errno(), "lookup lk_pol_stats")
                out[name] = sum(int.from_bytes(buf.raw[8 * c:8 * c + 8], "little") for c in range(ncpu))
            return out
        finally:
            os.close(fd)


def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


# ---------------------------------------------------------------- the engine

@register
class EbpfPolicy(PolicyEngine):
    name = "ebpf"
    features: ClassVar[tuple[str, ...]] = ("bpf", "bpf-jit", "bcc", "bcc-compile", "kernel-headers", "tc-clsact")

    def __init__(self, ctx, datapath: str = ""):
        super().__init__(ctx, datapath)
        self.fs = Bpffs(ctx.state_dir, FOLDER)
        self.state_file = self.fs.state_file
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
            if pod.mode in IN_POD_MODES or not pod.ifname:
                if not pod.netns or not nsexec.netns_path(pod.netns).exists():
                    raise DatapathError(f"{self._where()}: namespace of pod {pod.pod} is missing")
                for ifname in _netlink(pod.netns, _pod_interfaces):
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
        self.fs.ensure()
        if not self.fs.has((m.name for m in S.MAPS), PROGRAMS):
            self.compile_seconds = self.fs.compile_and_pin(SOURCE, [(p, PROG_SCHED_CLS, None) for p in PROGRAMS],
                                                           self._where())
        self._attach()
        self._maps = PolicyMaps(self.fs.maps)
        return self._maps

    def _attach(self) -> None:
        """Attach (or re-attach: replace is idempotent) both programs to every hook."""
        fds = self.fs.prog_fds(PROGRAMS)
        state = self._load_state()
        recorded = {(h["netns"], h["ifname"], h["parent"]): h for h in state.get("hooks", [])}
        try:
            for netns, group in _by_netns(self.hooks()).items():
                def attach(ipr, group=group) -> None:
                    for h in group:
                        index = _ifindex(ipr, h.ifname)
                        if index is None:
                            raise DatapathError(f"{self._where()}: no interface {h.ifname} in {h.netns}")
                        key = (h.netns, h.ifname, h.parent)
                        made = _ensure_clsact(ipr, index) or bool(recorded.get(key, {}).get("qdisc_created"))
                        recorded[key] = {"netns": h.netns, "ifname": h.ifname, "parent": h.parent,
                                         "qdisc_created": made}
                        self._save_state({"hooks": list(recorded.values())})  # before the filter exists
                        ipr.tc("replace-filter", "bpf", index, TC_HANDLE, fd=fds[h.prog], name=h.prog,
                               parent=h.parent, classid=1, direct_action=True, prio=TC_PREF)

                _netlink(netns, attach)
        finally:
            for fd in fds.values():
                os.close(fd)

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
        self._detach()
        self.fs.remove()

    def close(self) -> None:
        if self._maps is not None:
            self._maps.close()
            self._maps = None

    def _detach(self) -> None:
        recorded = self._load_state().get("hooks", [])
        try:
            current = [{"netns": h.netns, "ifname": h.ifname, "parent": h.parent, "qdisc_created": False}
                       for h in self.hooks()]
        except DatapathError:
            current = []
        seen: dict[tuple, dict] = {}
        for h in recorded + current:
            seen.setdefault((h["netns"], h["ifname"], h["parent"]), h)
        by_ns: dict[str | None, list[dict]] = {}
        for h in seen.values():
            by_ns.setdefault(h["netns"], []).append(h)
        for netns, group in by_ns.items():
            if netns and not nsexec.netns_path(netns).exists():
                continue

            def detach(ipr, group=group) -> None:
                made: dict[int, bool] = {}
                for h in group:
                    index = _ifindex(ipr, h["ifname"])
                    if index is None:
                        continue
                    if any(_is_ours(f) for f in _filters(ipr, index, h["parent"])):
                        _ignore_missing(lambda: ipr.tc("del-filter", "bpf", index, TC_HANDLE, parent=h["parent"],
                                                       prio=TC_PREF))
                    made[index] = made.get(index, False) or h.get("qdisc_created", False)
                for index, ours in made.items():
                    if ours and not any(_filters(ipr, index, p) for p in (TC_INGRESS, TC_EGRESS)):
                        _ignore_missing(lambda: ipr.tc("del", "clsact", index))

            _netlink(netns, detach)

    def _load_state(self) -> dict:
        return self.fs.load_state()

    def _save_state(self, state: dict) -> None:
        self.fs.save_state(state)

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


# ---------------------------------------------------------------- netlink helpers

_netlink, _by_netns, _ifindex, _ensure_clsact, _ignore_missing = (
    tc.netlink, tc.by_netns, tc.ifindex, tc.ensure_clsact, tc.ignore_missing)


def _filters(ipr, index: int, parent: str) -> list:
    return [f for f in tc.filters(ipr, index, parent) if f.get_attr("TCA_OPTIONS")]


def _pod_interfaces(ipr) -> list[str]:
    """Every interface of a pod but lo (eth0; and veth1 of an eni-exclusive pod)."""
    return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links() if link.get_attr("IFLA_IFNAME") != "lo")


def _is_ours(f) -> bool:
    opts = f.get_attr("TCA_OPTIONS")
    name = opts.get_attr("TCA_BPF_NAME") if opts else None
    return f.get_attr("TCA_KIND") == "bpf" and bool(name) and name.startswith("lk_pol_")


__all__ = ["EbpfPolicy", "flatten", "render", "affected_pods", "PolicyMaps", "MapOps", "PodEntries"]
