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
import ctypes as ct
import errno
import gc
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .. import nsexec, tc
from ..errors import DatapathError
from ..services import ServicePort, ServiceTable, TableDiff
from . import ebpf_structs as S
from .base import Datapath, NodeContext, register

# bpf_prog_type / bpf_attach_type (uapi/linux/bpf.h)
PROG_SCHED_CLS = 3
PROG_CGROUP_SOCK_ADDR = 18
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_UDP4_SENDMSG = 14
ATTACH_CGROUP_UDP4_RECVMSG = 19

TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"
TC_PREF = 0x4C4B  # priority of labkit's tc filters ("LK")
TC_HANDLE = 1

_KERNEL_NAME_LEN = 15  # BPF_OBJ_NAME_LEN - 1: program names as the kernel reports them


@dataclass(frozen=True)
class Program:
    """One entry program of a C file and how it is loaded."""

    name: str  # function in the C file; also its pin name
    prog_type: int
    attach_type: int = -1  # expected attach type (cgroup programs), -1 for tc


SOCK_PROGRAMS = (
    Program("lk_sock4_connect", PROG_CGROUP_SOCK_ADDR, ATTACH_CGROUP_INET4_CONNECT),
    Program("lk_sock4_sendmsg", PROG_CGROUP_SOCK_ADDR, ATTACH_CGROUP_UDP4_SENDMSG),
    Program("lk_sock4_recvmsg", PROG_CGROUP_SOCK_ADDR, ATTACH_CGROUP_UDP4_RECVMSG),
)
FROM_CONTAINER = Program("lk_from_container", PROG_SCHED_CLS)
FROM_CONTAINER_ENI = Program("lk_from_container_eni", PROG_SCHED_CLS)
TO_CONTAINER = Program("lk_to_container", PROG_SCHED_CLS)
LXC_PROGRAMS = (FROM_CONTAINER, FROM_CONTAINER_ENI, TO_CONTAINER)


def bpf_source_dir() -> Path:
    """The ``bpf/`` folder: shipped as ``labkit/_bpf`` in a wheel, next to ``labkit/`` in a checkout."""
    here = Path(__file__).resolve()
    for cand in (here.parents[1] / "_bpf", here.parents[2] / "bpf"):
        if (cand / "lib" / "common.h").is_file():
            return cand
    raise DatapathError("the eBPF sources (bpf/lib/common.h) are not installed with labkit")


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def flatten_source(path: Path, _seen: set[Path] | None = None) -> str:
    """``path`` with its local ``#include "…"`` files inlined (once each), ``#line`` kept exact.

    bcc rewrites map accesses (``map.lookup(&k)``) only in the main file it compiles, so the
    helpers of ``bpf/lib/*.h`` must reach it as part of that file."""
    path = path.resolve()
    seen = set() if _seen is None else _seen
    if path in seen:
        return ""
    seen.add(path)
    out = [f'#line 1 "{path}"']
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        m = _INCLUDE.match(line)
        if m:
            out.append(flatten_source(path.parent / m.group(1), seen))
            out.append(f'#line {lineno + 1} "{path}"')
        else:
            out.append(line)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- libbpf access

_LIB: ct.CDLL | None = None


def _lib() -> ct.CDLL:
    """libbpf's syscall wrappers, reached through bcc's libbcc (which links libbpf)."""
    global _LIB
    if _LIB is None:
        try:
            from bcc.libbcc import lib as bcclib

            name = bcclib._name
        except ImportError:  # cleanup must work even where bcc cannot be imported
            name = "libbpf.so.1"
        lib = ct.CDLL(name, use_errno=True)  # own CDLL: argtypes here do not touch bcc's
        lib.bpf_obj_get.argtypes = [ct.c_char_p]
        lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
        lib.bpf_prog_attach.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]
        lib.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
        lib.bpf_prog_query.argtypes = [ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32),
                                       ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32)]
        lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
        lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
        lib.bpf_map_update_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p,
                                             ct.POINTER(ct.c_uint32), ct.c_void_p]
        lib.bpf_map_delete_batch.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]
        lib.bpf_map_lookup_batch.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_void_p,
                                             ct.c_void_p, ct.POINTER(ct.c_uint32), ct.c_void_p]
        lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
        _LIB = lib
    return _LIB


