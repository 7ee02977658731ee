"""Validating a spec: every problem at once, each with its path and the fix.

``nodes[1].pods[3].mode: unknown mode 'ipvlann' (did you mean 'eni-ipvlan'?); expected one of …``.
Checked: names (DNS labels, short enough for the interface names derived from them, unique), CIDRs
(valid, no host bits, disjoint), every pod against its mode (:mod:`labkit.modes`: its options, its
ENI rules), Services, NetworkPolicies, address exhaustion. The names a spec may use for backends,
datapaths, policy engines and modes are those their registries hold: one source of truth. A spec that
validates is buildable except for missing kernel features, which backends check before creating
anything.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from pathlib import Path

from .. import naming
from ..errors import SpecError
from .types import (DEFAULT_BULK_PEER_CIDR, MAX_BULK_RULES, MAX_ENIS, MAX_IFNAME, MAX_NAME, MAX_POLICIES,
                    MAX_SERVICES, POLICY_TYPES, PROTOCOLS, RESERVED_NAMES, Node, PolicyRule, PolicySpec, Spec)

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
POD_OPTIONS = {"ipvlan_mode": "l2"}  # Pod fields that only some modes take (PodMode.options), with defaults


class Problems(list):
    """(path, message) pairs, collected rather than raised one by one."""

    def add(self, path: str, msg: str) -> None:
        self.append((path, msg))


def validate(spec: Spec) -> Spec:
    """``spec`` itself if it is valid; :class:`~labkit.errors.SpecError` with every problem if not."""
    found = problems(spec)
    if found:
        raise SpecError(found)
    return spec


def _choice(p: Problems, path: str, value: str, choices, what: str) -> None:
    choices = list(choices)
    if value not in choices:
        near = difflib.get_close_matches(value, choices, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        p.add(path, f"unknown {what} {value!r}{hint}; expected one of {', '.join(choices)}")


def _network(p: Problems, path: str, value: str) -> ipaddress.IPv4Network | None:
    try:
        return ipaddress.IPv4Network(value)
    except ValueError as exc:
        try:
            fixed = ipaddress.IPv4Network(value, strict=False)
            p.add(path, f"{value} has host bits set; did you mean {fixed}?")
        except ValueError:
            p.add(path, f"not an IPv4 CIDR ({exc})")
        return None


def _name(p: Problems, path: str, value: str, what: str) -> None:
    if not _DNS_LABEL.match(value):
        p.add(path, f"{what} name {value!r} must be lower-case letters, digits and '-', starting and ending alphanumeric")
    elif len(value) > MAX_NAME:
        p.add(path, f"{what} name {value!r} is {len(value)} characters; at most {MAX_NAME} fit in the interface "
                    f"names derived from it (Linux allows {MAX_IFNAME}); shorten it")


def problems(spec: Spec) -> list[tuple[str, str]]:
    """Every problem of a structurally sound spec, each as (path, message)."""
    from .. import addressing
    from ..backends import BACKENDS
    from ..datapath import DATAPATHS

    p = Problems()
    problem = naming.lab_name_problem(spec.name)
    if problem:
        p.add("name", problem)
    _choice(p, "backend", spec.backend, BACKENDS.names(), "backend")
    _check_release(p, spec)
    _check_inventory(p, spec)
    _choice(p, "datapath", spec.datapath, DATAPATHS.names(), "datapath")
    if spec.datapath in DATAPATHS:
        _check_kube_proxy(p, spec, DATAPATHS.get(spec.datapath))
    _check_host_routing(p, spec)
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
    _check_servers(p, spec)
    _check_services(p, spec, nets["service_cidr"])
    _check_policies(p, spec, [n for n in nets.values() if n])
    if not p and all(nets.values()):
        p.extend(addressing.exhaustion_problems(spec))
    return p


def _check_pods(p: Problems, npath: str, node: Node, unique) -> None:
    """Each pod against its mode (:mod:`labkit.modes`): its options and the node's ENIs."""
    from .. import modes

    known = {pod.name: modes.get(pod.mode) for pod in node.pods if pod.mode in modes.MODES}
    exclusive = [m for m in known.values() if m.nic == "exclusive"]
    shared = [k for k in range(len(exclusive) + 1, node.enis + 1)]
    for pi, pod in enumerate(node.pods):
        path = f"{npath}.pods[{pi}]"
        _name(p, f"{path}.name", pod.name, "pod")
        unique(f"{path}.name", pod.name, "pod")
        mode = known.get(pod.name)
        if mode is None:
            _choice(p, f"{path}.mode", pod.mode, modes.names(), "mode")
            continue
        for option, default in POD_OPTIONS.items():
            value = getattr(pod, option)
            if option in mode.options:
                _choice(p, f"{path}.{option}", value, mode.options[option], option.replace("_", " "))
            elif value != default:
                takers = [m.name for m in modes.MODES if option in m.options]
                p.add(f"{path}.{option}", f"only meaningful for mode {' or '.join(takers)}, not {pod.mode}")
        if mode.nic in ("exclusive", "shared") and node.enis == 0:
            p.add(f"{path}.mode", f"mode {pod.mode} needs an ENI; set {npath}.enis to 1 or more")
        if pod.eni is not None:
            if mode.nic == "exclusive":
                p.add(f"{path}.eni", f"a {pod.mode} pod takes the next free ENI; remove 'eni'")
            elif mode.nic is None:
                p.add(f"{path}.eni", f"mode {pod.mode} does not use an ENI; remove 'eni'")
            elif pod.eni not in shared:
                p.add(f"{path}.eni", f"ENI {pod.eni} is not a shared ENI of this node; shared ENIs: "
                                     f"{shared or 'none'} (eni1..eni{len(exclusive)} go to pods with an ENI of their "
                                     "own)")
    sharing = sorted({m.name for m in known.values() if m.nic == "shared"})
    need = len(exclusive) + (1 if sharing else 0)
    if exclusive and need > node.enis:
        p.add(f"{npath}.enis", f"{node.enis} ENIs cannot hold {len(exclusive)} {exclusive[0].name} pod(s)"
                               + (f" plus one shared ENI for {'/'.join(sharing)} pods" if sharing else "")
                               + f"; set enis to {need}")
    elif len(known) == len(node.pods) and not p:
        _check_slaves(p, npath, node, known)


