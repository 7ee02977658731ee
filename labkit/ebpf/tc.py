"""Programs attached with tc clsact: one attach/detach lifecycle for every client that uses tc.

One job: put a client's programs on the directions of interfaces it names (:class:`TcHook`), tell
whether they are still there, and take them away again, from this process or a later one. A client
is told apart from the others on the same interface by its filter priority and the prefix of its
filter names (the program's name): the ``ebpf-tc`` Service datapath is ``0x4C4B``/``lk_`` and the
``ebpf`` policy engine ``0x4C40``/``lk_pol_``, so neither recognises, and so never deletes, the
other's filters. Every filter has handle :data:`TC_HANDLE`.

The client's state file is the journal, written *before* each filter exists::

    {"hooks": [{"netns", "ifname", "parent", "prog", "qdisc_created"}, …],   attached by the last attach
     "earlier_hooks": [...],   recorded by an earlier attach and not since: still removed by cleanup
     …}                        anything else the client keeps there (``extra`` of :meth:`TcAttachments.attach`)

``qdisc_created`` says that this client added the clsact qdisc of that interface (it had none), so
cleanup removes the qdisc too once no filter of anyone is left on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .. import nsexec
from ..errors import DatapathError
from .loader import StateFile
from .netlink import by_netns, ensure_clsact, filters, ifindex, ignore_missing, netlink

TC_INGRESS = "ffff:fff2"
TC_EGRESS = "ffff:fff3"
TC_HANDLE = 1


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

    def __init__(self, state: StateFile, prio: int, prefix: str):
        self.state, self.prio, self.prefix = state, prio, prefix

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
                    recorded[key] = {"netns": h.netns, "ifname": h.ifname, "parent": h.parent, "prog": h.prog,
                                     "qdisc_created": ensure_clsact(ipr, index) or made_before}
                    self.state.save({**(extra or {}), "hooks": list(recorded.values()),
                                     "earlier_hooks": [e for k, e in before.items() if k not in recorded]})
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
                    if index is None or h.prog not in self.ours(ipr, index, h.parent):
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
            index = ifindex(ipr, h["ifname"])
            if index is None:
                continue
            if self.ours(ipr, index, h["parent"]):
                ignore_missing(lambda: ipr.tc("del-filter", "bpf", index, TC_HANDLE, parent=h["parent"],
                                              prio=self.prio))
            made_qdisc[index] = made_qdisc.get(index, False) or h.get("qdisc_created", False)
        for index, made in made_qdisc.items():
            if made and not any_filters(ipr, index):
                ignore_missing(lambda: ipr.tc("del", "clsact", index))


def any_filters(ipr, index: int) -> bool:
    """Whether an interface has any tc filter (anyone's) on either direction."""
    return any(f.get_attr("TCA_OPTIONS") for p in (TC_INGRESS, TC_EGRESS) for f in filters(ipr, index, p))
