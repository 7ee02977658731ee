"""The lab spec: one declarative, validated description of a lab. It never touches the kernel.

A spec names a lab, a backend that realises it (``netns``, ``vagrant``), the cloud VPC that node NICs
and ENIs live on, the pod CIDR, the nodes (each with ENIs and pods, every pod with a network mode and
labels), the Services (explicit ones with selectors, and bulk-generated ones for scale) and the Service
datapath. The same model loads from YAML (:func:`load_spec`) or is built from Python objects
(:class:`Spec`, :class:`Node`, :class:`Pod`, :class:`ServiceSpec`).

Validation reports every problem at once, each with its path (``nodes[1].pods[3].mode: unknown mode
'ipvlann'; expected one of ...``): unknown fields, bad values, duplicate names, names too long for the
interface names derived from them, overlapping CIDRs and address exhaustion. A spec that validates is
buildable except for missing kernel features, which backends check before creating anything.

Interface names derived from spec names (Linux allows 15 characters):
``lx-<pod>`` (pod's veth on its node) and ``<node>-e<i>`` (a node NIC's peer in the VPC router), hence
pod and node names of at most 12 characters and at most 8 ENIs per node.
"""

from __future__ import annotations

import contextvars
import difflib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from .errors import SpecError

MODES = ("eni-exclusive", "eni-ipvlan", "eni-policy-route", "veth", "bridge", "overlay", "macvlan")
ENI_MODES = ("eni-exclusive", "eni-ipvlan", "eni-policy-route")
VPC_ADDRESSED_MODES = ("eni-exclusive", "eni-ipvlan", "eni-policy-route", "macvlan")
IPVLAN_MODES = ("l2", "l3", "l3s")
BACKENDS = ("netns", "vagrant")
DATAPATHS = ("none", "iptables-legacy", "iptables-nft", "ipvs", "nftables", "ebpf", "ebpf-tc")
PROTOCOLS = ("TCP", "UDP")
POLICY_ENGINES = ("none", "iptables", "ebpf")
POLICY_TYPES = ("Ingress", "Egress")
MAX_POLICIES = 100000
MAX_BULK_RULES = 64
DEFAULT_BULK_PEER_CIDR = "100.64.0.0/10"  # bulk policies' synthetic peers (RFC 6598): no lab address
BULK_BASE_PORT = 10000
MAX_IFNAME = 15
MAX_NAME = 12  # "lx-" + pod name, "<node>-e<i>" must fit MAX_IFNAME
MAX_ENIS = 8
MAX_SERVICES = 65536
RESERVED_NAMES = ("vpc",)
DEFAULT_SERVICE_CIDR = "10.96.0.0/12"

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_LAB_NAME = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
_LABEL_KEY = re.compile(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")

_structural = contextvars.ContextVar("_structural", default=False)


def _frozen(d: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Pod:
    """A pod: a network namespace wired to its node in one of :data:`MODES`."""

    name: str
    mode: str = "veth"
    labels: Mapping[str, str] = field(default_factory=dict)
    eni: int | None = None  # shared-ENI modes: which ENI (1-based); default the first shared one
    ipvlan_mode: str = "l2"  # eni-ipvlan only: l2, l3 or l3s

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen(self.labels))

    def matches(self, selector: Mapping[str, str]) -> bool:
        return bool(selector) and all(self.labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class Node:
    """A node: a network namespace (or VM) with a primary NIC and ``enis`` extra NICs on the VPC."""

    name: str
    enis: int = 0
    pods: tuple[Pod, ...] = ()
    memory: int = 512  # vagrant backend: MiB per VM
    cpus: int = 2  # vagrant backend

    def __post_init__(self) -> None:
        object.__setattr__(self, "pods", tuple(self.pods))


@dataclass(frozen=True)
class ServiceSpec:
    """A Service. With ``count`` it is a bulk group ``<name>-0 … <name>-<count-1>`` for scale tests,
    each with ``endpoints`` endpoints picked round-robin from the pods the selector matches."""

    name: str
    port: int = 80
    target_port: int | None = None  # default: same as port
    protocol: str = "TCP"
    selector: Mapping[str, str] = field(default_factory=dict)
    namespace: str = "default"
    cluster_ip: str | None = None
    count: int | None = None
    endpoints: int | None = None  # bulk only: endpoints per service (default 3, capped by pods)

    def __post_init__(self) -> None:
        object.__setattr__(self, "selector", _frozen(self.selector))
        if self.target_port is None:
            object.__setattr__(self, "target_port", self.port)

    @property
    def bulk(self) -> bool:
        return self.count is not None


@dataclass(frozen=True)
class IPBlock:
    """A NetworkPolicy ``ipBlock``: ``cidr`` minus every CIDR of ``except`` (``except_`` here)."""

    cidr: str
    except_: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "except_", tuple(self.except_))


@dataclass(frozen=True)
class PolicyPeer:
    """One entry of a rule's ``from``/``to``: pods by labels (``{}`` = every pod) or an ipBlock."""

    pod_selector: Mapping[str, str] | None = None
    ip_block: IPBlock | None = None

    def __post_init__(self) -> None:
        if self.pod_selector is not None:
            object.__setattr__(self, "pod_selector", _frozen(self.pod_selector))


@dataclass(frozen=True)
class PolicyPort:
    """One entry of a rule's ``ports``: a protocol and a port (``None``: every port of it)."""

    protocol: str = "TCP"
    port: int | None = None


@dataclass(frozen=True)
class PolicyRule:
    """An ingress rule (``from`` in YAML) or egress rule (``to``): traffic from/to any of ``peers``
    on any of ``ports``. No peers: every peer; no ports: every port and protocol."""

    peers: tuple[PolicyPeer, ...] = ()
    ports: tuple[PolicyPort, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "peers", tuple(self.peers))
        object.__setattr__(self, "ports", tuple(self.ports))


@dataclass(frozen=True)
class PolicySpec:
    """A NetworkPolicy (one namespace: the lab's). ``pod_selector`` picks the pods it isolates
    (``{}``: all); ``policy_types`` defaults to Ingress, plus Egress when egress rules are given.
    With ``count`` it is a bulk group ``<name>-0 … <name>-<count-1>`` for scale tests, each with
    ``rules`` generated rules (see :func:`labkit.policy.model.expand`)."""

    name: str
    pod_selector: Mapping[str, str] = field(default_factory=dict)
    policy_types: tuple[str, ...] | None = None
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()
    count: int | None = None
    rules: int | None = None  # bulk only: generated rules per policy (default 1)
    peer_cidr: str | None = None  # bulk only: where generated peers come from (default 100.64.0.0/10)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pod_selector", _frozen(self.pod_selector))
        object.__setattr__(self, "ingress", tuple(self.ingress))
        object.__setattr__(self, "egress", tuple(self.egress))
        if self.policy_types is not None:
            object.__setattr__(self, "policy_types", tuple(self.policy_types))

    @property
    def bulk(self) -> bool:
        return self.count is not None

    @property
    def types(self) -> tuple[str, ...]:
        """Kubernetes' default when ``policy_types`` is not given."""
        if self.policy_types is not None:
            return self.policy_types
        return ("Ingress", "Egress") if self.egress else ("Ingress",)

    def selects(self, pod: Pod) -> bool:
        """Whether this policy applies to ``pod`` (an empty selector selects every pod)."""
        return self.selects_labels(pod.labels)

    def selects_labels(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.pod_selector.items())


@dataclass(frozen=True)
class Spec:
    """A whole lab. Construction validates; an invalid spec raises :class:`SpecError`."""

    name: str
    nodes: tuple[Node, ...]
    backend: str = "netns"
    vpc_cidr: str = "10.10.0.0/16"
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = DEFAULT_SERVICE_CIDR
    node_pod_prefix: int = 24
    services: tuple[ServiceSpec, ...] = ()
    datapath: str = "iptables-nft"
    policies: tuple[PolicySpec, ...] = ()
    policy_engine: str = "iptables"  # how policies are enforced: iptables, ebpf, none (not enforced)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "services", tuple(self.services))
        object.__setattr__(self, "policies", tuple(self.policies))
        if not _structural.get():
            problems = semantic_problems(self)
            if problems:
                raise SpecError(problems)

    # ------------------------------------------------------------ views
    @property
    def prefix(self) -> str:
        """Prefix of every kernel object this lab creates."""
        return lab_prefix(self.name)

    def pods(self) -> list[tuple[Node, Pod]]:
        return [(n, p) for n in self.nodes for p in n.pods]

    def pod(self, name: str) -> tuple[Node, Pod]:
        for n, p in self.pods():
            if p.name == name:
                return n, p
        known = ", ".join(p.name for _, p in self.pods())
        raise KeyError(f"no pod {name!r} in lab {self.name!r}; pods: {known}")

    def modes(self) -> set[str]:
        return {p.mode for _, p in self.pods()}

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any) -> Spec:
        return parse_spec(data)


