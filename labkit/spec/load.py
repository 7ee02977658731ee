"""Loading a spec: YAML text, a YAML file or a mapping into :mod:`labkit.spec.types`.

Structural problems (wrong types, unknown fields with a "did you mean", missing required fields) are
collected with their paths; then the spec is validated (:mod:`labkit.spec.validate`) and every
problem of both kinds is raised at once in one :class:`~labkit.errors.SpecError`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import SpecError
from .validate import Problems
from .types import (HostEntry, Inventory, IPBlock, Node, Pod, PolicyPeer, PolicyPort, PolicyRule, PolicySpec,
                    ServerSpec, ServiceSpec, Spec)

_LABEL_KEY = re.compile(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


def load_spec(source: str | Path | Mapping[str, Any], validate: bool = True) -> Spec:
    """Load a spec from a YAML file path, a YAML string, or a mapping; validate it (``validate=False``
    only for a spec labkit wrote itself after validating it, such as a lab's saved spec)."""
    if isinstance(source, Mapping):
        return parse_spec(source, validate)
    data = read_spec_data(source)
    if isinstance(data, Mapping) and isinstance(data.get("inventory"), str) and _is_path(source):
        # an inventory file named by the spec is found beside the spec
        data = {**data, "inventory": str(Path(source).resolve().parent / Path(data["inventory"]).expanduser())}
    return parse_spec(data, validate)


def _is_path(source: str | Path) -> bool:
    return isinstance(source, Path) or ("\n" not in source and source.endswith((".yaml", ".yml")))


def read_spec_data(source: str | Path) -> Any:
    """The YAML of a spec file path or text, as plain data (not yet a spec: :func:`parse_spec` checks it)."""
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        if not path.exists():
            raise SpecError([("", f"spec file {path} does not exist")])
        text = path.read_text()
    else:
        text = str(source)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([("", f"not valid YAML: {exc}")]) from None


def _unknown(p: Problems, path: str, data: Mapping, cls: type) -> None:
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; known fields: {', '.join(known)}"
            p.add(f"{path}.{key}".lstrip("."), f"unknown field{hint}")


def _typed(p: Problems, path: str, value: Any, kind: type | tuple, what: str) -> Any:
    if isinstance(value, bool) and kind is int or not isinstance(value, kind):
        p.add(path, f"expected {what}, got {type(value).__name__} {value!r}")
        return None
    return value


def _labels(p: Problems, path: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        p.add(path, f"expected a mapping of label key to value, got {value!r}")
        return {}
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _LABEL_KEY.match(k):
            p.add(f"{path}.{k}", "invalid label key (letters, digits, '-', '_', '.', optional 'prefix/')")
        elif not isinstance(v, (str, int, float)) or isinstance(v, bool):
            p.add(f"{path}.{k}", f"label value must be a string, got {v!r}")
        else:
            out[k] = str(v)
    return out


def _build(p: Problems, path: str, data: Any, cls: type, conv: dict[str, Any]) -> Any:
    """Check ``data`` is a mapping with known fields, convert each with ``conv``; build ``cls``."""
    if not isinstance(data, Mapping):
        p.add(path, f"expected a mapping, got {data!r}")
        return None
    _unknown(p, path, data, cls)
    kwargs = {}
    for key, value in data.items():
        if key not in conv:
            continue
        out = conv[key](f"{path}.{key}".lstrip("."), value)
        if out is not None:
            kwargs[key] = out
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        missing = re.findall(r"'(\w+)'", str(exc))
        p.add(path, f"missing required field {', '.join(missing) or str(exc)}")
        return None


def parse_spec(data: Any, validate: bool = True) -> Spec:
    """Structural parse (types, unknown fields) plus validation (:func:`labkit.spec.validate.problems`);
    one error with all problems."""
    p = Problems()
    spec = _parse(p, data)
    if spec is not None and validate:
        from .validate import problems

        p.extend(problems(spec))
    if p:
        raise SpecError(p)
    assert spec is not None
    return spec


def _parse(p: Problems, data: Any) -> Spec | None:
    def s(path: str, v: Any) -> Any:
        return _typed(p, path, v, str, "a string")

    def i(path: str, v: Any) -> Any:
        return _typed(p, path, v, int, "an integer")

    def server(path: str, v: Any) -> Any:
        return _parse_server(p, path, v)

    def pod(path: str, v: Any) -> Any:
        return _build(p, path, v, Pod, {"name": s, "mode": s, "labels": lambda q, x: _labels(p, q, x),
                                        "eni": i, "ipvlan_mode": s, "server": server})

    def items(path: str, v: Any, one) -> tuple | None:
        if v is None:
            return ()
        if not isinstance(v, list):
            p.add(path, f"expected a list, got {v!r}")
            return None
        return tuple(x for x in (one(f"{path}[{k}]", e) for k, e in enumerate(v)) if x is not None)

    def node(path: str, v: Any) -> Any:
        return _build(p, path, v, Node, {"name": s, "enis": i, "memory": i, "cpus": i,
                                         "pods": lambda q, x: items(q, x, pod)})

    def proto(path: str, v: Any) -> Any:
        v = s(path, v)
        return v.upper() if isinstance(v, str) else None

    def svc(path: str, v: Any) -> Any:
        return _build(p, path, v, ServiceSpec, {
            "name": s, "port": i, "target_port": i, "protocol": proto, "namespace": s,
            "selector": lambda q, x: _labels(p, q, x), "cluster_ip": s, "count": i, "endpoints": i})

    def policy(path: str, v: Any) -> Any:
        return _parse_policy(p, path, v, s, i, items)

    if not isinstance(data, Mapping):
        p.add("", "a spec is a mapping with at least 'name' and 'nodes'")
        return None
    return _build(p, "", data, Spec, {
        "name": s, "backend": s, "release": s, "vpc_cidr": s, "pod_cidr": s, "service_cidr": s, "node_pod_prefix": i,
        "datapath": s, "nodes": lambda q, x: items(q, x, node), "services": lambda q, x: items(q, x, svc),
        "policies": lambda q, x: items(q, x, policy), "policy_engine": s, "server": server,
        "kube_proxy": s, "host_routing": s, "inventory": lambda q, x: _parse_inventory(p, q, x)})


def _parse_inventory(p: Problems, path: str, data: Any) -> Inventory | None:
    """The hosts backend's inventory: a mapping, or the path of a YAML file holding one."""
    if isinstance(data, str):
        file = Path(data).expanduser()
        if not file.is_file():
            p.add(path, f"inventory file {file} does not exist (give a path relative to the spec, or the mapping)")
            return None
        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            p.add(path, f"inventory file {file} is not valid YAML: {exc}")
            return None
        data = _paths_beside(data, file.resolve().parent)

    def s(q: str, v: Any) -> Any:
        return _typed(p, q, v, str, "a string")

    def nics(q: str, v: Any) -> Any:
        if not isinstance(v, Mapping):
            p.add(q, f"expected a mapping of lab NIC (eth0, eni1…) to a host interface name or MAC, got {v!r}")
            return None
        return {str(k): str(x) for k, x in v.items()}

    def hosts(q: str, v: Any) -> Any:
        if not isinstance(v, Mapping):
            p.add(q, f"expected a mapping of node name to host, got {v!r}")
            return None
        out = {}
        for name, entry in v.items():
            host = _build(p, f"{q}.{name}", entry, HostEntry, {"ssh": s, "management": s, "nics": nics, "key": s})
            if host is not None:
                out[str(name)] = host
        return out

    return _build(p, path, data, Inventory, {"hosts": hosts, "ssh_config": s})


def _paths_beside(data: Any, folder: Path) -> Any:
    """An inventory file's relative paths (keys, its ssh config) made relative to its own folder."""
    if not isinstance(data, Mapping):
        return data

    def fix(v: Any) -> Any:
        return str(folder / Path(v).expanduser()) if isinstance(v, str) and not Path(v).expanduser().is_absolute() else v

    out = dict(data)
    if "ssh_config" in out:
        out["ssh_config"] = fix(out["ssh_config"])
    if isinstance(out.get("hosts"), Mapping):
        out["hosts"] = {k: ({**h, "key": fix(h["key"])} if isinstance(h, Mapping) and "key" in h else h)
                        for k, h in out["hosts"].items()}
    return out


def _parse_server(p: Problems, path: str, data: Any) -> ServerSpec | None:
    """``labkit``, ``none``, ``http``, ``{command: "...", port: P}`` or ``{kind: http, port: P}``."""
    if isinstance(data, str):
        return ServerSpec(kind=data)
    if not isinstance(data, Mapping):
        p.add(path, f"expected labkit, none, http or {{command: ..., port: ...}}, got {data!r}")
        return None
    for key in data:
        if key not in ("kind", "command", "port"):
            p.add(f"{path}.{key}", "unknown field; known fields: kind, command, port")
    kind = data.get("kind", "command" if "command" in data else "labkit")
    command, port = data.get("command"), data.get("port")
    ok = _typed(p, f"{path}.kind", kind, str, "a string") is not None
    ok &= command is None or _typed(p, f"{path}.command", command, str, "a command line") is not None
    ok &= port is None or _typed(p, f"{path}.port", port, int, "an integer") is not None
    return ServerSpec(kind, command, port) if ok else None


def _parse_policy(p: Problems, path: str, data: Any, s, i, items) -> PolicySpec | None:
    """A NetworkPolicy from YAML. Rules are written as Kubernetes writes them: ``from``/``to``
    lists of ``pod_selector``/``ip_block`` peers (``ip_block: {cidr, except}``) and ``ports``."""

    def types(q: str, v: Any) -> tuple | None:
        if not isinstance(v, list):
            p.add(q, f"expected a list of Ingress/Egress, got {v!r}")
            return None
        return tuple(x for k, x in enumerate(v) if s(f"{q}[{k}]", x) is not None)

    def port(q: str, v: Any) -> PolicyPort | None:
        if not isinstance(v, Mapping):
            p.add(q, f"expected a mapping with protocol and/or port, got {v!r}")
            return None
        _unknown(p, q, v, PolicyPort)
        proto = s(f"{q}.protocol", v.get("protocol", "TCP"))
        num = v.get("port")
        if num is not None and _typed(p, f"{q}.port", num, int, "an integer (named ports are not supported)") is None:
            return None
        return PolicyPort(proto.upper(), num) if proto is not None else None

    def block(q: str, v: Any) -> IPBlock | None:
        if not isinstance(v, Mapping):
            p.add(q, f"expected a mapping with cidr and except, got {v!r}")
            return None
        for key in v:
            if key not in ("cidr", "except"):
                p.add(f"{q}.{key}", "unknown field; known fields: cidr, except")
        if "cidr" not in v:
            p.add(q, "missing required field cidr")
            return None
        cidr = s(f"{q}.cidr", v["cidr"])
        exc = v.get("except") or []
        if not isinstance(exc, list):
            p.add(f"{q}.except", f"expected a list of CIDRs, got {exc!r}")
            exc = []
        exc = [e for k, e in enumerate(exc) if s(f"{q}.except[{k}]", e) is not None]
        return IPBlock(cidr, tuple(exc)) if cidr is not None else None

    def peer(q: str, v: Any) -> PolicyPeer | None:
        if not isinstance(v, Mapping):
            p.add(q, f"expected a mapping with pod_selector or ip_block, got {v!r}")
            return None
        for key in v:
            if key not in ("pod_selector", "ip_block"):
                hint = (" (one namespace per lab: namespace selectors are not supported)"
                        if key in ("namespace_selector", "namespaceSelector") else "")
                p.add(f"{q}.{key}", f"unknown field{hint}; known fields: pod_selector, ip_block")
        if ("pod_selector" in v) == ("ip_block" in v):
            p.add(q, "a peer has exactly one of pod_selector and ip_block")
            return None
        if "pod_selector" in v:
            return PolicyPeer(pod_selector=_labels(p, f"{q}.pod_selector", v["pod_selector"]))
        b = block(f"{q}.ip_block", v["ip_block"])
        return PolicyPeer(ip_block=b) if b is not None else None

    def rule(word: str):
        def one(q: str, v: Any) -> PolicyRule | None:
            if not isinstance(v, Mapping):
                p.add(q, f"expected a mapping with '{word}' and/or 'ports', got {v!r}")
                return None
            for key in v:
                if key not in (word, "ports"):
                    p.add(f"{q}.{key}", f"unknown field; known fields: {word}, ports")
            peers = items(f"{q}.{word}", v.get(word), peer)
            ports = items(f"{q}.ports", v.get("ports"), port)
            return PolicyRule(peers or (), ports or ())
        return one

    return _build(p, path, data, PolicySpec, {
        "name": s, "pod_selector": lambda q, x: _labels(p, q, x), "policy_types": types,
        "ingress": lambda q, x: items(q, x, rule("from")), "egress": lambda q, x: items(q, x, rule("to")),
        "count": i, "rules": i, "peer_cidr": s})
