"""Spec validation and the address plan: pure, no root."""

from __future__ import annotations

import ipaddress

import pytest
import yaml

from labkit import addressing
from labkit.errors import SpecError
from labkit.services import diff, table_from_spec
from labkit.spec import Node, Pod, ServiceSpec, Spec, load_spec, parse_spec, validate

from conftest import EXAMPLES


def problems(data) -> dict[str, str]:
    with pytest.raises(SpecError) as exc:
        parse_spec(data)
    return dict(exc.value.problems)


def base(**over):
    data = {"name": "x", "nodes": [{"name": "n1", "enis": 2, "pods": [
        {"name": "a", "mode": "veth", "labels": {"app": "web"}},
        {"name": "b", "mode": "eni-policy-route", "labels": {"app": "web"}}]}]}
    data.update(over)
    return data


def test_issue_example_loads_and_plans():
    spec = load_spec(EXAMPLES / "demo.yaml")
    assert [n.name for n in spec.nodes] == ["node1", "node2"]
    plan = addressing.plan(spec)
    vpc = ipaddress.ip_network(spec.vpc_cidr)
    pods = ipaddress.ip_network(spec.pod_cidr)
    for name, pp in plan.pods.items():
        net = vpc if pp.mode.startswith("eni-") else pods
        assert pp.ip in net, name
    # the exclusive pod owns its ENI's address
    assert plan.pods["web-0"].ip == plan.nodes["node1"].nics[1].ip
    assert len({pp.ip for pp in plan.pods.values()}) == len(plan.pods)
    assert plan.pods["web-2"].mtu == 1450  # VXLAN overhead


def test_unknown_mode_names_path_and_choices():
    data = base()
    data["nodes"][0]["pods"].append({"name": "c", "mode": "ipvlann"})
    p = problems(data)
    msg = p["nodes[0].pods[2].mode"]
    assert "unknown mode 'ipvlann'" in msg and "eni-ipvlan" in msg and "expected one of" in msg


def test_every_problem_reported_at_once():
    data = base(vpc_cidr="10.244.0.0/16", datapath="iptable", colour="red")
    data["nodes"][0]["pods"].append({"name": "a", "mode": "veth"})
    data["nodes"][0]["pods"].append({"name": "averylongname1", "mode": "veth"})
    p = problems(data)
    assert "colour" in p and "known fields" in p["colour"]
    assert "overlaps" in p["pod_cidr"]
    assert "iptables" in p["datapath"]
    assert "duplicate name 'a'" in p["nodes[0].pods[2].name"]
    assert "at most 12" in p["nodes[0].pods[3].name"]


def test_unknown_field_suggests_close_name():
    data = base()
    data["nodes"][0]["pods"][0]["lables"] = {"x": "y"}
    assert "did you mean 'labels'" in problems(data)["nodes[0].pods[0].lables"]


def test_cidr_host_bits_and_overlap():
    p = problems(base(vpc_cidr="10.10.0.1/16", service_cidr="10.244.128.0/20"))
    assert "did you mean 10.10.0.0/16" in p["vpc_cidr"]
    assert "overlaps pod_cidr" in p["service_cidr"]


def test_address_exhaustion():
    data = base(vpc_cidr="10.10.0.0/28")
    data["nodes"][0]["pods"] += [{"name": f"m{i}", "mode": "macvlan"} for i in range(4)]
    assert "usable addresses" in problems(data)["vpc_cidr"]
    data = base(pod_cidr="10.244.0.0/24", node_pod_prefix=25)
    data["nodes"] = [{"name": f"n{i}", "pods": [{"name": f"p{i}", "mode": "overlay"}]} for i in range(2)]
    assert "node subnets" in problems(data)["pod_cidr"]
    data = base(node_pod_prefix=29)
    data["nodes"][0]["pods"] = [{"name": f"v{i}", "mode": "veth"} for i in range(6)]
    assert "do not fit" in problems(data)["nodes[0].pods"]


