"""The JSON form of service tables and change sets, as the host sends them to a remote agent.

Compact rows (install order kept): a service port is
``[namespace, name, port_name, protocol, cluster_ip, port, [[ip, port, pod, node], …]]``.
"""

from __future__ import annotations

from ..services import Endpoint, ServicePort, ServiceTable, TableDiff


def _port_to_json(sp: ServicePort) -> list:
    return [sp.namespace, sp.name, sp.port_name, sp.protocol, sp.cluster_ip, sp.port,
            [[e.ip, e.port, e.pod, e.node] for e in sp.endpoints]]


def _port_from_json(v: list) -> ServicePort:
    return ServicePort(*v[:6], tuple(Endpoint(*e) for e in v[6]))


def table_to_json(table: ServiceTable) -> list:
    return [_port_to_json(sp) for sp in table]


def table_from_json(rows: list) -> ServiceTable:
    return ServiceTable.of(_port_from_json(r) for r in rows)


def changes_to_json(changes: TableDiff) -> dict:
    return {"added": [_port_to_json(sp) for sp in changes.added],
            "removed": [_port_to_json(sp) for sp in changes.removed],
            "changed": [[_port_to_json(a), _port_to_json(b)] for a, b in changes.changed], "full": changes.full}


def changes_from_json(d: dict) -> TableDiff:
    return TableDiff(tuple(_port_from_json(r) for r in d["added"]), tuple(_port_from_json(r) for r in d["removed"]),
                     tuple((_port_from_json(a), _port_from_json(b)) for a, b in d["changed"]), d["full"])


def apply_changes(table: ServiceTable, changes: TableDiff) -> ServiceTable:
    """The table ``changes`` lead to from ``table`` (what the host's desired table is)."""
    return table.without(*(sp.key for sp in changes.removed)).with_ports(
        *changes.added, *(new for _, new in changes.changed))


__all__ = ["table_to_json", "table_from_json", "changes_to_json", "changes_from_json", "apply_changes"]
