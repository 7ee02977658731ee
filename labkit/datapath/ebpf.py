"""eBPF Service datapaths, Cilium-style: ``ebpf`` (socket-level load balancing) and ``ebpf-tc``
(per-packet DNAT at tc).

``ebpf`` compiles ``bpf/bpf_sock.c`` and attaches connect4 / sendmsg4 / recvmsg4 to the cgroup v2
folder of the node's pods (``NodeContext.cgroup``; never a cgroup root, refused otherwise): a
connect() or sendto() to ClusterIP:port is rewritten to a backend before any packet exists, and a
UDP reply is given the ClusterIP as its source again. ``ebpf-tc`` compiles ``bpf/bpf_lxc.c`` and
attaches it with tc clsact to every pod-facing interface: ingress/egress of the node-side interface
in the node's namespace, or, for a pod without one (macvlan/ipvlan ENI modes), egress/ingress of the
pod's own interface inside the pod's namespace; a pod whose replies can bypass the node
(eni-exclusive) also gets the reverse translation on its own interface (see :meth:`TcLB.hooks`).

Both render a :class:`~labkit.services.TableDiff` into batches of map operations
(:func:`render_full`, :func:`render_partial`: pure functions) and apply them with one
``BPF_MAP_*_BATCH`` call per map and kind, in an order that never lets a program see a service
counting more backends than its slots hold. Map layouts are the contract of
``bpf/lib/common.h`` ↔ :mod:`labkit.datapath.ebpf_structs`.

This module only says what to load, where to attach it and what to write: compiling, pinning,
the tc and cgroup attach lifecycles and the map syscalls are the eBPF runtime's (:mod:`labkit.ebpf`),
which the eBPF policy engine uses too. ``ebpf-tc``'s filters are priority :data:`TC_PREF` and named
``lk_…`` (the policy engine's: another priority, ``lk_pol_…``).

State lives in the kernel, not in the process, so ``labkit up`` can exit and a later process can
check, update and remove the datapath. Everything is pinned in a bpf filesystem that the datapath
mounts privately under the node's state folder (never /sys/fs/bpf)::

    <state_dir>/bpffs/                       mount -t bpf, on demand
        <datapath>/maps/lk_svc_v4 …          maps (bcc BPF_TABLE_PINNED: reused when present)
        <datapath>/progs/lk_sock4_connect …  programs (reattached from here without compiling)
    <state_dir>/<datapath>.json              where programs were attached (for cleanup)

A new instance (a new process) opens the pinned maps by path (``bpf_obj_get``), reads back the
services they hold (service ids and slot order are kept), and its first sync rewrites the whole
table. The cgroup holds its programs and tc filters hold theirs after the loader exits; cleanup
finds them by name on the lab's own cgroup and interfaces, so it works without the pins too (after
a SIGKILL, or twice). Every kernel object is named ``lk_…``.
"""

from __future__ import annotations

import contextlib
import gc
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .. import nsexec
from ..ebpf.cgroup import CgroupAttachments
from ..ebpf.libbpf import (ATTACH_CGROUP_INET4_CONNECT, ATTACH_CGROUP_UDP4_RECVMSG, ATTACH_CGROUP_UDP4_SENDMSG,
                           PROG_CGROUP_SOCK_ADDR, PROG_SCHED_CLS)
from ..ebpf.loader import Bpffs, Program
from ..ebpf.maps import MapSpec, PinnedMap
from ..ebpf.netlink import netlink
from ..ebpf.tc import CLIENTS, TC_EGRESS, TC_INGRESS, TcAttachments, TcHook
from ..errors import DatapathError
from ..services import ServicePort, ServiceTable, TableDiff
from . import ebpf_structs as S
from .base import Datapath, NodeContext, register

TC_NAMES = "lk_"  # prefix of their names (the programs')
TC_PREF = CLIENTS[TC_NAMES]  # 0x4C4B "LK": the policy engine's filters run before