def test_eni_rules():
    data = base()
    data["nodes"][0]["enis"] = 0
    assert "needs an ENI" in problems(data)["nodes[0].pods[1].mode"]
    data = base()
    data["nodes"][0]["pods"].append({"name": "x1", "mode": "eni-exclusive"})
    data["nodes"][0]["pods"].append({"name": "x2", "mode": "eni-exclusive"})
    assert "set enis to 3" in problems(data)["nodes[0].enis"]
    data = base()
    data["nodes"][0]["pods"][1]["eni"] = 5
    assert "not a shared ENI" in problems(data)["nodes[0].pods[1].eni"]


def test_services_validation():
    data = base(services=[
        {"name": "web", "port": 80, "selector": {"app": "web"}, "cluster_ip": "10.1.2.3"},
        {"name": "web", "port": 70000},
        {"name": "bulk", "count": 10, "endpoints": 5, "selector": {"app": "web"}},
        {"name": "udp", "protocol": "sctp"},
    ])
    p = problems(data)
    assert "outside service_cidr" in p["services[0].cluster_ip"]
    assert "duplicate service default/web" in p["services[1].name"]
    assert "outside 1..65535" in p["services[1].port"]
    assert "matches 2 pod(s)" in p["services[2].endpoints"]
    assert "unknown protocol 'SCTP'" in p["services[3].protocol"]


def test_python_objects_validate_too():
    """Types are plain data; validate() checks them as parse_spec checks YAML, and up() refuses them
    before anything exists."""
    bad = Spec(name="py", nodes=[Node("n1", pods=[Pod("a", mode="tunnel")])])
    with pytest.raises(SpecError) as exc:
        validate(bad)
    assert "nodes[0].pods[0].mode" in str(exc.value) and "unknown mode 'tunnel'" in str(exc.value)
    spec = Spec(name="py", nodes=[Node("n1", pods=[Pod("a", labels={"app": "x"})])],
                services=[ServiceSpec("s", port=80, selector={"app": "x"})])
    assert validate(spec) is spec
    assert parse_spec(yaml.safe_load(spec.to_yaml())) == spec


def test_not_yaml_and_missing_file():
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec("name: [\n")
    with pytest.raises(SpecError, match="does not exist"):
        load_spec("/nonexistent/spec.yaml")


def test_service_table_bulk_and_diff():
    data = base(services=[{"name": "web", "port": 80, "target_port": 8080, "selector": {"app": "web"}},
                          {"name": "bulk", "count": 1000, "endpoints": 2, "selector": {"app": "web"}},
                          {"name": "empty", "port": 81, "selector": {"app": "nothing"}}])
    spec = parse_spec(data)
    table = table_from_spec(spec)
    assert len(table) == 1002
    ips = [sp.cluster_ip for sp in table]
    assert len(set(ips)) == len(ips)
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network(spec.service_cidr) for ip in ips)
    assert table["default/web"].endpoints[0].port == 8080
    assert all(len(sp.endpoints) == 2 for sp in table if sp.name.startswith("bulk-"))
    assert table["default/empty"].endpoints == ()
    smaller = table.without("default/bulk-7")
    changed = smaller.with_ports(type(table["default/web"])(**{**table["default/web"].__dict__, "endpoints": ()}))
    d = diff(table, changed)
    assert [sp.key for sp in d.removed] == ["default/bulk-7"]
    assert [new.key for _, new in d.changed] == ["default/web"] and not d.added and not d.full
    assert diff(None, table).full


def test_server_choices_and_their_errors():
    """`server` at lab level or per pod: labkit, none, http, or a command with its port."""
    spec = parse_spec(base(server={"kind": "http", "port": 8081}, nodes=[{"name": "n1", "pods": [
        {"name": "a"}, {"name": "b", "server": "none"}, {"name": "c", "server": {"command": "nginx -c x", "port": 81}}]}]))
    a, b, c = spec.nodes[0].pods
    assert spec.server_of(a).serves == 8081 and spec.server_of(b).kind == "none" and spec.server_of(c).serves == 81
    assert parse_spec(yaml.safe_load(spec.to_yaml())) == spec
    p = problems(base(server="ngnix", nodes=[{"name": "n1", "pods": [
        {"name": "a", "server": {"command": "", "port": 70000}}, {"name": "b", "server": {"command": "x"}},
        {"name": "c", "server": {"kind": "labkit", "port": 9}}, {"name": "d", "server": 5}]}]))
    assert "unknown server 'ngnix' (did you mean 'nginx'?)" not in p["server"]  # kinds, not binaries
    assert "expected labkit, none, http or {command:" in p["server"]
    assert "give the command line" in p["nodes[0].pods[0].server.command"]
    assert "outside 1..65535" in p["nodes[0].pods[0].server.port"]
    assert "give the port the command serves" in p["nodes[0].pods[1].server.port"]
    assert "takes no port" in p["nodes[0].pods[2].server.port"]
    assert "expected labkit, none, http" in p["nodes[0].pods[3].server"]


