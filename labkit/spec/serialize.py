"""A spec as plain data (YAML, JSON): the form :mod:`labkit.spec.load` reads back, with fields that
hold their default left out and policy rules written as Kubernetes writes them (``from``/``to``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

import yaml

from .types import PolicyPeer, PolicyRule, PolicySpec, ServerSpec, Spec


def to_yaml(spec: Spec) -> str:
    return yaml.safe_dump(to_plain(spec), sort_keys=False)


def to_plain(obj: Any) -> Any:
    """Plain data for YAML/JSON, leaving out fields that hold their default."""
    if isinstance(obj, PolicySpec):  # rules in their YAML form (from/to, except), as parse_spec reads them
        return _policy_plain(obj)
    if isinstance(obj, ServerSpec):
        return obj.to_plain()
    if is_dataclass(obj):
        out = {}
        for f_ in fields(obj):
            value = to_plain(getattr(obj, f_.name))
            if f_.default is not MISSING:
                default = to_plain(f_.default)
            elif f_.default_factory is not MISSING:
                default = to_plain(f_.default_factory())
            else:
                default = MISSING
            if value != default:
                out[f_.name] = value
        return out
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def _policy_plain(pol: PolicySpec) -> dict[str, Any]:
    def peer(x: PolicyPeer) -> dict:
        if x.ip_block is None:
            return {"pod_selector": dict(x.pod_selector or {})}
        b = {"cidr": x.ip_block.cidr}
        if x.ip_block.except_:
            b["except"] = list(x.ip_block.except_)
        return {"ip_block": b}

    def rule(r: PolicyRule, word: str) -> dict:
        out: dict[str, Any] = {}
        if r.peers:
            out[word] = [peer(x) for x in r.peers]
        if r.ports:
            out["ports"] = [{"protocol": x.protocol, **({"port": x.port} if x.port is not None else {})}
                            for x in r.ports]
        return out

    out: dict[str, Any] = {"name": pol.name, "pod_selector": dict(pol.pod_selector)}
    if pol.policy_types is not None:
        out["policy_types"] = list(pol.policy_types)
    if pol.ingress:
        out["ingress"] = [rule(r, "from") for r in pol.ingress]
    if pol.egress:
        out["egress"] = [rule(r, "to") for r in pol.egress]
    for f_ in ("count", "rules", "peer_cidr"):
        if getattr(pol, f_) is not None:
            out[f_] = getattr(pol, f_)
    return out
