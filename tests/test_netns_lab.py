"""The netns backend on the real kernel: every pod mode, check, exec, down after SIGKILL, two labs.

Run as root (CI is). Each test builds labs with unique names and removes them in a finalizer."""

from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest
from pyroute2 import IPRoute

from labkit import doctor, lab, nsexec
from labkit.errors import MissingFeature
from labkit.spec import load_spec, parse_spec
from labkit.state import LabState

from conftest import EXAMPLES

pytestmark = pytest.mark.needs("root")

MODES_HERE = ["eni-exclusive", "eni-policy-route", "macvlan", "veth", "bridge", "overlay"]
LABKIT = [sys.executable, "-m", "labkit.cli"]


def modes_spec(name: str, datapath: str = "none") -> dict:
    """Two nodes; node 1 has every mode this kernel has, node 2 the non-ENI ones: all pairs same-node
    and cross-node."""
    return {"name": name, "datapath": datapath, "nodes": [
        {"name": "n1", "enis": 2, "pods": [{"name": f"a-{m[:6]}", "mode": m, "labels": {"app": "web"}}
                                          for m in MODES_HERE]},
        {"name": "n2", "pods": [{"name": f"b-{m[:6]}", "mode": m} for m in ("macvlan", "veth", "bridge", "overlay")]},
    ]}


