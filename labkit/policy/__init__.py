"""NetworkPolicy: the model (:mod:`.model`), and engines that enforce it behind one interface
(:mod:`.base`): ``iptables`` (:mod:`.iptables`) and ``ebpf`` (:mod:`.ebpf`).

:func:`sync_node` is what a backend calls after building a node: compile the node's table from the
spec and sync the spec's engine there.
"""

from __future__ import annotations

from .base import ENGINES, PolicyEngine, PolicySyncResult, get, register
from .model import Oracle, PolicyDiff, PolicyTable, compile_table, diff, expand, matrix_ports, server_ports


def sync_node(spec, ctx, plan=None) -> PolicySyncResult | None:
    """Enforce ``spec``'s policies on one node (nothing when there are none or the engine is ``none``)."""
    if not spec.policies or spec.policy_engine == "none":
        return None
    engine = get(spec.policy_engine)(ctx, spec.datapath)
    try:
        return engine.sync(compile_table(spec, ctx.node, plan))
    finally:
        engine.close()


__all__ = ["PolicyEngine", "PolicySyncResult", "ENGINES", "get", "register", "Oracle", "PolicyDiff",
           "PolicyTable", "compile_table", "diff", "expand", "matrix_ports", "server_ports", "sync_node"]