def _oserror(what: str) -> OSError:
    err = ct.get_errno() or errno.EIO
    return OSError(err, f"{what}: {os.strerror(err)}")


def obj_get(path: Path) -> int:
    """fd of a pinned BPF object (map or program)."""
    fd = _lib().bpf_obj_get(str(path).encode())
    if fd < 0:
        raise _oserror(f"bpf_obj_get {path}")
    return fd


def obj_pin(fd: int, path: Path) -> None:
    if _lib().bpf_obj_pin(fd, str(path).encode()) != 0:
        raise _oserror(f"bpf_obj_pin {path}")


def _prog_name(fd: int) -> str:
    """The kernel's name of a program (struct bpf_prog_info.name, at offset 64)."""
    info = ct.create_string_buffer(256)
    size = ct.c_uint32(len(info))
    if _lib().bpf_obj_get_info_by_fd(fd, info, ct.byref(size)) != 0:
        raise _oserror("bpf_obj_get_info_by_fd")
    return info.raw[64:80].split(b"\0", 1)[0].decode()


def cgroup_programs(cgroup_fd: int, attach_type: int) -> list[tuple[int, str]]:
    """(id, name) of the programs attached directly to a cgroup for one attach type."""
    lib = _lib()
    ids = (ct.c_uint32 * 64)()
    cnt, flags = ct.c_uint32(64), ct.c_uint32(0)
    if lib.bpf_prog_query(cgroup_fd, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt)) != 0:
        raise _oserror("bpf_prog_query")
    out = []
    for prog_id in ids[: cnt.value]:
        fd = lib.bpf_prog_get_fd_by_id(prog_id)
        if fd < 0:
            continue  # detached meanwhile
        try:
            out.append((prog_id, _prog_name(fd)))
        finally:
            os.close(fd)
    return out