def _check_slaves(p: Problems, npath: str, node: Node, known: dict) -> None:
    """Linux allows one kind of slave device per parent: an ENI holding an IPVLAN pod cannot hold a
    macvlan pod (the kernel answers EBUSY when the lab is built)."""
    from ..addressing import default_nic

    on_nic: dict[int, dict[str, str]] = {}  # NIC -> slave kind -> first pod of that kind
    for pi, pod in enumerate(node.pods):
        kind = known[pod.name].slave_kind
        if kind is None:
            continue
        nic = default_nic(node, pod)
        kinds = on_nic.setdefault(nic, {})
        other = next(((k, name) for k, name in kinds.items() if k != kind), None)
        if other is not None:
            where = "eth0" if nic == 0 else f"ENI {nic}"
            p.add(f"{npath}.pods[{pi}].eni", f"pods {other[1]} ({other[0]}) and {pod.name} ({kind}) are both on {where}, "
                                            "and Linux refuses ipvlan and macvlan slaves on one parent; give "
                                            f"{pod.name} a shared ENI of its own with 'eni' (raise {npath}.enis if "
                                            "needed)")
        kinds.setdefault(kind, pod.name)


def _check_release(p: Problems, spec: Spec) -> None:
    """``release`` picks the Debian release of the vagrant backend's VMs (their box, hence their
    kernel); a lab on another backend runs on this host's kernel, where it means nothing."""
    if spec.release is None:
        return
    if spec.backend != "vagrant":
        p.add("release", f"release {spec.release!r} picks the Debian release of backend vagrant's VMs; backend "
                         f"{spec.backend} runs on this host's kernel: remove release (or use backend: vagrant)")
        return
    from ..backends.vagrant.box import RELEASES

    _choice(p, "release", spec.release, RELEASES, "Debian release")