SOCK_PROGRAMS = (
    Program("lk_sock4_connect", PROG_CGROUP_SOCK_ADDR, ATTACH_CGROUP_INET4_CONNECT),
    Program("lk_sock4_sendmsg", PROG_CGROUP_SOCK_ADDR, ATTACH_CGROUP_UDP4_SENDMSG),
    Program("lk_sock4_recvmsg", PROG_CGROUP_SOCK_ADDR, ATTACH_CGROUP_UDP4_RECVMSG),
)
FROM_CONTAINER = Program("lk_from_container", PROG_SCHED_CLS)
FROM_CONTAINER_ENI = Program("lk_from_container_eni", PROG_SCHED_CLS)
TO_CONTAINER = Program("lk_to_container", PROG_SCHED_CLS)
LXC_PROGRAMS = (FROM_CONTAINER, FROM_CONTAINER_ENI, TO_CONTAINER)


# ----------------------------------------------------------------------------- rendering

@dataclass
class MapOps:
    """Packed map operations of one sync, applied in the order of :meth:`ServiceMaps.write`.
    Keys and values are parallel lists of packed structs (joined into one buffer per call)."""

    be_keys: list[bytes] = field(default_factory=list)
    be_vals: list[bytes] = field(default_factory=list)
    rnat_keys: list[bytes] = field(default_factory=list)
    rnat_vals: list[bytes] = field(default_factory=list)
    svc_keys: list[bytes] = field(default_factory=list)
    svc_vals: list[bytes] = field(default_factory=list)
    svc_del: list[bytes] = field(default_factory=list)
    be_del: list[bytes] = field(default_factory=list)
    rnat_del: list[bytes] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"svc_upd": len(self.svc_keys), "be_upd": len(self.be_keys), "rnat_upd": len(self.rnat_keys),
                "svc_del": len(self.svc_del), "be_del": len(self.be_del), "rnat_del": len(self.rnat_del)}


class ServiceIds:
    """What the service maps hold, as the loader needs it: the service id (``rev_nat_index``) of
    each packed service key, and how many backend slots are in use.

    New ids go round-robin upward from the last one given, so a freed id is not reused soon (flows
    in the LRU conntrack still name it); an id forgotten in a sync stays reserved until
    :meth:`free`, so no id is deleted and written in the same sync."""

    LIMIT = 0x7FFFFFFF

    def __init__(self, ids: dict[bytes, int] | None = None, backends: int = 0):
        self.by_key: dict[bytes, int] = dict(ids or {})
        self.backends = backends
        self._used = set(self.by_key.values())
        self._next = max(self._used, default=0) + 1

    def __len__(self) -> int:
        return len(self.by_key)

    def get(self, key: bytes) -> int | None:
        return self.by_key.get(key)

    def allocate(self, key: bytes) -> int:
        while self._next in self._used or self._next > self.LIMIT:
            self._next = 1 if self._next > self.LIMIT else self._next + 1
        sid = self._next
        self._next += 1
        self.by_key[key] = sid
        self._used.add(sid)
        return sid

    def forget(self, key: bytes) -> int | None:
        """Drop ``key``; its id stays reserved until :meth:`free`."""
        return self.by_key.pop(key, None)

    def free(self, sids: Iterable[int]) -> None:
        self._used.difference_update(sids)


_PROTO = {**S.IPPROTO, **{k.lower(): v for k, v in S.IPPROTO.items()}}


def service_key(sp: ServicePort) -> bytes:
    """The packed lb4_key of a service port."""
    proto = _PROTO.get(sp.protocol)
    if proto is None:
        raise DatapathError(f"service {sp.key}: protocol {sp.protocol} is not supported by eBPF (TCP, UDP)")
    return S.LB4_KEY.pack(socket.inet_aton(sp.cluster_ip), sp.port, proto, 0)


def assign_slots(previous: Sequence, new: Sequence) -> list:
    """``new`` backends in slot order. A backend keeps the slot it had in ``previous`` while that
    slot still exists (the tc conntrack keeps its flows on it); the others fill the free slots in
    their given order. Backends are any hashable values (here: packed lb4_backend structs)."""
    if not previous or list(previous) == list(new):
        return list(new)
    n = len(new)
    slots: list = [None] * n
    old = {item: i for i, item in enumerate(previous)}
    rest = []
    for item in new:
        i = old.get(item)
        if i is not None and i < n and slots[i] is None:
            slots[i] = item
        else:
            rest.append(item)
    it = iter(rest)
    return [s if s is not None else next(it) for s in slots]