def host_snapshot() -> dict:
    """The host namespace's links, addresses, routes, rules and the sysctls a lab might touch."""
    with IPRoute() as ipr:
        snap = {
            "links": sorted(l.get_attr("IFLA_IFNAME") for l in ipr.get_links()),
            "addrs": sorted((a["index"], a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr()),
            "routes": sorted(str((r.get_attr("RTA_TABLE"), r.get_attr("RTA_DST"), r["dst_len"],
                                  r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_OIF"))) for r in ipr.get_routes(table=0)),
            "rules": sorted(str((r.get_attr("FRA_PRIORITY"), r.get_attr("FRA_TABLE"))) for r in ipr.get_rules()),
        }
    for key in ("net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.all.proxy_arp",
                "net.ipv4.conf.all.send_redirects"):
        snap[key] = nsexec.read_sysctl(None, key)
    return snap


def leftovers(name: str) -> list[str]:
    found = [f"netns {n}" for n in nsexec.list_netns(f"lk-{name}.")]
    root = nsexec.cgroup2_root()
    if root and (root / f"lk-{name}").exists():
        found.append(f"cgroup {root / f'lk-{name}'}")
    if LabState(name).dir.exists():
        found.append(f"state {LabState(name).dir}")
    return found


def assert_check_ok(results):
    failed = [r for r in results if not r.ok]
    assert not failed, "\n".join(f"{r.kind} {r.src}->{r.dst} {r.host}:{r.port}: want {r.expected}, got {r.observed}"
                                 for r in failed[:20])


def test_issue_example_builds_checks_and_leaves_nothing(make_lab, lab_name):
    before = host_snapshot()
    data = load_spec(EXAMPLES / "demo.yaml").to_dict()
    spec = parse_spec({**data, "name": lab_name, "datapath": "none"})
    lb = make_lab(spec)
    results = lb.check()
    assert_check_ok(results)
    pairs = {(r.src, r.dst) for r in results if r.kind == "pod"}
    assert len(pairs) == 5 * 4
    # every pod answers on its own address with its own name (not some other pod's server)
    assert all(r.observed == r.dst for r in results if r.kind == "pod")
    counts = lab.down(lab_name)
    assert counts["netns"] == 8 and counts["cgroups"] == 1 and counts["processes"] >= 5
    assert leftovers(lab_name) == []
    assert host_snapshot() == before
    assert lab.down(lab_name)["netns"] == 0  # safe twice


def test_every_mode_same_node_and_cross_node(make_lab, lab_name):
    lb = make_lab(parse_spec(modes_spec(lab_name)))
    results = lb.check()
    assert_check_ok(results)
    modes = {p.name: p.mode for _, p in lb.spec.pods()}
    nodes = {p.name: n.name for n, p in lb.spec.pods()}
    seen = {(modes[r.src], modes[r.dst], nodes[r.src] == nodes[r.dst]) for r in results if r.kind == "pod"}
    for m in MODES_HERE:  # every mode talks to every other mode on its node and across nodes
        assert {(m, o, True) for o in MODES_HERE if o != m} <= seen, m
        assert {(m, o, False) for o in ("macvlan", "veth", "bridge", "overlay")} <= seen, m


@pytest.mark.parametrize("datapath", ["iptables-nft", "nftables"])
def test_a_bridged_pod_reaches_itself_through_its_service(make_lab, lab_name, datapath):
    """Hairpin: a pod whose Service picks the pod itself. On a bridge (``bridge``, ``overlay``) the
    DNATed packet goes back out of the port it came in by, so the port needs hairpin mode (as the CNI
    bridge plugin and kubelet set it); without it every such connection timed out."""
    from labkit.measure import loadgen

    lb = make_lab(parse_spec({"name": lab_name, "datapath": datapath, "nodes": [{"name": "n1", "pods": [
        {"name": "p-br", "mode": "bridge", "labels": {"app": "h"}},
        {"name": "p-ov", "mode": "overlay", "labels": {"app": "h"}}]}],
        "services": [{"name": "h", "port": 80, "target_port": 8080, "selector": {"app": "h"}}]}))
    sp = next(iter(lb.services()))
    for pod in ("p-br", "p-ov"):
        res = loadgen.who(lb.pod_netns(pod), sp.cluster_ip, sp.port, 60, cgroup=lb.backend.pod_cgroup(lb.spec, pod),
                          connect_timeout_ms=1000)
        assert res.errors == 0 and res.counts.get(pod, 0) > 0 and sum(res.counts.values()) == 60, (pod, res)


def test_pod_wiring_is_what_the_mode_says(make_lab, lab_name):
    lb = make_lab(parse_spec(modes_spec(lab_name)))
    with nsexec.iproute(lb.pod_netns("a-eni-ex")) as ipr:
        names = {l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
    assert {"eth0", "veth1"} <= names  # the ENI itself, plus the Terway service veth
    with nsexec.iproute(f"lk-{lab_name}.n1") as ipr:
        names = {l.get_attr("IFLA_IFNAME") for l in ipr.get_links()}
        kinds = {l.get_attr("IFLA_IFNAME"): l.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") for l in ipr.get_links()}
        rules = [r for r in ipr.get_rules() if r.get_attr("FRA_PRIORITY") == 1000]
    assert "eni1" not in names and "eni2" in names  # eni1 moved into the exclusive pod
    assert kinds["vxlan0"] == "vxlan" and kinds["cbr0"] == "bridge" and kinds["cni0"] == "bridge"
    assert [r.get_attr("FRA_IIFNAME") for r in rules] == ["lx-a-eni-po"]
    with nsexec.iproute(lb.pod_netns("a-macvla")) as ipr:
        link = ipr.link_lookup(ifname="eth0")[0]
        assert ipr.get_links(link)[0].get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") == "macvlan"
    with nsexec.iproute(lb.pod_netns("a-overla")) as ipr:
        assert ipr.get_links(ipr.link_lookup(ifname="eth0")[0])[0].get_attr("IFLA_MTU") == 1450
    assert nsexec.read_sysctl(f"lk-{lab_name}.n1", "net.ipv4.ip_forward") == "1"
    # devices labkit makes in a node have the MACs it gave them when making them (udev's
    # MACAddressPolicy=persistent replaces a new device's random MAC some time later: on a VM node it
    # replaced vxlan0's, which the other nodes' FDB names); pods keep the kernel's ARP defaults
    from labkit.topology import POD_SYSCTLS, device_mac

    with nsexec.iproute(f"lk-{lab_name}.n1") as ipr:
        macs = {l.get_attr("IFLA_IFNAME"): l.get_attr("IFLA_ADDRESS") for l in ipr.get_links()}
    made = [n for n in macs if n.startswith("lx-") or n in ("cbr0", "cni0")]
    assert len(made) >= 4 and all(macs[n] == device_mac(lab_name, "n1", n) for n in made), macs
    assert macs["vxlan0"] == lb.plan.nodes["n1"].vxlan_mac
    for pod in ("a-eni-ex", "a-veth"):
        assert {k: nsexec.read_sysctl(lb.pod_netns(pod), k) for k in POD_SYSCTLS} == {k: "0" for k in POD_SYSCTLS}


@pytest.mark.skipif(doctor.has("netkit"), reason="this kernel has netkit: the fail-fast path cannot be shown")
def test_netkit_fails_fast_naming_the_trixie_vms(lab_name):
    data = modes_spec(lab_name)
    data["nodes"][0]["pods"].append({"name": "nk", "mode": "netkit"})
    with pytest.raises(MissingFeature) as exc:
        lab.up(parse_spec(data), progress=False)
    assert exc.value.feature == "netkit" and exc.value.needed_by == "pod mode netkit"
    assert "release: trixie" in exc.value.fix
    assert leftovers(lab_name) == []  # nothing was created


@pytest.mark.skipif(doctor.has("ipvlan"), reason="this kernel has ipvlan: the fail-fast path cannot be shown")
def test_ipvlan_fails_fast_with_doctor_message(lab_name):
    data = modes_spec(lab_name)
    data["nodes"][0]["enis"] = 3  # ENI 2 carries the macvlan pod; Linux refuses ipvlan beside it
    data["nodes"][0]["pods"].append({"name": "iv", "mode": "eni-ipvlan", "eni": 3})
    with pytest.raises(MissingFeature) as exc:
        lab.up(parse_spec(data), progress=False)
    assert exc.value.feature == "ipvlan" and "vagrant" in exc.value.fix.lower()
    assert leftovers(lab_name) == []  # nothing was created


def test_exec_runs_inside_the_pod(make_lab, lab_name):
    lb = make_lab(parse_spec(modes_spec(lab_name)))
    out = subprocess.run(LABKIT + ["exec", lab_name, "b-veth", "--", sys.executable, "-c",
                                   "import os;print(os.readlink('/proc/self/ns/net'));"
                                   "print(open('/proc/self/cgroup').read())"],
                         capture_output=True, text=True, check=True).stdout
    ns_inode = nsexec.netns_inode(lb.pod_netns("b-veth"))
    assert f"net:[{ns_inode}]" in out
    assert f"lk-{lab_name}/n2/b-veth" in out
    bad = subprocess.run(LABKIT + ["exec", lab_name, "nope", "--", "true"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no pod 'nope'" in bad.stderr


def test_cli_up_check_json_services_ls_down(tmp_path, lab_name):
    spec = load_spec(EXAMPLES / "demo.yaml").to_dict()
    spec.update(name=lab_name, datapath="none")
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(spec))
    try:
        up = subprocess.run(LABKIT + ["up", "-q", str(path)], capture_output=True, text=True)
        assert up.returncode == 0, up.stderr
        ls = json.loads(subprocess.run(LABKIT + ["ls", "--json"], capture_output=True, text=True).stdout)
        assert any(r["name"] == lab_name and r["status"] == "ready" for r in ls)
        chk = subprocess.run(LABKIT + ["check", lab_name, "--json"], capture_output=True, text=True)
        report = json.loads(chk.stdout)
        assert chk.returncode == 0 and report["ok"] and len(report["results"]) >= 20
        svc = json.loads(subprocess.run(LABKIT + ["services", lab_name, "--json"], capture_output=True, text=True).stdout)
        assert svc[0]["name"] == "default/web" and len(svc[0]["endpoints"]) == 4
        again = subprocess.run(LABKIT + ["up", "-q", str(path)], capture_output=True, text=True)
        assert again.returncode == 5 and "exists already" in again.stderr  # a lab's state, not usage
    finally:
        subprocess.run(LABKIT + ["down", lab_name], capture_output=True)
    assert leftovers(lab_name) == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nnodes:\n  - name: n1\n    pods:\n      - {name: a, mode: ipvlann}\n")
    res = subprocess.run(LABKIT + ["up", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and "nodes[0].pods[0].mode: unknown mode 'ipvlann'" in res.stderr


def test_a_failing_check_exits_nonzero(make_lab, lab_name):
    make_lab(parse_spec({"name": lab_name, "datapath": "none", "nodes": [
        {"name": "n1", "pods": [{"name": "a", "mode": "veth"}, {"name": "b", "mode": "bridge"}]},
        {"name": "n2", "pods": [{"name": "c", "mode": "veth"}]}]}))
    with nsexec.iproute(f"lk-{lab_name}.vpc") as ipr:  # cut node 2 off the VPC
        ipr.link("set", index=ipr.link_lookup(ifname="n2-e0")[0], state="down")
    res = subprocess.run(LABKIT + ["check", lab_name, "--json", "--no-services"], capture_output=True, text=True)
    assert res.returncode == 1
    report = json.loads(res.stdout)
    bad = {(r["src"], r["dst"]) for r in report["results"] if not r["ok"]}
    assert not report["ok"] and bad == {("a", "c"), ("b", "c"), ("c", "a"), ("c", "b")}


@pytest.mark.parametrize("when", ["building", "built"])
def test_down_after_sigkill_leaves_nothing(lab_name, tmp_path, when):
    before = host_snapshot()
    data = modes_spec(lab_name)
    data["nodes"][1]["pods"] += [{"name": f"c{i}", "mode": "veth"} for i in range(30)]
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(data))
    proc = subprocess.Popen(LABKIT + ["up", "-q", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if when == "building":  # kill once some pods exist but before it finishes
            deadline = time.monotonic() + 30
            while len(nsexec.list_netns(f"lk-{lab_name}.")) < 8:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
                time.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)
        else:
            assert proc.wait(60) == 0
        proc.wait(10)
        assert nsexec.list_netns(f"lk-{lab_name}.")  # something to clean up
    finally:
        res = subprocess.run(LABKIT + ["down", lab_name], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert leftovers(lab_name) == []
    # no process of the lab survives (in-pod servers included)
    out = subprocess.run(["pgrep", "-f", "lkserver.*--name c1 "], capture_output=True, text=True).stdout
    assert out.strip() == "" or all(not os.path.exists(f"/proc/{p}") for p in out.split())
    assert host_snapshot() == before


def test_two_labs_do_not_interfere(make_lab, lab_name):
    a = make_lab(parse_spec(modes_spec(lab_name + "a")))
    b = make_lab(parse_spec(modes_spec(lab_name + "b")))  # same addresses, other namespaces
    assert_check_ok(a.check())
    lab.down(a.name)
    assert leftovers(a.name) == []
    assert_check_ok(b.check())
    assert nsexec.list_netns(f"lk-{b.name}.")


@pytest.mark.parametrize("datapath", ["iptables-legacy", "iptables-nft", "nftables", "ebpf", "ebpf-tc"])
def test_issue_example_with_each_datapath(make_lab, lab_name, datapath):
    """The issue's example with a real Service datapath: every pod pair, and the Service through its
    ClusterIP from every pod, reaching only its endpoints; then nothing is left."""
    from labkit.datapath import get

    get(datapath).preflight()
    data = load_spec(EXAMPLES / "demo.yaml").to_dict()
    data["services"].append({"name": "empty", "port": 81, "selector": {"app": "none"}})
    lb = make_lab(parse_spec({**data, "name": lab_name, "datapath": datapath}))
    results = lb.check()
    assert_check_ok(results)
    svc = [r for r in results if r.kind == "service" and r.dst == "default/web"]
    assert {r.src for r in svc} == {p.name for _, p in lb.spec.pods()}
    assert len({r.observed for r in svc}) >= 3  # spread over endpoints (statistics: datapath tests)
    refused = [r for r in results if r.dst == "default/empty"]
    assert refused and all(r.ok for r in refused)
    lab.down(lab_name)
    assert leftovers(lab_name) == []


def test_pod_servers_run_on_the_load_cpu_whoever_builds_the_lab(make_lab, lab_name):
    """A lab built outside an experiment (a notebook, a test: ``lab.up`` moves itself to the
    orchestration CPU while it builds) still starts its pods' servers on the load CPUs, where the
    clients run: on the orchestration CPU every request and reply would cross CPUs."""
    from labkit.measure.cpus import plan_cpus

    plan = plan_cpus()
    if not plan.pinned:
        pytest.skip("one CPU: nothing is pinned")
    lb = make_lab(parse_spec({"name": lab_name, "nodes": [{"name": "n1", "pods": [{"name": "a", "mode": "veth"}]}]}))
    pids = [int(p) for p in (lb.backend.pod_cgroup(lb.spec, "a") / "cgroup.procs").read_text().split()]
    assert pids and {pid: os.sched_getaffinity(pid) for pid in pids} == {pid: set(plan.load_cpus) for pid in pids}


def _listening(lb, pod: str) -> dict[int, str]:
    """TCP port -> the process name listening on it, inside the pod (read from /proc/net/tcp and the
    processes' fds, no ss output parsing)."""
    out = lb.exec(pod, [sys.executable, "-c", """
import os, json
socks = {}
for line in open('/proc/net/tcp').read().splitlines()[1:]:
    f = line.split()
    if f[3] == '0A':
        socks[f[9]] = int(f[1].split(':')[1], 16)
seen = {}
for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
        for fd in os.listdir(f'/proc/{pid}/fd'):
            t = os.readlink(f'/proc/{pid}/fd/{fd}')
            if t.startswith('socket:[') and t[8:-1] in socks:
                seen[socks[t[8:-1]]] = open(f'/proc/{pid}/comm').read().strip()
    except OSError:
        pass
print(json.dumps(seen))
"""]).stdout
    return {int(k): v for k, v in json.loads(out).items()}


@pytest.mark.needs("root", "nginx")
def test_user_and_packaged_servers_serve_and_never_collide(make_lab, lab_name, tmp_path):
    """The lab's server is the packaged http workload (nginx with labkit's config: it answers GET /
    with the pod's name), one pod brings its own nginx on 8081, one runs nothing. labkit check
    reaches each through its Service; labkit's echo server never binds the user's port; down kills
    them all."""
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"daemon off; master_process off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/err.log;\n"
                    "events {}\nhttp { access_log off; client_body_temp_path " + str(tmp_path) + "/cb;\n"
                    "  server { listen 8081; location / { return 200 \"users nginx\\n\"; } } }\n")
    spec = parse_spec({"name": lab_name, "datapath": "iptables-nft", "server": "http", "nodes": [
        {"name": "n1", "pods": [{"name": "cli"}, {"name": "web-0", "labels": {"app": "web"}},
                                {"name": "web-1", "labels": {"app": "web"},
                                 "server": {"command": f"nginx -p {tmp_path} -c {conf} -e {tmp_path}/err.log",
                                            "port": 8081}},
                                {"name": "quiet", "server": "none"}]}],
        "services": [{"name": "web", "port": 80, "selector": {"app": "web"}},
                     {"name": "users", "port": 8081, "selector": {"app": "web"}}]})
    lb = make_lab(spec)
    results = lb.check()
    failed = [r for r in results if not r.ok]
    assert not failed, failed
    rows = {(r.kind, r.dst, r.port, r.src): r for r in results}
    assert rows["service", "default/web", 80, "cli"].expected == "one of web-0,web-1"  # names, both nginx and lkserver
    assert rows["service", "default/users", 8081, "cli"].expected == "a reply from web-0,web-1"
    assert rows["pod", "quiet", 8080, "cli"].expected == "refused"
    ports = _listening(lb, "web-0")  # the packaged server on 80, labkit's on the lab's other ports
    assert set(ports) == {80, 8080, 8081} and ports[80] == "nginx"
    assert ports[8080].startswith("lkserver") and ports[8081].startswith("lkserver")
    ports = _listening(lb, "web-1")  # the user's server on its port, labkit's on the others
    assert ports[8081] == "nginx" and ports[80].startswith("lkserver") and ports[8080].startswith("lkserver")
    assert _listening(lb, "quiet") == {}
    lb.down()
    assert not subprocess.run(["pgrep", "-f", str(conf)], capture_output=True).stdout  # the user's server is gone


@pytest.mark.needs("root")
def test_a_kernel_refusal_names_the_pod_and_leaves_nothing(lab_name, monkeypatch):
    """When the kernel refuses something while a pod is wired (EBUSY, as for a macvlan beside an
    ipvlan slave), up fails with one labkit error naming the pod, its node and the kernel's message,
    and removes what it made."""
    from pyroute2.netlink.exceptions import NetlinkError

    from labkit.errors import BackendError
    from labkit.modes.bridge import Bridge

    def refuse(self, w, pod, pp, pns):
        raise NetlinkError(16, "Device or resource busy")

    monkeypatch.setattr(Bridge, "wire", refuse)
    spec = parse_spec({"name": lab_name, "nodes": [{"name": "n1", "pods": [{"name": "a"}, {"name": "b", "mode": "bridge"}]}]})
    with pytest.raises(BackendError, match=r"pod b \(bridge\) on node n1: the kernel refused \(16: Device or resource busy"):
        lab.up(spec, progress=False)
    assert leftovers(lab_name) == []


CHILD = r"""
import os, subprocess, sys
from pathlib import Path
from labkit import nsexec
def points():
    return [l.split()[4] for l in Path("/proc/self/mountinfo").read_text().splitlines()]
subprocess.run(["mount", "--make-rprivate", "/"], check=True)
while str(nsexec.NETNS_DIR) in points():  # this mount namespace only: a machine where nothing ran yet
    subprocess.run(["umount", "-l", str(nsexec.NETNS_DIR)], check=True)
assert not any(p.startswith(str(nsexec.NETNS_DIR)) for p in points())
name, other = f"lktest-share-{os.getpid()}", f"lktest-iproute-{os.getpid()}"
nsexec.create_netns(name)
try:
    assert points().count(str(nsexec.NETNS_DIR)) == 1, "labkit did not make /run/netns a mount point"
    subprocess.run(["ip", "netns", "add", other], check=True)
    subprocess.run(["ip", "netns", "del", other], check=True)
    assert points().count(str(nsexec.NETNS_DIR)) == 1, "ip netns add bound /run/netns over labkit's namespace"
finally:  # the names are files of the real folder: they must go whatever happened
    assert nsexec.remove_netns(name) and name not in nsexec.list_netns("lktest-share")
print("ok")
"""


@pytest.mark.needs("root")
def test_namespaces_stay_removable_when_iproute2_adds_one_meanwhile():
    """labkit makes /run/netns a mount point before binding namespaces in it (as `ip netns add` does
    on first use), so that a later `ip netns add` does not bind the folder over labkit's namespaces:
    their names would then be unremovable (EBUSY), as a CI run's were. Run in a mount namespace of its
    own where /run/netns is a plain folder, as on a machine where nothing made a namespace yet."""
    import shutil
    import subprocess
    import sys

    if shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("needs iproute2's ip and util-linux's unshare")
    out = subprocess.run(["unshare", "-m", sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
