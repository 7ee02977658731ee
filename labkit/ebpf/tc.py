"""Programs on the directions of interfaces: one attach/detach lifecycle for every client, with tc
clsact, or with netkit's own attach points where the interface is a netkit primary.

One job: put a client's programs on the directions of interfaces it names (:class:`TcHook`), tell
whether they are still there, and take them away again, from this process or a later one. A client
is told apart from the others on the same interface by its filter priority and the prefix of its
filter names (the program's name), both in :data:`CLIENTS`: the ``ebpf`` policy engine
``0x4C40``/``lk_pol_``, the ``ebpf-tc`` Service datapath ``0x4C4B``/``lk_``, eBPF host routing
``0x4C52``/``lk_host_``; none recognises, and so none deletes, another's filters. Every filter has
handle :data:`TC_HANDLE`.

On a netkit primary (``netkit`` pods) the same hooks are netkit's program lists
(:mod:`labkit.ebpf.netkit`): tc ingress of the node side, what the pod sends, is
``BPF_NETKIT_PEER``; tc egress, what goes into the pod, is ``BPF_NETKIT_PRIMARY``. Programs there
run inside the device's transmit, before the packet is queued to the other end (where a tc
filter on the primary runs only after that backlog). Each is a BPF link pinned in the client's
bpffs folder (``links/``); a client's link goes before the first program of a client that runs
later (:data:`CLIENTS`' order, as tc's priorities order filters), so the order on a list does not
depend on which client attached first.

The client's state file is the journal, written *before* each filter exists::

    {"hooks": [{"netns", "ifname", "parent", "prog", "qdisc_created"}, …],   attached by the last attach
     "earlier_hooks": [...],   recorded by an earlier attach and not since: still removed by cleanup
     …}                        anything else the client keeps there (``extra`` of :meth:`TcAttachments.attach`)

``qdisc_created`` says that this client added the clsact qdisc of that interface (it had none), so
cleanup removes the qdisc too once no filter of anyone is left on it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import nsexec
from ..errors import DatapathError
from . import netkit
from .libbpf import KERNEL_NAME_LEN, obj_pin, prog_id
from .loader import StateFile
from .netlink import by_netns, ensure_clsact, filters, ifindex, ignore_missing, netlink

TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"
TC_HANDLE = 1

# Every client of these hooks: the prefix of its programs' names -> its place on a shared hook (tc
# priority: lower runs first; netkit: the list's order). Policy first (it judges the packet as the
# pod sent it), then the Service NAT, then host routing (which forwards what the others let on).
CLIENTS = {"lk_pol_": 0x4C40, "lk_": 0x4C4B, "lk_host_": 0x4C52}
NETKIT_LIST = {TC_INGRESS: netkit.ATTACH_NETKIT_PEER, TC_EGRESS: netkit.ATTACH_NETKIT_PRIMARY}


def client_of(name: str) -> str | None:
    """The client (its :data:`CLIENTS` prefix) a program belongs to by its name (the kernel's,
    truncated, will do): the longest prefix that matches."""
    found = [prefix for prefix in CLIENTS if name.startswith(prefix)]
    return max(found, key=len) if found else None


def netkit_position(listed: list[tuple[int, int, str]], prio: int) -> int | None:
    """Where a client of priority ``prio`` goes on a netkit list of (prog id, link id, name): before
    the id returned (the first program of a client that runs later), or at the end (None).
    Programs of no known client do not move it."""
    for prog_id, _, name in listed:
        client = client_of(name)
        if client is not None and CLIENTS[client] > prio:
            return prog_id
    return None


def is_netkit(ipr, index: int) -> bool:
    """Whether interface ``index`` is a netkit primary, whose lists take the hooks (both lists are
    reached through the primary; a peer, like any other device, takes tc filters)."""
    from ..modes.netkit import register_netlink

    register_netlink()  # pyroute2 learns IFLA_NETKIT_* (idempotent)
    links = ipr.get_links(index)
    info = links[0].get_attr("IFLA_LINKINFO") if links else None
    if not info or info.get_attr("IFLA_INFO_KIND") != "netkit":
        return False
    data = info.get_attr("IFLA_INFO_DATA")
    return bool(data) and bool(data.get_attr("IFLA_NETKIT_PRIMARY"))


def hook_programs(ipr, index: int, parent: str) -> list[str]:
    """Names of every program on one direction of an interface, anyone's: tc filters, and on a
    netkit device its list for that direction too. Call inside the interface's namespace."""
    names = [f.get_attr("TCA_OPTIONS").get_attr("TCA_BPF_NAME") or "" for f in filters(ipr, index, parent)
             if f.get_attr("TCA_KIND") == "bpf" and f.get_attr("TCA_OPTIONS")]
    if is_netkit(ipr, index):
        names += [name for _, _, name in netkit.programs(index, NETKIT_LIST[parent])]
    return names