def _backend_values(sp: ServicePort, proto: int, aton) -> list[bytes]:
    pack_be = S.LB4_BACKEND.pack
    return [pack_be(aton(ep.ip), ep.port, proto, 0) for ep in sp.endpoints]


def _service_entries(ops: MapOps, key: bytes, sp: ServicePort, sid: int, backends: Sequence[bytes],
                     with_rnat: bool, aton) -> None:
    """Entries of one service: its backends (packed, in slot order), reverse NAT, service entry."""
    ops.be_keys += [_BE_KEY(sid, i) for i in range(len(backends))]
    ops.be_vals += backends
    if with_rnat:
        ops.rnat_keys.append(_U32(sid))
        ops.rnat_vals.append(_RNAT(aton(sp.cluster_ip), sp.port, 0))
    ops.svc_keys.append(key)
    ops.svc_vals.append(_SVC(sid, len(backends), 0))


_BE_KEY, _U32, _RNAT, _SVC = (S.LB4_BACKEND_KEY.pack, S.U32.pack, S.LB4_REVERSE_NAT.pack,
                              S.LB4_SERVICE.pack)


def _aton_cache():
    """socket.inet_aton with a cache: a lab has few pods and every service repeats them."""
    cache: dict[str, bytes] = {}

    def aton(ip: str) -> bytes:
        raw = cache.get(ip)
        if raw is None:
            raw = cache[ip] = socket.inet_aton(ip)
        return raw

    return aton


def _check_capacity(services: int, backends: int, what: str) -> None:
    if services > S.SVC_MAP_SIZE:
        raise DatapathError(f"{what}: {services} service ports exceed lk_svc_v4 ({S.SVC_MAP_SIZE})")
    if backends > S.BE_MAP_SIZE:
        raise DatapathError(f"{what}: {backends} backends exceed lk_be_v4 ({S.BE_MAP_SIZE})")


@dataclass
class MapContents:
    """What the service maps hold now (read back from the kernel)."""

    services: dict[bytes, tuple[int, int]]  # packed lb4_key -> (rev_nat_index, count)
    backends: dict[bytes, bytes]  # packed lb4_backend_key -> packed lb4_backend
    rnat: set[bytes]  # packed rev_nat_index keys


def _check_endpoints(sp: ServicePort) -> None:
    if len(sp.endpoints) > S.MAX_BACKENDS_PER_SERVICE:
        raise DatapathError(f"service {sp.key}: more than {S.MAX_BACKENDS_PER_SERVICE} endpoints")


def render_full(desired: ServiceTable, current: MapContents, rev_nat: bool = True) -> tuple[MapOps, ServiceIds]:
    """All of ``desired`` in one batch per map, plus deletion of whatever else the maps hold.
    Services already in the maps keep their id and their endpoints' slots. ``rev_nat``: write
    lk_rnat_v4 too (the tc programs read it; socket-LB does not).

    This is the hot path of a full load (tens of thousands of services): one pass, locals bound."""
    ids = ServiceIds({k: sid for k, (sid, _) in current.services.items()})
    ops = MapOps()
    be_keys, be_vals, svc_keys, svc_vals = ops.be_keys, ops.be_vals, ops.svc_keys, ops.svc_vals
    pack_key, pack_bk, pack_be, pack_svc = S.LB4_KEY.pack, _BE_KEY, S.LB4_BACKEND.pack, _SVC
    inet_aton, protos, max_eps = socket.inet_aton, _PROTO, S.MAX_BACKENDS_PER_SERVICE
    cache: dict[str, bytes] = {}  # inet_aton by address: a lab has few pods, every service repeats them
    services_now, backends_now = current.services, current.backends.get
    rnat: list[tuple[int, str, int]] = []
    wanted: dict[bytes, ServicePort] = {}
    for sp in desired:
        proto = protos.get(sp.protocol)
        if proto is None:
            service_key(sp)  # raises the error
        key = pack_key(inet_aton(sp.cluster_ip), sp.port, proto, 0)
        if key in wanted:
            raise DatapathError(f"services {wanted[key].key} and {sp.key} both use "
                                f"{sp.cluster_ip}:{sp.port}/{sp.protocol}")
        wanted[key] = sp
        if len(sp.endpoints) > max_eps:
            _check_endpoints(sp)
        vals = []
        for ep in sp.endpoints:
            ip = ep.ip
            raw = cache.get(ip)
            if raw is None:
                raw = cache[ip] = inet_aton(ip)
            vals.append(pack_be(raw, ep.port, proto, 0))
        n = len(vals)
        sid = ids.by_key.get(key)
        if sid is None:
            sid = ids.allocate(key)
            be_keys += [pack_bk(sid, i) for i in range(n)]
        else:  # already in the maps: keep its backends in their slots
            had = services_now[key][1]
            slot_keys = [pack_bk(sid, i) for i in range(max(had, n))]
            old = [backends_now(k) for k in slot_keys[:had]]
            if old != vals:
                vals = assign_slots(old, vals)
            be_keys += slot_keys[:n]
        be_vals += vals
        svc_keys.append(key)
        svc_vals.append(pack_svc(sid, len(vals), 0))
        if rev_nat:
            rnat.append((sid, sp.cluster_ip, sp.port))
    ids.backends = len(be_keys)
    _check_capacity(len(wanted), ids.backends, "full sync")
    ops.rnat_keys = [_U32(sid) for sid, _, _ in rnat]
    ops.rnat_vals = [_RNAT(inet_aton(ip), port, 0) for _, ip, port in rnat]

    stale = [k for k in current.services if k not in wanted]
    ids.free([ids.forget(k) for k in stale])  # ids of stale services were not handed out above
    ops.svc_del = stale
    if current.backends:
        ops.be_del = list(current.backends.keys() - set(be_keys))
    if current.rnat:
        ops.rnat_del = list(current.rnat - set(ops.rnat_keys))
    return ops, ids