def lab_prefix(name: str) -> str:
    return f"lk-{name}"


# ================================================================ loading

def load_spec(source: str | Path | Mapping[str, Any]) -> Spec:
    """Load a spec from a YAML file path, a YAML string, or a mapping; validate it."""
    if isinstance(source, Mapping):
        return parse_spec(source)
    text = None
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        if not path.exists():
            raise SpecError([("", f"spec file {path} does not exist")])
        text = path.read_text()
    else:
        text = str(source)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([("", f"not valid YAML: {exc}")]) from None
    return parse_spec(data)


class _Problems(list):
    def add(self, path: str, msg: str) -> None:
        self.append((path, msg))


def _unknown(p: _Problems, path: str, data: Mapping, cls: type) -> None:
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f"; known fields: {', '.join(known)}"
            p.add(f"{path}.{key}".lstrip("."), f"unknown field{hint}")


def _typed(p: _Problems, path: str, value: Any, kind: type | tuple, what: str) -> Any:
    if isinstance(value, bool) and kind is int or not isinstance(value, kind):
        p.add(path, f"expected {what}, got {type(value).__name__} {value!r}")
        return None
    return value


def _labels(p: _Problems, path: str, value: Any) -> dict[str, str]:
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


def _build(p: _Problems, path: str, data: Any, cls: type, conv: dict[str, Any]) -> Any:
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


