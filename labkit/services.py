"""The Service model every datapath consumes, and the change tracking computed once for all of them.

A :class:`ServicePort` is one port of one Service with its endpoints, as kube-proxy sees a Service
plus its EndpointSlices (``ServicePortName`` "ns/name:port" → ClusterIP, port, protocol, endpoints).
A :class:`ServiceTable` is the ordered set of them; its order is the order datapaths install them in
(so "first", "middle" and "last" service mean the same thing for every datapath). :func:`diff`
compares two tables (kube-proxy's ``ServiceChangeTracker`` / ``EndpointsChangeTracker`` role);
datapaths only render and apply.

:func:`table_from_spec` resolves a spec's selectors to pod addresses and expands bulk groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from . import addressing
from .spec import Spec


@dataclass(frozen=True)
class Endpoint:
    """One backend of a service port: a pod address and its target port."""

    ip: str
    port: int
    pod: str = ""  # pod name, for reports ("" when synthetic)
    node: str = ""


@dataclass(frozen=True)
class ServicePort:
    """One port of one Service: what kube-proxy programs for a ``ServicePortName``."""

    namespace: str
    name: str
    port_name: str  # kube-proxy's Service port name ("http"); "" for an unnamed single port
    protocol: str  # "TCP" or "UDP"
    cluster_ip: str
    port: int
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def key(self) -> str:
        """kube-proxy's ``ServicePortName.String()``: ``ns/name:port`` (``ns/name`` when unnamed)."""
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port_name}" if self.port_name else base

    @property
    def proto(self) -> str:
        return self.protocol.lower()


@dataclass(frozen=True)
class ServiceTable:
    """An immutable, ordered set of service ports keyed by :attr:`ServicePort.key`."""

    ports: Mapping[str, ServicePort] = field(default_factory=dict)

    @classmethod
    def of(cls, ports: Iterable[ServicePort]) -> ServiceTable:
        table: dict[str, ServicePort] = {}
        for sp in ports:
            if sp.key in table:
                raise ValueError(f"duplicate service port {sp.key}")
            table[sp.key] = sp
        return cls(table)

    def __iter__(self) -> Iterator[ServicePort]:
        return iter(self.ports.values())

    def __len__(self) -> int:
        return len(self.ports)

    def __getitem__(self, key: str) -> ServicePort:
        return self.ports[key]

    def __contains__(self, key: object) -> bool:
        return key in self.ports

    def at(self, index: int) -> ServicePort:
        """The service port at a position in install order (negative counts from the end)."""
        keys = list(self.ports)  # O(n); only used by experiments choosing first/middle/last
        return self.ports[keys[index]]

    def with_ports(self, *ports: ServicePort) -> ServiceTable:
        """A copy with ``ports`` added or replaced (replaced ones keep their position)."""
        table = dict(self.ports)
        for sp in ports:
            table[sp.key] = sp
        return ServiceTable(table)

    def without(self, *keys: str) -> ServiceTable:
        return ServiceTable({k: v for k, v in self.ports.items() if k not in set(keys)})


@dataclass(frozen=True)
class TableDiff:
    """What changed from one table to the next. ``full`` means there is no known previous state."""

    added: tuple[ServicePort, ...] = ()
    removed: tuple[ServicePort, ...] = ()
    changed: tuple[tuple[ServicePort, ServicePort], ...] = ()  # (old, new), same key
    full: bool = False

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.full)

    def summary(self) -> str:
        kind = "full" if self.full else "partial"
        return f"{kind}: +{len(self.added)} -{len(self.removed)} ~{len(self.changed)}"


def diff(old: ServiceTable | None, new: ServiceTable) -> TableDiff:
    """Change set from ``old`` to ``new``; ``old=None`` (unknown kernel state) gives a full diff."""
    if old is None:
        return TableDiff(added=tuple(new), full=True)
    added, changed = [], []
    for key, sp in new.ports.items():
        prev = old.ports.get(key)
        if prev is None:
            added.append(sp)
        elif prev != sp:
            changed.append((prev, sp))
    removed = tuple(sp for key, sp in old.ports.items() if key not in new.ports)
    return TableDiff(tuple(added), removed, tuple(changed))


def table_from_spec(spec: Spec, plan: addressing.AddressPlan | None = None) -> ServiceTable:
    """The lab's services with endpoints resolved: explicit services get every pod their selector
    matches; bulk service *k* of a group gets ``endpoints`` pods, round-robin from the matches."""
    plan = plan or addressing.plan(spec)
    pods = [(n.name, p) for n, p in spec.pods()]
    ports: list[ServicePort] = []
    for svc, ips in addressing.service_ips(spec):
        matched = [Endpoint(str(plan.pods[p.name].ip), svc.target_port, p.name, node)
                   for node, p in pods if p.matches(svc.selector)]
        if not svc.bulk:
            ports.append(ServicePort(svc.namespace, svc.name, "", svc.protocol,
                                     str(ips[0]), svc.port, tuple(matched)))
            continue
        per = min(3 if svc.endpoints is None else svc.endpoints, len(matched))
        for k, ip in enumerate(ips):
            eps = tuple(matched[(k * per + j) % len(matched)] for j in range(per)) if per else ()
            ports.append(ServicePort(svc.namespace, f"{svc.name}-{k}", "", svc.protocol,
                                     str(ip), svc.port, eps))
    return ServiceTable.of(ports)