def render_partial(changes: TableDiff, ids: ServiceIds, rev_nat: bool = True) -> MapOps:
    """Only the entries ``changes`` touches. ``ids`` (what the maps hold) is updated in place;
    the map sizes are checked before anything is rendered."""
    removed, added = list(changes.removed), list(changes.added)
    same_key = []
    for old, new in changes.changed:
        if service_key(old) != service_key(new):  # a new ClusterIP, port or protocol: another key
            removed.append(old)
            added.append(new)
        else:
            same_key.append((old, new))
    for sp in added + [new for _, new in same_key]:
        _check_endpoints(sp)
    backends = (ids.backends + sum(len(sp.endpoints) for sp in added)
                - sum(len(sp.endpoints) for sp in removed)
                + sum(len(new.endpoints) - len(old.endpoints) for old, new in same_key))
    _check_capacity(len(ids) + len(added) - len(removed), backends, "sync")

    ops, aton = MapOps(), _aton_cache()
    for old, new in same_key:
        key = service_key(new)
        sid = ids.get(key)
        if sid is None:
            raise DatapathError(f"service {new.key}: changed but never applied (resync)")
        proto = key[6]  # lb4_key.proto
        slots = assign_slots(_backend_values(old, proto, aton), _backend_values(new, proto, aton))
        _service_entries(ops, key, new, sid, slots, False, aton)
        ops.be_del += [_BE_KEY(sid, i) for i in range(len(slots), len(old.endpoints))]
    added_keys = {service_key(sp) for sp in added}
    released = []
    for sp in removed:
        key = service_key(sp)
        sid = ids.forget(key)
        if sid is None:
            continue
        if key not in added_keys:  # re-added under another name: its new entry replaces it
            ops.svc_del.append(key)
        ops.be_del += [S.pack_lb4_backend_key(sid, i) for i in range(len(sp.endpoints))]
        if rev_nat:
            ops.rnat_del.append(S.pack_u32(sid))
        released.append(sid)
    for sp in added:
        key = service_key(sp)
        if ids.get(key) is not None:
            raise DatapathError(f"service {sp.key}: {sp.cluster_ip}:{sp.port}/{sp.protocol} is already in use")
        _service_entries(ops, key, sp, ids.allocate(key), _backend_values(sp, key[6], aton), rev_nat, aton)
    ids.free(released)
    ids.backends = backends
    return ops