def parse_spec(data: Any) -> Spec:
    """Structural parse (types, unknown fields) plus semantic validation; one error with all problems."""
    p = _Problems()
    token = _structural.set(True)
    try:
        spec = _parse(p, data)
    finally:
        _structural.reset(token)
    if spec is not None:
        p.extend(semantic_problems(spec))
    if p:
        raise SpecError(p)
    assert spec is not None
    return spec


def _parse(p: _Problems, data: Any) -> Spec | None:
    def s(path: str, v: Any) -> Any:
        return _typed(p, path, v, str, "a string")

    def i(path: str, v: Any) -> Any:
        return _typed(p, path, v, int, "an integer")

    def pod(path: str, v: Any) -> Any:
        return _build(p, path, v, Pod, {"name": s, "mode": s, "labels": lambda q, x: _labels(p, q, x),
                                        "eni": i, "ipvlan_mode": s})

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
        "name": s, "backend": s, "vpc_cidr": s, "pod_cidr": s, "service_cidr": s, "node_pod_prefix": i,
        "datapath": s, "nodes": lambda q, x: items(q, x, node), "services": lambda q, x: items(q, x, svc),
        "policies": lambda q, x: items(q, x, policy), "policy_engine": s})


def _parse_policy(p: _Problems, path: str, data: Any, s, i, items) -> PolicySpec | None:
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


# ================================================================ semantic validation

