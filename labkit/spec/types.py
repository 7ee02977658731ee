"""The lab spec's types: plain, frozen data, with views and no behaviour beyond them.

A spec names a lab, a backend that realises it, the cloud VPC that node NICs and ENIs live on, the
pod CIDR, the nodes (each with ENIs and pods, every pod with a network mode and labels), the Services
(explicit ones with selectors, and bulk-generated ones for scale), the Service datapath and the
NetworkPolicies. Loading is :mod:`labkit.spec.load`, validation :mod:`labkit.spec.validate` (kube-proxy's
``apis/config/types.go`` beside ``validation/validation.go``), YAML output :mod:`labkit.spec.serialize`.
Constructing these objects never validates them and never touches the kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .. import naming

PROTOCOLS = ("TCP", "UDP")
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


# a pod's server (labkit.workloads says what each one runs and how it answers)
LABKIT, NONE, COMMAND, HTTP = "labkit", "none", "command", "http"
KINDS = (LABKIT, NONE, COMMAND, HTTP)
HTTP_PORT = 80


def _frozen(d: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class ServerSpec:
    """A pod's server (:mod:`labkit.workloads`): ``labkit``, ``none``, ``command`` (with ``command``, a
    shell-free command line, and the ``port`` it serves) or ``http`` (nginx, on ``port``, default 80)."""

    kind: str = LABKIT
    command: str | None = None
    port: int | None = None

    @property
    def serves(self) -> int | None:
        """The port this server owns (labkit's own server then leaves it alone)."""
        if self.kind == HTTP:
            return self.port or HTTP_PORT
        return self.port if self.kind == COMMAND else None

    def answers(self, port: int, lkserver_ports: set[int]) -> str:
        """How a pod with this server answers on ``port``: ``"name"`` (its name to ``GET /``),
        ``"any"`` (some reply), or ``"refused"``."""
        if port == self.serves:
            return "name" if self.kind == HTTP else "any"
        return "name" if self.kind != NONE and port in lkserver_ports else "refused"

    def to_plain(self) -> str | dict:
        if self.kind in (LABKIT, NONE) or (self.kind == HTTP and self.port is None):
            return self.kind
        if self.kind == HTTP:
            return {"kind": HTTP, "port": self.port}
        return {"command": self.command, "port": self.port}


@dataclass(frozen=True)
class Pod:
    """A pod: a network namespace wired to its node in one of the pod modes (:mod:`labkit.modes`)."""

    name: str
    mode: str = "veth"
    labels: Mapping[str, str] = field(default_factory=dict)
    eni: int | None = None  # modes on a shared ENI: which ENI (1-based); default the first shared one
    ipvlan_mode: str = "l2"  # an option of the IPVLAN mode only: l2, l3 or l3s
    server: ServerSpec | None = None  # what serves in the pod; None: the lab's server

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
class HostEntry:
    """One machine of backend ``hosts``: how to reach it and which of its interfaces the lab may use.

    ``ssh`` is ``[user@]address[:port]`` (labkit logs in as root: it builds the node as the VM agent
    does); ``key`` an identity file (else ssh's agent and config); ``management`` the interface labkit
    must never touch (the one its ssh session and the default route use); ``nics`` maps each lab NIC
    the node has (``eth0``, the node's VPC primary, then ``eni1``…) to a real interface of the host,
    by name or by MAC: labkit renames it for the lab and gives it back its name at ``down``."""

    ssh: str
    management: str
    nics: Mapping[str, str] = field(default_factory=dict)
    key: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "nics", _frozen(self.nics))


@dataclass(frozen=True)
class Inventory:
    """Backend ``hosts``: the machine of each node (node name -> :class:`HostEntry`), and optionally an
    ssh config file whose settings labkit's ssh connections also use (known hosts, jump hosts)."""

    hosts: Mapping[str, HostEntry] = field(default_factory=dict)
    ssh_config: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "hosts", MappingProxyType(dict(self.hosts)))


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
    """A whole lab. Construction does not validate: :func:`labkit.spec.validate` does (``load_spec``
    and ``labkit.lab.up`` call it)."""

    name: str
    nodes: tuple[Node, ...]
    backend: str = "netns"
    release: str | None = None  # vagrant backend: the VMs' Debian release, bookworm (None: the default) or trixie
    vpc_cidr: str = "10.10.0.0/16"
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = DEFAULT_SERVICE_CIDR
    node_pod_prefix: int = 24
    services: tuple[ServiceSpec, ...] = ()
    datapath: str = "iptables-nft"
    policies: tuple[PolicySpec, ...] = ()
    policy_engine: str = "iptables"  # how policies are enforced: iptables, ebpf, none (not enforced)
    server: ServerSpec = ServerSpec()  # what serves in every pod that does not say
    kube_proxy: str = "current"  # the iptables datapaths' rule shape: current, or 1.18 (the study's time)
    host_routing: str = "kernel"  # kernel, or bpf: eBPF host routing past the nodes' stacks (Cilium 1.9+)
    inventory: Inventory | None = None  # backend hosts: the machine of each node

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "services", tuple(self.services))
        object.__setattr__(self, "policies", tuple(self.policies))

    # ------------------------------------------------------------ views
    @property
    def prefix(self) -> str:
        """Prefix of every kernel object this lab creates."""
        return naming.lab_prefix(self.name)

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

    def server_of(self, pod: Pod) -> ServerSpec:
        """What serves in ``pod``: its own server, else the lab's."""
        return pod.server or self.server

    def to_dict(self) -> dict[str, Any]:
        from .serialize import to_plain

        return to_plain(self)

    def to_yaml(self) -> str:
        from .serialize import to_yaml

        return to_yaml(self)

    @classmethod
    def from_dict(cls, data: Any) -> Spec:
        from .load import parse_spec

        return parse_spec(data)

    def replace(self, **changes: Any) -> Spec:
        """A copy with ``changes`` (not validated: call :func:`labkit.spec.validate`)."""
        return dataclasses.replace(self, **changes)