class ServiceMaps:
    """The three loader-written maps of one datapath, opened from their pins."""

    def __init__(self, maps_dir: Path):
        by_name = {m.name: m for m in S.SERVICE_MAPS}
        self.svc = PinnedMap(by_name["lk_svc_v4"], maps_dir / "lk_svc_v4")
        self.be = PinnedMap(by_name["lk_be_v4"], maps_dir / "lk_be_v4")
        self.rnat = PinnedMap(by_name["lk_rnat_v4"], maps_dir / "lk_rnat_v4")

    def close(self) -> None:
        for m in (self.svc, self.be, self.rnat):
            m.close()

    def read(self) -> MapContents:
        svc_keys, svc_vals = self.svc.dump()
        be_keys, be_vals = self.be.dump()
        vs = self.be.leaf_size
        return MapContents(
            services={k: (sid, count) for k, (sid, count, _) in zip(svc_keys, S.LB4_SERVICE.iter_unpack(svc_vals))},
            backends={k: be_vals[i * vs:(i + 1) * vs] for i, k in enumerate(be_keys)},
            rnat=set(self.rnat.dump()[0]),
        )

    def write(self, ops: MapOps) -> None:
        """Backends before the services that count them; counts lowered before slots go."""
        self.be.update(ops.be_keys, ops.be_vals)
        self.rnat.update(ops.rnat_keys, ops.rnat_vals)
        self.svc.update(ops.svc_keys, ops.svc_vals)
        self.svc.delete(ops.svc_del)
        self.be.delete(ops.be_del)
        self.rnat.delete(ops.rnat_del)


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ----------------------------------------------------------------------------- datapaths

class _EbpfDatapath(Datapath):
    """Compile, load, pin and attach once; then render syncs into map batches."""

    source: ClassVar[str]  # entry file under bpf/
    programs: ClassVar[tuple[Program, ...]]
    map_specs: ClassVar[tuple[MapSpec, ...]]  # every map the entry file declares
    rev_nat: ClassVar[bool]  # whether the programs read lk_rnat_v4 (then the loader fills it)
    features: ClassVar[tuple[str, ...]] = ("bpf", "bpf-jit", "bcc", "bcc-compile", "kernel-headers")

    def __init__(self, ctx: NodeContext):
        super().__init__(ctx)
        self.fs = Bpffs(ctx.state_dir, self.name)
        self.state_file = self.fs.state_file
        self._maps: ServiceMaps | None = None
        self._ids: ServiceIds | None = None
        self.last_ops: dict[str, int] = {}
        self.compile_seconds: float | None = None  # set when this instance compiled the programs

    # -- subclasses
    def _check_target(self) -> None:
        """Raise DatapathError if the node gives nothing safe to attach to."""

    def _attach(self, fds: dict[str, int]) -> None:
        raise NotImplementedError

    def _attached(self) -> bool:
        raise NotImplementedError

    def _detach(self) -> None:
        raise NotImplementedError

    # -- loading
    def _where(self) -> str:
        return f"{self.name} on node {self.ctx.node}"

    def _ensure_loaded(self) -> ServiceMaps:
        if self._maps is not None:
            return self._maps
        self._check_target()
        compiled = self.fs.load(self.source, self.programs, (m.name for m in self.map_specs), self._where())
        if compiled is not None:
            self.compile_seconds = compiled
        if not self._attached():
            with self.fs.opened_programs(p.name for p in self.programs) as fds:
                self._attach(fds)
        self._maps = ServiceMaps(self.fs.maps)
        return self._maps

    # -- Datapath
    def apply(self, desired: ServiceTable, changes: TableDiff) -> None:
        maps = self._ensure_loaded()
        if changes.full or self._ids is None:
            with _gc_paused():  # ~10^5 short-lived objects: the cyclic GC would only rescan the table
                ops, ids = render_full(desired, maps.read(), self.rev_nat)
        else:
            ids = self._ids
            ops = render_partial(changes, ids, self.rev_nat)
        self._ids = None  # unknown until the write went through
        maps.write(ops)
        self._ids = ids
        self.last_ops = ops.counts()

    def cleanup(self) -> None:
        self.close()
        self._ids = None
        self._applied = None
        self._detach()
        self.fs.remove()

    def close(self) -> None:
        """Drop this process's handles; the datapath keeps running (see module docstring)."""
        if self._maps is not None:
            self._maps.close()
            self._maps = None

    def maps(self) -> ServiceMaps:
        """The pinned service maps (loading and attaching the programs if needed)."""
        return self._ensure_loaded()

    def walk(self, key: str | None) -> dict:
        """A new connection is one hash lookup in lk_svc_v4 and one in lk_be_v4, whatever its place (a
        pod address misses in one lookup): the entries of those maps say how big the tables are."""
        if self._applied is None or (key is not None and key not in self._applied):
            raise KeyError(f"service port {key!r} is not in the applied table")
        return {"rules_walked": 0,
                "map_entries": len(self._applied) + sum(len(sp.endpoints) for sp in self._applied)}

    def describe(self) -> dict:
        info = super().describe()
        info["pinned"] = self.fs.mounted() and (self.fs.maps / "lk_svc_v4").exists()
        if info["pinned"]:
            maps = ServiceMaps(self.fs.maps)
            try:
                info["map_services"] = len(maps.svc)
                info["map_backends"] = len(maps.be)
            finally:
                maps.close()
        info["attached"] = self._attached_safe()
        return info

    def _attached_safe(self) -> bool:
        try:
            return self._attached()
        except (OSError, DatapathError):
            return False