@dataclass(frozen=True)
class TcHook:
    """One tc filter: a program on one direction of one interface in one namespace."""

    netns: str | None
    ifname: str
    parent: str  # TC_INGRESS / TC_EGRESS
    prog: str  # pinned program; also the filter's name


def _key(h: dict) -> tuple:
    return h["netns"], h["ifname"], h["parent"]


class TcAttachments:
    """One client's bpf filters: priority ``prio``, names starting with ``prefix``, journal in
    ``state``."""

    def __init__(self, state: StateFile, prio: int, prefix: str, links: Path | None = None):
        """``links``: the folder (in a mounted bpffs) where links on netkit devices are pinned; a
        client without one cannot attach on netkit devices."""
        self.state, self.prio, self.prefix, self.links = state, prio, prefix, links

    def is_ours(self, f) -> bool:
        """Whether a filter of a tc dump is this client's (kind, priority and name prefix)."""
        opts = f.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts else None
        return (f.get_attr("TCA_KIND") == "bpf" and f["info"] >> 16 == self.prio
                and bool(name) and name.startswith(self.prefix))

    def ours(self, ipr, index: int, parent: str) -> set[str]:
        """Names of this client's filters on one direction of an interface."""
        return {f.get_attr("TCA_OPTIONS").get_attr("TCA_BPF_NAME")
                for f in filters(ipr, index, parent) if self.is_ours(f)}

    def recorded(self) -> list[TcHook]:
        """The hooks the journal says the last attach put in place."""
        return [TcHook(h["netns"], h["ifname"], h["parent"], h.get("prog", ""))
                for h in self.state.load().get("hooks", [])]

    def attach(self, hooks: Iterable[TcHook], fds: dict[str, int], where: str, extra: dict | None = None) -> None:
        """Attach (or re-attach: replace is idempotent) ``fds[h.prog]`` at every hook, journalling
        each before its filter exists; hooks of earlier attaches stay in the journal for cleanup."""
        state = self.state.load()
        before = {_key(h): h for h in state.get("hooks", []) + state.get("earlier_hooks", [])}
        recorded: dict[tuple, dict] = {}
        for netns, group in by_netns(hooks).items():
            def attach(ipr, group=group, netns=netns) -> None:
                for h in group:
                    index = ifindex(ipr, h.ifname)
                    if index is None:
                        raise DatapathError(f"{where}: interface {h.ifname} not found in "
                                            f"{netns or 'this namespace'}")
                    key = (h.netns, h.ifname, h.parent)
                    made_before = bool(before.get(key, {}).get("qdisc_created"))
                    nk = is_netkit(ipr, index)
                    recorded[key] = {"netns": h.netns, "ifname": h.ifname, "parent": h.parent, "prog": h.prog,
                                     "qdisc_created": (not nk and ensure_clsact(ipr, index)) or made_before}
                    if nk:
                        recorded[key]["netkit"] = True
                    self.state.save({**(extra or {}), "hooks": list(recorded.values()),
                                     "earlier_hooks": [e for k, e in before.items() if k not in recorded]})
                    if nk:
                        self._netkit_attach(h, index, fds[h.prog], where)
                    else:
                        ipr.tc("replace-filter", "bpf", index, TC_HANDLE, fd=fds[h.prog], name=h.prog,
                               parent=h.parent, classid=1, direct_action=True, prio=self.prio)

            netlink(netns, attach)

    def attached(self, hooks: Iterable[TcHook]) -> bool:
        """Whether every hook holds this client's filter of its program."""
        for netns, group in by_netns(hooks).items():
            if netns and not nsexec.netns_path(netns).exists():
                return False

            def check(ipr, group=group) -> bool:
                for h in group:
                    index = ifindex(ipr, h.ifname)
                    if index is None:
                        return False
                    if is_netkit(ipr, index):
                        if h.prog[:KERNEL_NAME_LEN] not in self._netkit_ours(index, h.parent).values():
                            return False
                    elif h.prog not in self.ours(ipr, index, h.parent):
                        return False
                return True

            if not netlink(netns, check):
                return False
        return True

    def detach(self, current: Callable[[], Iterable[TcHook]]) -> None:
        """Remove this client's filters from every hook of the journal and of ``current()`` (where
        the client would attach now; when that cannot be resolved, a pod namespace being gone, the
        journal alone), and the clsact qdiscs it added once no filter is left on them. Safe to
        repeat; interfaces and namespaces already gone are skipped."""
        state = self.state.load()
        recorded = state.get("hooks", []) + state.get("earlier_hooks", [])
        try:
            now = [{"netns": h.netns, "ifname": h.ifname, "parent": h.parent, "qdisc_created": False}
                   for h in current()]
        except DatapathError:
            now = []
        seen: dict[tuple, dict] = {}
        for h in recorded + now:  # recorded first: they know whether we made the qdisc
            seen.setdefault(_key(h), h)
        by_ns: dict[str | None, list[dict]] = {}
        for h in seen.values():
            by_ns.setdefault(h["netns"], []).append(h)
        for netns, group in by_ns.items():
            if netns and not nsexec.netns_path(netns).exists():
                continue  # namespace gone: its interfaces and filters with it
            netlink(netns, lambda ipr, group=group: self._detach_here(ipr, group))

    def _detach_here(self, ipr, group: list[dict]) -> None:
        made_qdisc: dict[int, bool] = {}
        for h in group:
            self._unpin(h["netns"], h["ifname"], h["parent"])
            index = ifindex(ipr, h["ifname"])
            if index is None:
                continue
            if is_netkit(ipr, index):
                for link_id in self._netkit_ours(index, h["parent"]):
                    netkit.link_detach_id(link_id)
            if self.ours(ipr, index, h["parent"]):
                ignore_missing(lambda: ipr.tc("del-filter", "bpf", index, TC_HANDLE, parent=h["parent"],
                                              prio=self.prio))
            made_qdisc[index] = made_qdisc.get(index, False) or h.get("qdisc_created", False)
        for index, made in made_qdisc.items():
            if made and not any_filters(ipr, index):
                ignore_missing(lambda: ipr.tc("del", "clsact", index))

    # -- netkit devices (call inside the device's namespace)
    def _netkit_ours(self, index: int, parent: str) -> dict[int, str]:
        """link id -> kernel name of this client's programs on a netkit device's list."""
        return {link_id: name for _, link_id, name in netkit.programs(index, NETKIT_LIST[parent])
                if link_id and client_of(name) == self.prefix}

    def _netkit_attach(self, h: TcHook, index: int, fd: int, where: str) -> None:
        """Put program ``fd`` on netkit ``index``'s list for ``h.parent`` in this client's place,
        replacing an older program of this client there (a recompiled one); nothing when it is there
        already. The link is pinned before this returns (else it would go with the fd)."""
        if self.links is None:
            raise DatapathError(f"{where}: {h.ifname} is a netkit device and this client has no folder to "
                                "pin links in")
        kind = NETKIT_LIST[h.parent]
        wanted = prog_id(fd)
        listed = netkit.programs(index, kind)
        if any(pid == wanted for pid, _, _ in listed):
            return
        older = [link_id for _, link_id, name in listed if link_id and client_of(name) == self.prefix]
        for link_id in older:
            netkit.link_detach_id(link_id)
        if older:
            listed = netkit.programs(index, kind)
        try:
            link = netkit.link_create(fd, index, kind, netkit_position(listed, self.prio))
        except OSError as exc:
            raise DatapathError(f"{where}: attaching {h.prog} to netkit {h.ifname} failed: {exc}") from exc
        try:
            pin = self._pin_path(h.netns, h.ifname, h.parent)
            pin.parent.mkdir(parents=True, exist_ok=True)
            pin.unlink(missing_ok=True)
            obj_pin(link, pin)
        finally:
            os.close(link)

    def _pin_path(self, netns: str | None, ifname: str, parent: str) -> Path:
        side = "peer" if NETKIT_LIST[parent] == netkit.ATTACH_NETKIT_PEER else "primary"
        assert self.links is not None
        return self.links / re.sub(r"[^A-Za-z0-9_-]", "_", f"{netns or 'root'}-{ifname}-{side}")  # bpffs: no dots

    def _unpin(self, netns: str | None, ifname: str, parent: str) -> None:
        if self.links is not None:
            self._pin_path(netns, ifname, parent).unlink(missing_ok=True)


def any_filters(ipr, index: int) -> bool:
    """Whether an interface has any tc filter (anyone's) on either direction."""
    return any(f.get_attr("TCA_OPTIONS") for p in (TC_INGRESS, TC_EGRESS) for f in filters(ipr, index, p))