def test_ipvlan_and_macvlan_pods_may_not_share_a_parent():
    """Linux refuses ipvlan and macvlan slaves on one device (EBUSY at build time): the validator says
    so before anything exists, naming both pods, the ENI and the fix; on separate ENIs it is fine."""
    nodes = [{"name": "n1", "enis": 1, "pods": [{"name": "iv", "mode": "eni-ipvlan"}, {"name": "mv", "mode": "macvlan"}]}]
    msg = problems(base(nodes=nodes))["nodes[0].pods[1].eni"]
    assert "iv (ipvlan) and mv (macvlan)" in msg and "ENI 1" in msg and "'eni'" in msg
    nodes[0]["enis"] = 2
    nodes[0]["pods"][1]["eni"] = 2
    parse_spec(base(nodes=nodes))
    from labkit.experiments.pod_modes import lab_spec
    from labkit import modes

    spec = parse_spec(lab_spec(modes.names()))  # every mode, as on the VM backend: validates
    node1 = {p.name: p for p in spec.nodes[0].pods}
    assert node1["c-iv"].eni != node1["c-mv"].eni


def test_release_picks_the_vms_debian_and_means_nothing_on_netns():
    """``release`` (vagrant backend): bookworm or trixie, default none (the bookworm box); on netns,
    which runs on this host's kernel, any release is refused naming the field."""
    assert parse_spec(base()).release is None
    spec = parse_spec(base(backend="vagrant", release="trixie"))
    assert spec.release == "trixie" and load_spec(spec.to_yaml()).release == "trixie"
    assert "release" not in parse_spec(base(backend="vagrant")).to_dict()
    msg = problems(base(backend="vagrant", release="trixi"))["release"]
    assert "unknown Debian release 'trixi'" in msg and "did you mean 'trixie'" in msg and "bookworm" in msg
    for value in ("trixie", "bookworm"):
        msg = problems(base(release=value))["release"]
        assert "backend vagrant" in msg and "netns" in msg and "remove release" in msg
    assert "expected a string" in problems(base(backend="vagrant", release=13))["release"]


def test_host_routing_needs_an_ebpf_service_datapath_and_policy_engine():
    """``host_routing: bpf`` forwards past the nodes' netfilter: a kube-proxy datapath or the iptables
    policy engine would be bypassed, so the spec is refused naming the field and the fix."""
    assert parse_spec(base()).host_routing == "kernel" and "host_routing" not in parse_spec(base()).to_dict()
    spec = parse_spec(base(datapath="ebpf", host_routing="bpf"))
    assert spec.host_routing == "bpf" and load_spec(spec.to_yaml()).host_routing == "bpf"
    parse_spec(base(datapath="ebpf-tc", host_routing="bpf"))
    assert "unknown host routing 'bfp'" in problems(base(datapath="ebpf", host_routing="bfp"))["host_routing"]
    parse_spec(base(datapath="none", host_routing="bpf"))  # no Services: nothing to bypass
    for dp in ("iptables-nft", "iptables-legacy", "nftables"):
        msg = problems(base(datapath=dp, host_routing="bpf"))["host_routing"]
        assert f"datapath {dp}" in msg and "ebpf or ebpf-tc" in msg and "host_routing: kernel" in msg
    policy = {"name": "deny", "pod_selector": {"app": "web"}, "ingress": []}
    msg = problems(base(datapath="ebpf", host_routing="bpf", policies=[policy]))["host_routing"]
    assert "policy engine iptables" in msg and "policy_engine: ebpf" in msg
    parse_spec(base(datapath="ebpf", host_routing="bpf", policies=[policy], policy_engine="ebpf"))