@register
class SocketLB(_EbpfDatapath):
    """``ebpf``: Cilium's socket-LB, cgroup connect4/sendmsg4/recvmsg4 on the node's pod cgroup."""

    name = "ebpf"
    scope = "pod"  # every pod's connect()/sendmsg() in the node's pod cgroup, whatever its mode
    features = _EbpfDatapath.features + ("cgroup2",)
    source = "bpf_sock.c"
    programs = SOCK_PROGRAMS
    map_specs = S.SOCK_MAPS
    rev_nat = False  # UDP replies are restored per socket (lk_rnat_sk_v4), not per service

    def __init__(self, ctx: NodeContext):
        super().__init__(ctx)
        self.attachments = CgroupAttachments(self.fs.state, self.programs)

    def _check_target(self) -> None:
        self.attachments.target(self.ctx.cgroup, self._where())

    def _attach(self, fds: dict[str, int]) -> None:
        self.attachments.attach(self.ctx.cgroup, fds, self._where())

    def _attached(self) -> bool:
        return self.attachments.attached(self.ctx.cgroup, self._where())

    def _detach(self) -> None:
        self.attachments.detach(self.ctx.cgroup)


@register
class TcLB(_EbpfDatapath):
    """``ebpf-tc``: per-packet DNAT/reverse NAT with conntrack-lite at tc on pod-facing interfaces."""

    name = "ebpf-tc"
    scope = "pod"  # on the node-side interface, or inside a pod that has none
    features = _EbpfDatapath.features + ("tc-clsact",)
    source = "bpf_lxc.c"
    programs = LXC_PROGRAMS
    map_specs = S.LXC_MAPS
    rev_nat = True

    def __init__(self, ctx: NodeContext):
        super().__init__(ctx)
        self.attachments = TcAttachments(self.fs.state, TC_PREF, TC_NAMES, self.fs.links)
        self._hooks: list[TcHook] | None = None

    def hooks(self) -> list[TcHook]:
        """Where the programs go. A pod with a node-side interface: DNAT at its ingress, reverse NAT
        at its egress, and reverse NAT also at the pod's own address interface when that is not the
        other end of the node-side one (eni-exclusive: replies come in on the ENI, not through the
        node). A pod without one: both on the pod's own interface, inside the pod.

        Resolved with netlink once, when the programs are attached, and recorded in the state file
        with the pods it was resolved for; later processes read it from there."""
        if self._hooks is None:
            same_pods = self.fs.state.load().get("pods") == self._pods_signature()
            self._hooks = (same_pods and self.attachments.recorded()) or self._resolve_hooks()
        return self._hooks

    def _pods_signature(self) -> list:
        return [[p.pod, p.ifname, p.netns, p.ip] for p in self.ctx.pods]

    def _resolve_hooks(self) -> list[TcHook]:
        node_peers: dict[str, int | None] = {}
        if any(p.ifname for p in self.ctx.pods):
            node_peers = netlink(self.ctx.netns, lambda ipr: {
                link.get_attr("IFLA_IFNAME"): link.get_attr("IFLA_LINK") for link in ipr.get_links()})
        out = []
        for pod in self.ctx.pods:
            if pod.ifname:
                if pod.ifname not in node_peers:
                    raise DatapathError(f"{self._where()}: interface {pod.ifname} of pod {pod.pod} not found")
                out += [TcHook(self.ctx.netns, pod.ifname, TC_INGRESS, FROM_CONTAINER.name),
                        TcHook(self.ctx.netns, pod.ifname, TC_EGRESS, TO_CONTAINER.name)]
                if pod.netns:
                    own, own_index = _pod_interface(pod.netns, pod.ip)
                    if node_peers[pod.ifname] != own_index:  # a veth's IFLA_LINK: its peer's ifindex
                        out.append(TcHook(pod.netns, own, TC_INGRESS, TO_CONTAINER.name))
            elif pod.netns:
                own, _ = _pod_interface(pod.netns, pod.ip)
                out += [TcHook(pod.netns, own, TC_EGRESS, FROM_CONTAINER_ENI.name),
                        TcHook(pod.netns, own, TC_INGRESS, TO_CONTAINER.name)]
            else:
                raise DatapathError(f"{self._where()}: pod {pod.pod} has neither a node-side interface "
                                    "nor a namespace")
        return out

    def set_ct_timeouts(self, tcp_ms: int = 0, syn_ms: int = 0, close_ms: int = 0, nontcp_ms: int = 0) -> None:
        """Conntrack-lite lifetimes in ms (``lk_ct_cfg``; 0 keeps Cilium's default: an established
        TCP flow 6 h, one that sent only its SYN 60 s, 10 s after a FIN or RST, a UDP flow 60 s).
        They apply from the next packet on, to running flows too."""
        self._ensure_loaded()
        cfg = PinnedMap(S.MAPS["lk_ct_cfg"], self.fs.maps / "lk_ct_cfg")
        try:
            cfg.update([S.pack_u32(0)], [bytes(S.CtConfig(tcp_ms, syn_ms, close_ms, nontcp_ms))])
        finally:
            cfg.close()

    def _check_target(self) -> None:
        if not self.ctx.pods:
            raise DatapathError(f"{self._where()}: the node has no pods to attach tc programs to")
        self.hooks()  # every interface found before anything is mounted or loaded

    def _attach(self, fds: dict[str, int]) -> None:
        self.attachments.attach(self.hooks(), fds, self._where(), {"pods": self._pods_signature()})

    def _attached(self) -> bool:
        return self.attachments.attached(self.hooks())

    def _detach(self) -> None:
        self.attachments.detach(self.hooks)

    def describe(self) -> dict:
        """The base description, the pods the programs are on and how many hooks, and
        ``service_flows``: the flows conntrack-lite holds to a Service (entries with a reverse-NAT
        index), what shows that clients' traffic took the programs."""
        info = super().describe()
        info["pods"] = [p.pod for p in self.ctx.pods]
        if info["pinned"]:
            info["hooks"] = len(self.hooks())
            ct_map = PinnedMap(S.MAPS["lk_ct_v4"], self.fs.maps / "lk_ct_v4")
            try:
                info["service_flows"] = sum(S.CtEntry.from_buffer_copy(v).rev_nat_index != 0 for _, v in ct_map.items())
            finally:
                ct_map.close()
        return info


def _pod_interface(pod_netns: str, ip: str) -> tuple[str, int]:
    """Name and ifindex of the interface holding ``ip`` in the pod's namespace."""
    if not nsexec.netns_path(pod_netns).exists():
        raise DatapathError(f"namespace {pod_netns} does not exist")

    def find(ipr) -> tuple[str, int] | None:
        for addr in ipr.get_addr(family=2):
            if addr.get_attr("IFA_ADDRESS") == ip:
                return ipr.get_links(addr["index"])[0].get_attr("IFLA_IFNAME"), addr["index"]
        return None

    found = netlink(pod_netns, find)
    if found is None:
        raise DatapathError(f"no interface holds {ip} in namespace {pod_netns}")
    return found


__all__ = ["SocketLB", "TcLB", "render_full", "render_partial", "assign_slots", "ServiceIds", "MapOps",
           "MapContents", "ServiceMaps"]