class PinnedMap:
    """A BPF map opened by its pin, written and read in batches of raw packed entries."""

    def __init__(self, spec: S.MapSpec, path: Path):
        self.spec, self.path = spec, path
        self.key_size, self.leaf_size = ct.sizeof(spec.key), ct.sizeof(spec.leaf)
        self.fd = obj_get(path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def update(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        """Insert or replace ``keys[i]`` -> ``values[i]`` (packed structs) in one syscall."""
        if not keys:
            return
        count = ct.c_uint32(len(keys))
        if _lib().bpf_map_update_batch(self.fd, b"".join(keys), b"".join(values), ct.byref(count), None) != 0:
            raise _oserror(f"update {self.spec.name} ({count.value}/{len(keys)} written)")

    def delete(self, keys: Sequence[bytes]) -> None:
        """Delete all ``keys`` in one syscall; keys already gone are skipped (the kernel stops at
        the first missing one: the rest is retried from there)."""
        rest = list(keys)
        while rest:
            buf = b"".join(rest)
            count = ct.c_uint32(len(rest))
            if _lib().bpf_map_delete_batch(self.fd, buf, ct.byref(count), None) == 0:
                return
            err = ct.get_errno()
            if err != errno.ENOENT:
                raise _oserror(f"delete {self.spec.name}")
            rest = rest[count.value + 1:]  # count = deleted before the missing key

    def dump(self, chunk: int = 16384) -> tuple[list[bytes], bytes]:
        """Every packed key (a list) and every packed value (one buffer, same order) in the map,
        read with ``BPF_MAP_LOOKUP_BATCH``."""
        lib = _lib()
        n = min(chunk, self.spec.max_entries)
        ks, vs = self.key_size, self.leaf_size
        keys = ct.create_string_buffer(n * ks)
        vals = ct.create_string_buffer(n * vs)
        in_batch, out_batch = ct.c_uint64(0), ct.c_uint64(0)  # hash maps use a u32 bucket cursor
        all_keys: list[bytes] = []
        all_vals: list[bytes] = []
        first = True
        while True:
            count = ct.c_uint32(n)
            res = lib.bpf_map_lookup_batch(self.fd, None if first else ct.byref(in_batch),
                                           ct.byref(out_batch), keys, vals, ct.byref(count), None)
            if res != 0 and ct.get_errno() != errno.ENOENT:
                raise _oserror(f"lookup {self.spec.name}")
            got = count.value
            kraw = keys.raw[: got * ks]
            all_keys += [kraw[i:i + ks] for i in range(0, len(kraw), ks)]
            all_vals.append(vals.raw[: got * vs])
            if res != 0:  # ENOENT: the whole map was read
                return all_keys, b"".join(all_vals)
            in_batch.value = out_batch.value
            first = False

    def items(self) -> list[tuple[bytes, bytes]]:
        keys, vals = self.dump()
        vs = self.leaf_size
        return [(k, vals[i * vs:(i + 1) * vs]) for i, k in enumerate(keys)]

    def get(self, key: bytes) -> bytes | None:
        val = ct.create_string_buffer(self.leaf_size)
        if _lib().bpf_map_lookup_elem(self.fd, key, val) != 0:
            return None
        return val.raw

    def __len__(self) -> int:
        return len(self.dump()[0])


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


# ----------------------------------------------------------------------------- bpffs

def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount in this mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mnt = left.split()[4].encode().decode("unicode_escape")
            out.append((mnt, right.split()[0]))
    return out


def _cgroup2_mounts() -> list[Path]:
    return [Path(m) for m, fs in _mountinfo() if fs == "cgroup2"]


class Bpffs:
    """A datapath's (or policy engine's) pinned objects: its folder ``<folder>/{maps,progs}`` in the
    lab's private bpf filesystem ``<state_dir>/bpffs``, and its state file ``<state_dir>/<folder>.json``
    (what it attached where, for a later process to detach). Compiling with bcc pins the maps (the C
    names ``LK_PIN_DIR``) and the programs, so that a new process reuses them without recompiling."""

    def __init__(self, state_dir: Path, folder: str):
        self.root = Path(state_dir) / "bpffs"
        self.dir = self.root / folder
        self.maps = self.dir / "maps"
        self.progs = self.dir / "progs"
        self.state_file = Path(state_dir) / f"{folder}.json"

    def mounted(self) -> bool:
        target = str(self.root.resolve()) if self.root.exists() else str(self.root)
        return any(m == target and fs == "bpf" for m, fs in _mountinfo())

    def ensure(self) -> None:
        if not self.mounted():
            self.root.mkdir(parents=True, exist_ok=True)
            nsexec.run(["mount", "-t", "bpf", "-o", "mode=0700", "lk-bpffs", str(self.root)])
        self.maps.mkdir(parents=True, exist_ok=True)
        self.progs.mkdir(parents=True, exist_ok=True)

    def has(self, maps: Iterable[str], progs: Iterable[str]) -> bool:
        """Whether these maps and programs are all pinned."""
        return (all((self.maps / m).exists() for m in maps)
                and all((self.progs / p).exists() for p in progs))

    def compile_and_pin(self, source: str, programs: Iterable[tuple[str, int, int | None]], where: str) -> float:
        """Compile ``bpf/<source>`` with bcc (its maps pinned by bcc), load every
        ``(name, prog_type, attach_type)`` and pin it; returns the seconds it took."""
        try:
            from bcc import BPF
        except ImportError as exc:
            raise DatapathError(f"{where}: bcc is not importable ({exc}); run setup.sh / `labkit doctor`") from exc
        if '"' in str(self.maps) or "\\" in str(self.maps):
            raise DatapathError(f"{where}: state folder {self.root.parent} has quotes or backslashes")
        for pin in self.progs.iterdir():  # half-made earlier attempt
            pin.unlink()
        t0 = time.perf_counter()
        text = flatten_source(bpf_source_dir() / source)
        try:
            bpf = BPF(text=text.encode(), cflags=[f'-DLK_PIN_DIR="{self.maps}"', "-Wno-macro-redefined"])
        except Exception as exc:  # bcc raises bare Exception on compile errors
            raise DatapathError(f"{where}: compiling {source} failed: {exc}") from exc
        try:
            for name, prog_type, attach_type in programs:
                try:
                    kw = {} if attach_type is None else {"attach_type": attach_type}
                    fn = bpf.load_func(name.encode(), prog_type, **kw)
                except Exception as exc:
                    raise DatapathError(f"{where}: loading {name} failed: {exc}") from exc
                obj_pin(fn.fd, self.progs / name)
        finally:
            bpf.cleanup()  # closes fds: the pins (and later the hooks) keep everything alive
        return time.perf_counter() - t0

    def prog_fds(self, names: Iterable[str]) -> dict[str, int]:
        """New fds of pinned programs (the caller closes them)."""
        return {name: obj_get(self.progs / name) for name in names}

    def load_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def save_state(self, state: dict) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_file)

    def remove(self) -> None:
        """Unpin everything of this folder and drop the state file; unmount when no other folder
        is left."""
        if self.mounted():
            for sub in (self.maps, self.progs):
                if sub.is_dir():
                    for pin in sub.iterdir():
                        pin.unlink()
                    sub.rmdir()
            if self.dir.is_dir():
                self.dir.rmdir()
            # a fresh bpffs holds the kernel's preloaded iterators (maps.debug, progs.debug)
            if all(p.name.endswith(".debug") for p in self.root.iterdir()):
                nsexec.run(["umount", str(self.root)])
        if self.root.is_dir() and not self.mounted() and not any(self.root.iterdir()):
            self.root.rmdir()
        self.state_file.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- datapaths

class _EbpfDatapath(Datapath):
    """Compile, load, pin and attach once; then render syncs into map batches."""

    source: ClassVar[str]  # entry file under bpf/
    programs: ClassVar[tuple[Program, ...]]
    map_specs: ClassVar[tuple[S.MapSpec, ...]]  # every map the entry file declares
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

    def _prog_fds(self) -> dict[str, int]:
        return self.fs.prog_fds(p.name for p in self.programs)

    def _ensure_loaded(self) -> ServiceMaps:
        if self._maps is not None:
            return self._maps
        self._check_target()
        self.fs.ensure()
        if not self.fs.has((m.name for m in self.map_specs), (p.name for p in self.programs)):
            self.compile_seconds = self.fs.compile_and_pin(
                self.source, [(p.name, p.prog_type, p.attach_type) for p in self.programs], self._where())
        if not self._attached():
            fds = self._prog_fds()
            try:
                self._attach(fds)
            finally:
                for fd in fds.values():
                    os.close(fd)
        self._maps = ServiceMaps(self.fs.maps)
        return self._maps

    def _load_state(self) -> dict:
        return self.fs.load_state()

    def _save_state(self, state: dict) -> None:
        self.fs.save_state(state)

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
    features = _EbpfDatapath.features + ("cgroup2",)
    source = "bpf_sock.c"
    programs = SOCK_PROGRAMS
    map_specs = S.SOCK_MAPS
    rev_nat = False  # UDP replies are restored per socket (lk_rnat_sk_v4), not per service

    def _cgroup(self) -> Path:
        """The node's pod cgroup, or DatapathError saying why it is not a safe place to attach."""
        problem = _unsafe_cgroup(self.ctx.cgroup)
        if problem:
            raise DatapathError(f"{self._where()}: {problem}")
        return Path(self.ctx.cgroup).resolve()

    def _check_target(self) -> None:
        self._cgroup()

    def _attach(self, fds: dict[str, int]) -> None:
        cg = self._cgroup()
        self._save_state({"cgroup": str(cg)})  # before attaching: cleanup must know where to look
        cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for prog in self.programs:
                # flags 0: exclusive on this cgroup, and attaching again replaces (idempotent)
                if _lib().bpf_prog_attach(fds[prog.name], cg_fd, prog.attach_type, 0) != 0:
                    raise _oserror(f"attach {prog.name} to {cg}")
        finally:
            os.close(cg_fd)

    def _our_programs(self, cg: Path) -> dict[int, list[int]]:
        """attach type -> ids of labkit programs attached to ``cg``."""
        cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return {p.attach_type: [pid for pid, name in cgroup_programs(cg_fd, p.attach_type)
                                    if name == p.name[:_KERNEL_NAME_LEN]]
                    for p in self.programs}
        finally:
            os.close(cg_fd)

    def _attached(self) -> bool:
        return all(self._our_programs(self._cgroup()).values())

    def _detach(self) -> None:
        targets = {Path(p) for p in (self._load_state().get("cgroup"), self.ctx.cgroup) if p}
        lib = _lib()
        for cg in targets:
            if _unsafe_cgroup(cg):
                continue  # gone (and its programs with it), or never ours to touch
            cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for attach_type, ids in self._our_programs(cg).items():
                    for prog_id in ids:
                        fd = lib.bpf_prog_get_fd_by_id(prog_id)
                        if fd < 0:
                            continue
                        try:
                            if lib.bpf_prog_detach2(fd, cg_fd, attach_type) != 0 and ct.get_errno() != errno.ENOENT:
                                raise _oserror(f"detach program {prog_id} from {cg}")
                        finally:
                            os.close(fd)
            finally:
                os.close(cg_fd)


def _unsafe_cgroup(cgroup: Path | str | None) -> str | None:
    """Why socket-LB must not attach to ``cgroup`` (None: it may). Only a folder below a cgroup v2
    root qualifies: the root itself would rewrite every connection of the machine."""
    if cgroup is None:
        return ("the node has no cgroup for its pods (NodeContext.cgroup); socket-LB attaches there "
                "and never to a cgroup root")
    cg = Path(cgroup).resolve()
    roots = [r.resolve() for r in _cgroup2_mounts()]
    if cg in roots:
        return f"refusing to attach to the cgroup v2 root {cg}: that would rewrite every connection of this machine"
    if not any(root in cg.parents for root in roots):
        return f"{cg} is not a folder of a cgroup v2 hierarchy"
    if not (cg / "cgroup.procs").exists():
        return f"cgroup {cg} does not exist"
    return None


@dataclass(frozen=True)
class TcHook:
    """One tc filter: a program on one direction of one interface in one namespace."""

    netns: str | None
    ifname: str
    parent: str  # TC_INGRESS / TC_EGRESS
    prog: str


@register
class TcLB(_EbpfDatapath):
    """``ebpf-tc``: per-packet DNAT/reverse NAT with conntrack-lite at tc on pod-facing interfaces."""

    name = "ebpf-tc"
    features = _EbpfDatapath.features + ("tc-clsact",)
    source = "bpf_lxc.c"
    programs = LXC_PROGRAMS
    map_specs = S.LXC_MAPS
    rev_nat = True

    def __init__(self, ctx: NodeContext):
        super().__init__(ctx)
        self._hooks: list[TcHook] | None = None

    def hooks(self) -> list[TcHook]:
        """Where the programs go. A pod with a node-side interface: DNAT at its ingress, reverse NAT
        at its egress, and reverse NAT also at the pod's own address interface when that is not the
        other end of the node-side one (eni-exclusive: replies come in on the ENI, not through the
        node). A pod without one: both on the pod's own interface, inside the pod.

        Resolved with netlink once, when the programs are attached, and recorded in the state file
        with the pods it was resolved for; later processes read it from there."""
        if self._hooks is None:
            state = self._load_state()
            if state.get("pods") == self._pods_signature() and state.get("hooks"):
                self._hooks = [TcHook(h["netns"], h["ifname"], h["parent"], h["prog"]) for h in state["hooks"]]
            else:
                self._hooks = self._resolve_hooks()
        return self._hooks

    def _pods_signature(self) -> list:
        return [[p.pod, p.ifname, p.netns, p.ip] for p in self.ctx.pods]

    def _resolve_hooks(self) -> list[TcHook]:
        node_peers: dict[str, int | None] = {}
        if any(p.ifname for p in self.ctx.pods):
            node_peers = _netlink(self.ctx.netns, lambda ipr: {
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
        state = self._load_state()
        before = {(h["netns"], h["ifname"], h["parent"]): h
                  for h in state.get("hooks", []) + state.get("earlier_hooks", [])}
        recorded: dict[tuple, dict] = {}
        for netns, group in _by_netns(self.hooks()).items():
            def attach(ipr, group=group, netns=netns) -> None:
                for h in group:
                    index = _ifindex(ipr, h.ifname)
                    if index is None:
                        raise DatapathError(f"{self._where()}: interface {h.ifname} not found in "
                                            f"{netns or 'this namespace'}")
                    key = (h.netns, h.ifname, h.parent)
                    made_before = bool(before.get(key, {}).get("qdisc_created"))
                    recorded[key] = {"netns": h.netns, "ifname": h.ifname, "parent": h.parent, "prog": h.prog,
                                     "qdisc_created": _ensure_clsact(ipr, index) or made_before}
                    self._save_state({  # before the filter exists; hooks of other pods kept for cleanup
                        "pods": self._pods_signature(), "hooks": list(recorded.values()),
                        "earlier_hooks": [e for k, e in before.items() if k not in recorded]})
                    ipr.tc("replace-filter", "bpf", index, TC_HANDLE, fd=fds[h.prog], name=h.prog,
                           parent=h.parent, classid=1, direct_action=True, prio=TC_PREF)

            _netlink(netns, attach)

    def _attached(self) -> bool:
        for netns, group in _by_netns(self.hooks()).items():
            if netns and not nsexec.netns_path(netns).exists():
                return False

            def check(ipr, group=group) -> bool:
                for h in group:
                    index = _ifindex(ipr, h.ifname)
                    if index is None or h.prog not in _our_filters(ipr, index, h.parent):
                        return False
                return True

            if not _netlink(netns, check):
                return False
        return True

    def _detach(self) -> None:
        state = self._load_state()
        recorded = state.get("hooks", []) + state.get("earlier_hooks", [])
        try:
            current = [{"netns": h.netns, "ifname": h.ifname, "parent": h.parent, "qdisc_created": False}
                       for h in self.hooks()]
        except DatapathError:  # a pod namespace is gone already
            current = []
        seen: dict[tuple, dict] = {}
        for h in recorded + current:  # recorded first: they know whether we made the qdisc
            seen.setdefault((h["netns"], h["ifname"], h["parent"]), h)
        by_ns: dict[str | None, list[dict]] = {}
        for h in seen.values():
            by_ns.setdefault(h["netns"], []).append(h)
        for netns, group in by_ns.items():
            if netns and not nsexec.netns_path(netns).exists():
                continue  # namespace gone: its interfaces and filters with it

            def detach(ipr, group=group) -> None:
                made_qdisc: dict[int, bool] = {}
                for h in group:
                    index = _ifindex(ipr, h["ifname"])
                    if index is None:
                        continue
                    if _our_filters(ipr, index, h["parent"]):
                        _ignore_missing(lambda: ipr.tc("del-filter", "bpf", index, TC_HANDLE,
                                                       parent=h["parent"], prio=TC_PREF))
                    made_qdisc[index] = made_qdisc.get(index, False) or h.get("qdisc_created", False)
                for index, made in made_qdisc.items():
                    if made and not _any_filters(ipr, index):
                        _ignore_missing(lambda: ipr.tc("del", "clsact", index))

            _netlink(netns, detach)


# ----------------------------------------------------------------------------- netlink helpers

_by_netns, _netlink, _ifindex, _ensure_clsact, _filters, _ignore_missing = (
    tc.by_netns, tc.netlink, tc.ifindex, tc.ensure_clsact, tc.filters, tc.ignore_missing)


def _pod_interface(pod_netns: str, ip: str) -> tuple[str, int]:
    """Name and ifindex of the interface holding ``ip`` in the pod's namespace."""
    if not nsexec.netns_path(pod_netns).exists():
        raise DatapathError(f"namespace {pod_netns} does not exist")

    def find(ipr) -> tuple[str, int] | None:
        for addr in ipr.get_addr(family=2):
            if addr.get_attr("IFA_ADDRESS") == ip:
                return ipr.get_links(addr["index"])[0].get_attr("IFLA_IFNAME"), addr["index"]
        return None

    found = _netlink(pod_netns, find)
    if found is None:
        raise DatapathError(f"no interface holds {ip} in namespace {pod_netns}")
    return found


def _our_filters(ipr, index: int, parent: str) -> set[str]:
    """Names of labkit's bpf filters on one direction of an interface."""
    out = set()
    for f in _filters(ipr, index, parent):
        opts = f.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts else None
        if f.get_attr("TCA_KIND") == "bpf" and name and name.startswith("lk_"):
            out.add(name)
    return out


def _any_filters(ipr, index: int) -> bool:
    return any(f.get_attr("TCA_OPTIONS") for p in (TC_INGRESS, TC_EGRESS) for f in _filters(ipr, index, p))


__all__ = ["SocketLB", "TcLB", "render_full", "render_partial", "assign_slots", "ServiceIds", "MapOps",
           "PinnedMap", "ServiceMaps", "Bpffs", "flatten_source", "bpf_source_dir", "cgroup_programs"]