SSH_TARGET = re.compile(r"^(?:(?P<user>[a-z_][a-z0-9_.-]{0,31})@)?(?P<host>[A-Za-z0-9][A-Za-z0-9.-]{0,252}"
                        r"|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?$")
HOST_IFNAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
MAC = re.compile(r"^[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}$")


def _check_inventory(p: Problems, spec: Spec) -> None:
    """Backend ``hosts`` needs a host per node, reached as ``[user@]address[:port]``, with a management
    interface and a real interface for every lab NIC the node has (``eth0``, ``eni1``…); none of
    them may be the management interface. Checked here, before any host is contacted."""
    inv = spec.inventory
    if spec.backend != "hosts":
        if inv is not None:
            p.add("inventory", f"inventory names the machines of backend hosts; backend {spec.backend} makes its "
                               "own: remove inventory (or use backend: hosts)")
        return
    if inv is None:
        p.add("inventory", "backend hosts needs an inventory: per node, its ssh target, its management interface "
                           "and the interfaces that play its NICs (see README, 'Run it on your own machines')")
        return
    names = [n.name for n in spec.nodes]
    for extra in sorted(set(inv.hosts) - set(names)):
        near = difflib.get_close_matches(extra, names, n=1)
        p.add(f"inventory.hosts.{extra}", f"no node {extra!r} in the spec" + (f"; did you mean {near[0]!r}?" if near
                                                                            else f"; nodes: {', '.join(names)}"))
    if inv.ssh_config is not None and not Path(inv.ssh_config).expanduser().is_file():
        p.add("inventory.ssh_config", f"ssh config file {inv.ssh_config} does not exist")
    targets: dict[str, str] = {}
    for node in spec.nodes:
        q = f"inventory.hosts.{node.name}"
        host = inv.hosts.get(node.name)
        if host is None:
            p.add("inventory.hosts", f"node {node.name} has no host: add {node.name}: {{ssh: root@ADDRESS, "
                                     "management: IFACE, nics: {eth0: IFACE}}")
            continue
        m = SSH_TARGET.match(host.ssh)
        if not m:
            p.add(f"{q}.ssh", f"{host.ssh!r} is not [user@]address[:port] (letters, digits, '.', '-'; an IPv6 "
                              "address in brackets)")
        elif m["port"] and not 0 < int(m["port"]) < 65536:
            p.add(f"{q}.ssh", f"port {m['port']} is not between 1 and 65535")
        elif m["user"] and m["user"] != "root":
            p.add(f"{q}.ssh", f"labkit logs in as root (it builds the node as root), not {m['user']}: use "
                              f"root@{m['host']} with a key (PermitRootLogin prohibit-password)")
        elif m["host"] in targets:
            p.add(f"{q}.ssh", f"{m['host']} is node {targets[m['host']]}'s host too; one node per host")
        else:
            targets[m["host"]] = node.name
        if host.key is not None and not Path(host.key).expanduser().is_file():
            p.add(f"{q}.key", f"key file {host.key} does not exist")
        if not HOST_IFNAME.match(host.management):
            p.add(f"{q}.management", f"{host.management!r} is not an interface name")
        wanted = ["eth0"] + [f"eni{k}" for k in range(1, node.enis + 1)]
        for lab_nic in wanted:
            if lab_nic not in host.nics:
                p.add(f"{q}.nics", f"node {node.name} has NIC {lab_nic}: name the host interface that plays it "
                                   f"({lab_nic}: IFACE or MAC)")
        seen: dict[str, str] = {}
        for lab_nic, real in host.nics.items():
            if lab_nic not in wanted:
                p.add(f"{q}.nics.{lab_nic}", f"node {node.name} has no NIC {lab_nic} (it has {', '.join(wanted)}"
                                             f"; enis: {node.enis})")
            elif not (HOST_IFNAME.match(real) or MAC.match(real)):
                p.add(f"{q}.nics.{lab_nic}", f"{real!r} is neither an interface name nor a MAC (aa:bb:cc:dd:ee:ff)")
            elif real == host.management:
                p.add(f"{q}.nics.{lab_nic}", f"{real} is the management interface, which labkit never touches; "
                                             "give the lab a NIC of its own (a secondary NIC or ENI)")
            elif real.lower() in seen:
                p.add(f"{q}.nics.{lab_nic}", f"{real} plays {seen[real.lower()]} already")
            else:
                seen[real.lower()] = lab_nic