def _choice(p: _Problems, path: str, value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        near = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        p.add(path, f"unknown {what} {value!r}{hint}; expected one of {', '.join(choices)}")


def _network(p: _Problems, path: str, value: str) -> ipaddress.IPv4Network | None:
    try:
        return ipaddress.IPv4Network(value)
    except ValueError as exc:
        try:
            fixed = ipaddress.IPv4Network(value, strict=False)
            p.add(path, f"{value} has host bits set; did you mean {fixed}?")
        except ValueError:
            p.add(path, f"not an IPv4 CIDR ({exc})")
        return None


def _name(p: _Problems, path: str, value: str, what: str) -> None:
    if not _DNS_LABEL.match(value):
        p.add(path, f"{what} name {value!r} must be lower-case letters, digits and '-', starting and ending alphanumeric")
    elif len(value) > MAX_NAME:
        p.add(path, f"{what} name {value!r} is {len(value)} characters; at most {MAX_NAME} fit in the interface "
                    f"names derived from it (Linux allows {MAX_IFNAME}); shorten it")


def semantic_problems(spec: Spec) -> list[tuple[str, str]]:
    """Every semantic problem of a structurally sound spec, each as (path, message)."""
    from . import addressing  # addressing imports this module

    p = _Problems()
    if not _LAB_NAME.match(spec.name or ""):
        p.add("name", f"lab name {spec.name!r} must start with a letter and use at most 20 lower-case letters, "
                      "digits and '-'")
    _choice(p, "backend", spec.backend, BACKENDS, "backend")
    _choice(p, "datapath", spec.datapath, DATAPATHS, "datapath")
    nets = {k: _network(p, k, getattr(spec, k)) for k in ("vpc_cidr", "pod_cidr", "service_cidr")}
    names = list(nets)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            na, nb = nets[names[a]], nets[names[b]]
            if na and nb and na.overlaps(nb):
                p.add(names[b], f"{nb} overlaps {names[a]} {na}; the VPC, pod and service CIDRs must be disjoint")
    pod_net = nets["pod_cidr"]
    if pod_net and not (pod_net.prefixlen <= spec.node_pod_prefix <= 30):
        p.add("node_pod_prefix", f"/{spec.node_pod_prefix} must lie between the pod CIDR's /{pod_net.prefixlen} and /30")
    if not spec.nodes:
        p.add("nodes", "a lab needs at least one node")
    seen: dict[str, str] = {}

    def unique(path: str, name: str, what: str) -> None:
        if name in RESERVED_NAMES:
            p.add(path, f"{what} name {name!r} is reserved")
        elif name in seen:
            p.add(path, f"duplicate name {name!r} (already used by {seen[name]}); node and pod names share one namespace")
        else:
            seen[name] = path

    for ni, node in enumerate(spec.nodes):
        npath = f"nodes[{ni}]"
        _name(p, f"{npath}.name", node.name, "node")
        unique(f"{npath}.name", node.name, "node")
        if not 0 <= node.enis <= MAX_ENIS:
            p.add(f"{npath}.enis", f"{node.enis} ENIs; a node has 0 to {MAX_ENIS}")
        _check_pods(p, npath, node, unique)
    _check_services(p, spec, nets["service_cidr"])
    _check_policies(p, spec, [n for n in nets.values() if n])
    if not p and all(nets.values()):
        p.extend(addressing.exhaustion_problems(spec))
    return p


def _check_pods(p: _Problems, npath: str, node: Node, unique) -> None:
    exclusive = sum(1 for pod in node.pods if pod.mode == "eni-exclusive")
    shared = [k for k in range(exclusive + 1, node.enis + 1)]
    for pi, pod in enumerate(node.pods):
        path = f"{npath}.pods[{pi}]"
        _name(p, f"{path}.name", pod.name, "pod")
        unique(f"{path}.name", pod.name, "pod")
        _choice(p, f"{path}.mode", pod.mode, MODES, "mode")
        if pod.mode == "eni-ipvlan":
            _choice(p, f"{path}.ipvlan_mode", pod.ipvlan_mode, IPVLAN_MODES, "ipvlan mode")
        elif pod.ipvlan_mode != "l2":
            p.add(f"{path}.ipvlan_mode", f"only meaningful for mode eni-ipvlan, not {pod.mode}")
        if pod.mode in ENI_MODES and node.enis == 0:
            p.add(f"{path}.mode", f"mode {pod.mode} needs an ENI; set {npath}.enis to 1 or more")
        if pod.eni is not None:
            if pod.mode == "eni-exclusive":
                p.add(f"{path}.eni", "an eni-exclusive pod takes the next free ENI; remove 'eni'")
            elif pod.mode not in ("eni-ipvlan", "eni-policy-route", "macvlan"):
                p.add(f"{path}.eni", f"mode {pod.mode} does not use an ENI; remove 'eni'")
            elif pod.eni not in shared:
                p.add(f"{path}.eni", f"ENI {pod.eni} is not a shared ENI of this node; shared ENIs: "
                                     f"{shared or 'none'} (eni1..eni{exclusive} go to eni-exclusive pods)")
    needs_shared = any(pod.mode in ("eni-ipvlan", "eni-policy-route") for pod in node.pods)
    if exclusive and exclusive + (1 if needs_shared else 0) > node.enis:
        p.add(f"{npath}.enis", f"{node.enis} ENIs cannot hold {exclusive} eni-exclusive pod(s)"
                               + (" plus one shared ENI for eni-ipvlan/eni-policy-route pods" if needs_shared else "")
                               + f"; set enis to {exclusive + (1 if needs_shared else 0)}")


def _check_services(p: _Problems, spec: Spec, svc_net: ipaddress.IPv4Network | None) -> None:
    seen: dict[tuple[str, str], str] = {}
    ips: dict[str, str] = {}
    pods = [pod for _, pod in spec.pods()]
    total = 0
    for si, svc in enumerate(spec.services):
        path = f"services[{si}]"
        if not _DNS_LABEL.match(svc.name) or len(svc.name) > 50:
            p.add(f"{path}.name", f"service name {svc.name!r} must be a DNS label of at most 50 characters")
        if not _DNS_LABEL.match(svc.namespace):
            p.add(f"{path}.namespace", f"namespace {svc.namespace!r} must be a DNS label")
        key = (svc.namespace, svc.name)
        if key in seen:
            p.add(f"{path}.name", f"duplicate service {svc.namespace}/{svc.name} (also {seen[key]})")
        seen[key] = path
        for f_ in ("port", "target_port"):
            v = getattr(svc, f_)
            if not 1 <= v <= 65535:
                p.add(f"{path}.{f_}", f"port {v} outside 1..65535")
        _choice(p, f"{path}.protocol", svc.protocol, PROTOCOLS, "protocol")
        if svc.bulk:
            if not 1 <= svc.count <= MAX_SERVICES:
                p.add(f"{path}.count", f"count {svc.count} outside 1..{MAX_SERVICES}")
            if svc.cluster_ip is not None:
                p.add(f"{path}.cluster_ip", "a bulk group gets ClusterIPs allocated; remove cluster_ip")
            matched = sum(1 for pod in pods if pod.matches(svc.selector))
            want = 3 if svc.endpoints is None else svc.endpoints
            if want < 0:
                p.add(f"{path}.endpoints", f"endpoints {want} must be 0 or more")
            elif svc.endpoints is not None and want > matched:
                p.add(f"{path}.endpoints", f"{want} endpoints per service but the selector matches {matched} pod(s)")
            total += max(svc.count, 0)
        else:
            if svc.endpoints is not None:
                p.add(f"{path}.endpoints", "only bulk groups (with 'count') take 'endpoints'; explicit services "
                                           "get every pod their selector matches")
            total += 1
        if svc.cluster_ip is not None:
            try:
                ip = ipaddress.IPv4Address(svc.cluster_ip)
            except ValueError:
                p.add(f"{path}.cluster_ip", f"{svc.cluster_ip!r} is not an IPv4 address")
                continue
            if svc_net and ip not in svc_net:
                p.add(f"{path}.cluster_ip", f"{ip} is outside service_cidr {svc_net}")
            if svc.cluster_ip in ips:
                p.add(f"{path}.cluster_ip", f"{ip} is already the ClusterIP of {ips[svc.cluster_ip]}")
            ips[svc.cluster_ip] = path
    if svc_net and total > svc_net.num_addresses - 2:
        p.add("service_cidr", f"{svc_net} holds {svc_net.num_addresses - 2} ClusterIPs but the spec has "
                              f"{total} services; use a larger service_cidr")


def _check_policies(p: _Problems, spec: Spec, lab_nets: list[ipaddress.IPv4Network]) -> None:
    _choice(p, "policy_engine", spec.policy_engine, POLICY_ENGINES, "policy engine")
    if spec.policies and spec.backend != "netns":
        p.add("policies", f"network policies are enforced on the netns backend only, not {spec.backend}")
    seen: dict[str, str] = {}
    total = 0
    for k, pol in enumerate(spec.policies):
        path = f"policies[{k}]"
        if not _DNS_LABEL.match(pol.name) or len(pol.name) > 50:
            p.add(f"{path}.name", f"policy name {pol.name!r} must be a DNS label of at most 50 characters")
        if pol.name in seen:
            p.add(f"{path}.name", f"duplicate policy {pol.name!r} (also {seen[pol.name]})")
        seen[pol.name] = path
        types = pol.types
        for t, name in enumerate(types):
            _choice(p, f"{path}.policy_types[{t}]", name, POLICY_TYPES, "policy type")
        if pol.policy_types is not None and (not types or len(set(types)) != len(types)):
            p.add(f"{path}.policy_types", "list Ingress and/or Egress, each once")
        for word, rules in (("Ingress", pol.ingress), ("Egress", pol.egress)):
            if rules and word not in types:
                p.add(f"{path}.{word.lower()}", f"{word.lower()} rules are given but policy_types lacks {word}")
            for r, rule in enumerate(rules):
                _check_rule(p, f"{path}.{word.lower()}[{r}]", rule, "from" if word == "Ingress" else "to")
        total += _check_bulk_policy(p, path, pol, lab_nets)
    if total > MAX_POLICIES:
        p.add("policies", f"{total} policies in all; at most {MAX_POLICIES}")


def _check_rule(p: _Problems, path: str, rule: PolicyRule, word: str) -> None:
    for k, peer in enumerate(rule.peers):
        if peer.ip_block is None:
            continue
        q = f"{path}.{word}[{k}].ip_block"
        net = _network(p, f"{q}.cidr", peer.ip_block.cidr)
        for e, exc in enumerate(peer.ip_block.except_):
            sub = _network(p, f"{q}.except[{e}]", exc)
            if net and sub and not (sub.subnet_of(net) and sub.prefixlen > net.prefixlen):
                p.add(f"{q}.except[{e}]", f"{sub} is not a strict subnet of cidr {net}")
    for k, port in enumerate(rule.ports):
        _choice(p, f"{path}.ports[{k}].protocol", port.protocol, PROTOCOLS, "protocol")
        if port.port is not None and not 1 <= port.port <= 65535:
            p.add(f"{path}.ports[{k}].port", f"port {port.port} outside 1..65535")


def _check_bulk_policy(p: _Problems, path: str, pol: PolicySpec, lab_nets: list[ipaddress.IPv4Network]) -> int:
    """Problems of a bulk group's fields; the number of policies it stands for."""
    if not pol.bulk:
        for f_ in ("rules", "peer_cidr"):
            if getattr(pol, f_) is not None:
                p.add(f"{path}.{f_}", "only bulk groups (with 'count') take '{f_}'".replace("{f_}", f_))
        return 1
    if not 1 <= pol.count <= MAX_POLICIES:
        p.add(f"{path}.count", f"count {pol.count} outside 1..{MAX_POLICIES}")
        return 0
    if pol.ingress or pol.egress:
        p.add(path, "a bulk group generates its rules; give 'rules' (rules per policy), not ingress/egress")
    rules = 1 if pol.rules is None else pol.rules
    if not 1 <= rules <= MAX_BULK_RULES:
        p.add(f"{path}.rules", f"{rules} rules per policy; 1 to {MAX_BULK_RULES}")
    net = _network(p, f"{path}.peer_cidr", pol.peer_cidr or DEFAULT_BULK_PEER_CIDR)
    if net is not None:
        for other in lab_nets:
            if net.overlaps(other):
                p.add(f"{path}.peer_cidr", f"{net} overlaps the lab's {other}; generated peers must be "
                                           "addresses no pod has")
        if net.num_addresses < pol.count * rules:
            p.add(f"{path}.peer_cidr", f"{net} holds {net.num_addresses} peers; {pol.count} policies × {rules} "
                                       f"rules need {pol.count * rules}")
    return pol.count


# ================================================================ output

def _to_plain(obj: Any) -> Any:
    """Plain data for YAML/JSON, leaving out fields that hold their default."""
    if isinstance(obj, PolicySpec):  # rules in their YAML form (from/to, except), as parse_spec reads them
        return _policy_plain(obj)
    if is_dataclass(obj):
        out = {}
        for f_ in fields(obj):
            value = _to_plain(getattr(obj, f_.name))
            if f_.default is not MISSING:
                default = _to_plain(f_.default)
            elif f_.default_factory is not MISSING:
                default = _to_plain(f_.default_factory())
            else:
                default = MISSING
            if value != default:
                out[f_.name] = value
        return out
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
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