def _check_kube_proxy(p: Problems, spec: Spec, datapath) -> None:
    """``kube_proxy`` chooses the iptables datapaths' rule shape; elsewhere only the default fits."""
    takes = datapath.options.get("kube_proxy")
    if takes is not None:
        _choice(p, "kube_proxy", spec.kube_proxy, takes, "kube-proxy version")
    elif spec.kube_proxy != "current":
        from ..datapath import DATAPATHS

        which = [n for n, cls in DATAPATHS.items() if "kube_proxy" in cls.options]
        p.add("kube_proxy", f"kube_proxy {spec.kube_proxy!r} shapes the rules of {', '.join(which)}; datapath "
                            f"{spec.datapath} has no such choice: remove kube_proxy or pick one of those datapaths")


def _check_host_routing(p: Problems, spec: Spec) -> None:
    """eBPF host routing forwards past the nodes' routing and netfilter: whatever works there (a
    kube-proxy datapath, the iptables policy engine) would be bypassed, so it is refused, as Cilium
    requires its kube-proxy replacement for it."""
    from ..hostrouting import DATAPATHS as SERVES, POLICY_ENGINES

    _choice(p, "host_routing", spec.host_routing, ("kernel", "bpf"), "host routing")
    if spec.host_routing != "bpf":
        return
    if spec.datapath not in SERVES:
        p.add("host_routing", f"bpf host routing bypasses the nodes' netfilter, where datapath {spec.datapath} "
                              f"works; use datapath ebpf or ebpf-tc (as Cilium needs its kube-proxy replacement), or "
                              "host_routing: kernel")
    if spec.policies and spec.policy_engine not in POLICY_ENGINES:
        p.add("host_routing", f"bpf host routing bypasses the nodes' netfilter, where policy engine "
                              f"{spec.policy_engine} enforces; use policy_engine: ebpf, or host_routing: kernel")


def _check_servers(p: Problems, spec: Spec) -> None:
    from ..workloads import server_problems

    p.extend(server_problems("server", spec.server))
    for ni, node in enumerate(spec.nodes):
        for pi, pod in enumerate(node.pods):
            if pod.server is not None:
                p.extend(server_problems(f"nodes[{ni}].pods[{pi}].server", pod.server))


def _check_services(p: Problems, spec: Spec, svc_net: ipaddress.IPv4Network | None) -> None:
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


def _check_policies(p: Problems, spec: Spec, lab_nets: list[ipaddress.IPv4Network]) -> None:
    from ..policy import ENGINES

    _choice(p, "policy_engine", spec.policy_engine, ["none", *ENGINES.names()], "policy engine")
    if spec.policies and spec.backend not in ("netns", "vagrant", "hosts"):
        p.add("policies", f"network policies are enforced on the netns and vagrant backends, not {spec.backend}")
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


def _check_rule(p: Problems, path: str, rule: PolicyRule, word: str) -> None:
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


def _check_bulk_policy(p: Problems, path: str, pol: PolicySpec, lab_nets: list[ipaddress.IPv4Network]) -> int:
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
