"""The ``hosts`` backend: the same spec on machines that exist (bare metal, cloud instances with real
secondary NICs), reached over ssh; each node is a whole machine, built by labkit's agent with the node
runtime, as in a VM of the ``vagrant`` backend (:mod:`labkit.remote`). Mininet's cluster edition has
the shape: the same node API, commands over ssh.

The spec's ``inventory`` (:class:`~labkit.spec.types.Inventory`) gives, per node, the ssh target
(``root@address[:port]``, a key or ssh's agent, optionally an ssh config of the user's), the
management interface labkit never touches, and the host interfaces that play the node's lab NICs
(``eth0``, its VPC primary, and ``eni1``…, by name or MAC). The "VPC" is the real network between the
hosts: there is no router namespace. labkit addresses the lab NICs from ``vpc_cidr`` and expects the
network's gateway at its first address to route pod subnets to their nodes and ENI pod addresses to
their ENIs, as a cloud VPC does once its route table and the ENIs' secondary addresses say so
(``labkit plan`` prints those routes).

Safety on machines labkit did not create:

- **before any host is touched** (:meth:`HostsBackend.inspect`, read-only: ``python3 -`` fed
  :mod:`labkit.remote.hostinspect`): a lab NIC that is the management interface, enslaved, addressed,
  carrying a default route or the ssh session, a name labkit needs held by another interface, a login
  that is not root, a host that holds another lab, a foreign ``/opt/labkit``: each refused with the
  host, the reason and the fix, for every host at once;
- **a record on each host** (:mod:`labkit.remote.hostjournal`) written by the agent before its first
  change, so that ``down`` restores links, addresses, routes, rules, sysctls, netfilter, modules and
  processes exactly, also after a SIGKILLed ``up`` or a lost connection (``down`` then says which host
  it could not reach and keeps the lab, to be taken down again);
- **no default route** is changed: the node's main table gains a route for the pod CIDR via the VPC
  gateway on the VPC NIC, nothing else leaves the host differently.

What labkit changes on a host is listed by ``labkit plan SPEC`` (:func:`plan`).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import addressing, modes
from ..errors import BackendError, MissingFeature
from ..remote import payload
from ..remote.node import RemoteNode, close_datapaths
from ..remote.payload import build_payload
from ..remote.ssh import Machine, SshTarget
from ..spec import Spec
from ..spec.validate import MAC, SSH_TARGET
from ..state import LabState
from . import BACKENDS
from .remote import RemoteNodesBackend

PYTHON_MIN = (3, 11)  # the agent is tested with Debian 12's 3.11 and Debian 13's 3.13
DOWN_TIMEOUT = 180


def ssh_parts(target: str) -> tuple[str | None, str, int | None]:
    """``[user@]host[:port]`` -> (user, host, port); the spec's validation accepted it already."""
    m = SSH_TARGET.match(target)
    if not m:
        raise BackendError(f"{target!r} is not [user@]address[:port]")
    host = m["host"][1:-1] if m["host"].startswith("[") else m["host"]
    return m["user"], host, int(m["port"]) if m["port"] else None


def ssh_config_text(spec: Spec, control_dir: Path) -> str:
    """ssh's config for the lab's hosts: one alias per node, root, the inventory's key, one
    multiplexed master per host (sockets in ``control_dir``), never a password prompt; then the
    inventory's ssh config (known hosts, jump hosts), or the user's own ``~/.ssh/config``."""
    inv = spec.inventory
    blocks = []
    for node in spec.nodes:
        entry = inv.hosts[node.name]
        user, host, port = ssh_parts(entry.ssh)
        lines = [f"Host {node.name}", f"  HostName {host}", f"  User {user or 'root'}"]
        if port:
            lines.append(f"  Port {port}")
        if entry.key:
            lines += [f"  IdentityFile {Path(entry.key).expanduser().resolve()}", "  IdentitiesOnly yes"]
        blocks.append("\n".join(lines))
    common = ["Host *", "  BatchMode yes", "  ControlMaster auto", f"  ControlPath {control_dir}/cm-%n",
              "  ControlPersist 600", "  ServerAliveInterval 15", "  ServerAliveCountMax 8", "  ConnectTimeout 20"]
    user_cfg = Path(inv.ssh_config).expanduser().resolve() if inv.ssh_config else Path("~/.ssh/config").expanduser()
    if user_cfg.is_file():
        common.append(f"  Include {user_cfg}")
    return "\n\n".join([*blocks, "\n".join(common)]) + "\n"


def _nic_problems(node: str, entry, facts: dict) -> tuple[list[str], dict[str, str]]:
    """Problems with the inventory's NICs on the host ``facts`` describe; lab NIC -> MAC when none."""
    probs: list[str] = []
    links: dict[str, dict] = facts["links"]
    by_mac = {v["mac"]: k for k, v in links.items()}
    mgmt = entry.management
    where = f"host of node {node} ({entry.ssh})"
    if mgmt not in links:
        probs.append(f"{where}: no management interface {mgmt} (interfaces: {', '.join(sorted(links))}); "
                     "name the interface its ssh session and default route use")
    if facts["ssh_device"] and facts["ssh_device"] != mgmt:
        probs.append(f"{where}: labkit reached it through {facts['ssh_device']}, not the management interface "
                     f"{mgmt}: set management: {facts['ssh_device']} (labkit must never touch the interface it "
                     "is reached through)")
    resolved: dict[str, str] = {}
    for lab_nic, real in entry.nics.items():
        name = by_mac.get(real.lower()) if MAC.match(real) else real
        if name is None or name not in links:
            known = ", ".join(f"{k} {v['mac']}" for k, v in sorted(links.items()))
            probs.append(f"{where}: no interface {real} for {lab_nic} (interfaces: {known})")
            continue
        nic = links[name]
        why = None
        if name == mgmt:
            why = "it is the management interface, which labkit never touches"
        elif name == facts["ssh_device"]:
            why = "the ssh session to the host arrives on it"
        elif name in facts["default_devices"]:
            why = "the host's default route uses it"
        elif nic["enslaved"]:
            why = "it is a port of a bridge or bond"
        elif nic["addrs"]:
            why = f"it has addresses ({', '.join(nic['addrs'])}): the host uses it"
        if why:
            probs.append(f"{where}: {name} cannot play {lab_nic}: {why}; give the lab a NIC of its own "
                         "(a secondary NIC or ENI with no address)")
            continue
        resolved[lab_nic] = nic["mac"]
    for lab_nic in entry.nics:  # labkit renames its NICs eth0, eni1…: another interface may not hold those
        holder = links.get(lab_nic)
        if holder is not None and resolved.get(lab_nic) != holder["mac"]:
            probs.append(f"{where}: its interface {lab_nic} is not the NIC playing {lab_nic}, and labkit names its "
                         f"NICs {', '.join(entry.nics)}: map {lab_nic} to {lab_nic} in the inventory, or run on a "
                         f"host where {lab_nic} is free" + (" (it is the management interface)"
                                                            if lab_nic == mgmt else ""))
    return probs, resolved


def host_problems(spec: Spec, node: str, facts: dict) -> tuple[list[str], dict[str, str]]:
    """Everything that stops lab ``spec`` from using this host (from :meth:`HostsBackend.inspect`'s
    facts), each with its fix; and the lab NICs' MACs."""
    entry = spec.inventory.hosts[node]
    where = f"host of node {node} ({entry.ssh})"
    probs = []
    if facts["uid"] != 0:
        probs.append(f"{where}: labkit logged in as uid {facts['uid']}, not root: log in as root with a key")
    if tuple(facts["python"]) < PYTHON_MIN:
        probs.append(f"{where}: python3 is {'.'.join(map(str, facts['python']))}; labkit's agent needs "
                     f"{'.'.join(map(str, PYTHON_MIN))} or newer (Debian 12 or later)")
    if not facts["addresses_known"]:
        probs.append(f"{where}: no iproute2 (`ip`): apt install iproute2")
    if not facts["cgroup2"]:
        probs.append(f"{where}: no cgroup v2 hierarchy mounted (pods need one): boot with systemd's unified "
                     "hierarchy")
    others = [r for r in facts["records"] if r != spec.name]
    if others:
        probs.append(f"{where}: it holds lab {others[0]}: `labkit down {others[0]}` first")
    elif spec.name in facts["records"]:
        probs.append(f"{where}: lab {spec.name} was not taken down there: `labkit down {spec.name}` first")
    if facts["payload"] == "other":
        probs.append(f"{where}: {payload.REMOTE_ROOT} exists and is not labkit's: labkit installs its agent "
                     "there; move it away")
    nic_probs, macs = _nic_problems(node, entry, facts)
    return probs + nic_probs, macs


def plan(spec: Spec) -> dict[str, list[str]]:
    """Every change ``up`` makes on each host, in order (``labkit plan``); ``down`` undoes all of it."""
    p = addressing.plan(spec)
    vpc = p.vpc
    out: dict[str, list[str]] = {}
    lab_modes = spec.modes()
    for node in spec.nodes:
        entry = spec.inventory.hosts[node.name]
        me = p.nodes[node.name]
        steps = [f"ssh {entry.ssh} (management interface {entry.management}: never touched)",
                 f"files: {payload.REMOTE_ROOT} (labkit's agent, pyroute2, native helpers; removed at down), "
                 f"/run/labkit/{spec.name}, /run/labkit-host/{spec.name}.json (the record down restores from)",
                 "modules loaded if absent (unloaded at down): " + ", ".join(_modules(spec))]
        exclusive = set(me.exclusive.values())
        for nic in me.nics:
            real = entry.nics.get(nic.ifname, "?")
            fate = "moved into its pod" if nic.index in exclusive else f"address {nic.ip}/{vpc.prefixlen}"
            steps.append(f"NIC {real} renamed {nic.ifname}, up, mtu 1500, {fate}; arp_ignore=1, arp_announce=2, "
                         "rp_filter=0 on it")
        steps += ["sysctls: net.ipv4.ip_forward=1, net.ipv4.conf.all.rp_filter=0, "
                  "net.ipv4.conf.default.rp_filter=0 (recorded, restored at down)",
                  f"route: {spec.pod_cidr} via {p.vpc_gateway} dev eth0 (the default route is not changed)"]
        if len(me.nics) > 1:
            steps.append(f"policy routing: tables {', '.join(str(100 + n.index) for n in me.nics[1:])} "
                         f"(default via {p.vpc_gateway} on each ENI)")
        if any(modes.get(m).bridge for m in lab_modes):
            steps.append("bridges: " + ", ".join(sorted({modes.get(m).bridge for m in lab_modes
                                                         if modes.get(m).bridge})))
        if "overlay" in lab_modes:
            steps.append("vxlan0 (VNI and port of labkit's overlay) over eth0")
        pods = ", ".join(f"{pod.name} ({pod.mode}, {p.pods[pod.name].ip})" for pod in node.pods)
        steps.append(f"pods: network namespaces {spec.prefix}.<pod> with their devices: {pods or 'none'}")
        steps.append(f"cgroup {spec.prefix}/{node.name}; servers in the pods (killed at down)")
        steps.append(f"Service datapath {spec.datapath}: " + _datapath_objects(spec.datapath))
        if spec.policies and spec.policy_engine != "none":
            steps.append(f"NetworkPolicies by {spec.policy_engine}")
        if spec.host_routing == "bpf":
            steps.append("eBPF host routing: tc programs on eth0 and the pods' node-side devices")
        out[node.name] = steps
    return out


def _modules(spec: Spec) -> tuple[str, ...]:
    from ..remote.agent import host_modules

    return host_modules(spec)


def _datapath_objects(name: str) -> str:
    return {"iptables-legacy": "KUBE-* chains in iptables (legacy)", "iptables-nft": "KUBE-* chains in iptables (nft)",
            "nftables": "nftables table ip kube-proxy", "ipvs": "IPVS services, kube-ipvs0, KUBE-* chains",
            "ebpf": "eBPF programs on the lab's cgroup, maps pinned in the lab's bpffs",
            "ebpf-tc": "eBPF programs on the pods' node-side devices (tc), maps pinned in the lab's bpffs",
            "none": "nothing"}.get(name, "its objects")


def vpc_routes(spec: Spec) -> list[str]:
    """What the network between the hosts must route (a cloud VPC's route table and ENI secondary
    addresses): labkit's netns and VM labs program their VPC router with exactly these."""
    from ..topology import vpc_routes as routes

    out = []
    for dst, via in routes(addressing.plan(spec)):
        if "gateway" in via:
            out.append(f"{dst} via {via['gateway']}")
    return out


def each_host(spec: Spec, fn) -> dict:
    """``fn(node name)`` for every node at once (each on its own host); node -> result, in spec
    order; the first exception is raised."""
    names = [n.name for n in spec.nodes]
    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(fn, names)))


def check_hosts(spec: Spec) -> list[str]:
    """Log in to each host (read only) and list what would stop ``up`` (``labkit plan --inspect``)."""
    import tempfile

    backend = HostsBackend()
    backend.preflight(spec)
    with tempfile.TemporaryDirectory(prefix="labkit-plan-") as tmp:
        cfg = Path(tmp) / "ssh_config"
        cfg.write_text(ssh_config_text(spec, Path(tmp)))
        try:
            facts = backend.inspect(spec, cfg)
        finally:
            for node in spec.nodes:
                Machine(SshTarget(node.name, config=cfg)).close(timeout=15)
    return [p for n in spec.nodes for p in host_problems(spec, n.name, facts[n.name])[0]]


@BACKENDS.register
class HostsBackend(RemoteNodesBackend):
    name = "hosts"
    order = 20

    def ssh_config(self, lab: str) -> Path:
        return LabState(lab).dir / "ssh_config"

    def machine(self, lab: str, node: str) -> Machine:
        return Machine(SshTarget(node, config=self.ssh_config(lab)), f"{node} (host of lab {lab})")

    # ------------------------------------------------------------ preflight
    def preflight(self, spec: Spec) -> None:
        if shutil.which("ssh") is None:
            raise MissingFeature("ssh", "the hosts backend", "apt install openssh-client")
        if spec.inventory is None:
            raise BackendError("backend hosts needs an inventory (see README, 'Run it on your own machines')")

    def inspect(self, spec: Spec, config: Path | None = None) -> dict[str, dict]:
        """Each host's facts, read without changing anything (:mod:`labkit.remote.hostinspect`)."""
        from ..remote import hostinspect

        source = Path(hostinspect.__file__).read_text()

        def one(node: str) -> dict:
            machine = Machine(SshTarget(node, config=config)) if config else self.machine(spec.name, node)
            proc = machine.run("python3 -", input=source, check=False, timeout=60)
            if proc.returncode != 0:
                why = (proc.stderr or proc.stdout).strip()[-400:]
                hint = " (add its key to known_hosts: ssh to it once by hand)" if "Host key" in why else ""
                raise BackendError(f"cannot inspect the host of node {node} ({spec.inventory.hosts[node].ssh}): "
                                   f"ssh exited {proc.returncode}: {why}{hint}")
            return json.loads(proc.stdout.strip().splitlines()[-1])

        return each_host(spec, one)

    def performance(self, spec: Spec, macs: dict, facts: dict) -> dict[str, dict]:
        """Each host's performance preflight (:mod:`labkit.hostfacts`: governor, SMT, isolated CPUs,
        irqbalance, clock source, steal, the lab NICs' queues and offloads, kernel features), read
        without changing anything; recorded in the lab's meta (and service-scale's manifest)."""
        from .. import hostfacts

        source = Path(hostfacts.__file__).read_text()

        def one(node: str) -> dict:
            by_mac = {v["mac"]: k for k, v in facts[node]["links"].items()}
            nics = ",".join(by_mac[m] for m in macs[node].values() if m in by_mac)
            proc = self.machine(spec.name, node).run(f"python3 - --json --nics {shlex.quote(nics)}", input=source,
                                                     check=False, timeout=120)
            try:
                return json.loads(proc.stdout)
            except json.JSONDecodeError:
                return {"rows": [], "error": (proc.stderr or proc.stdout).strip()[-300:]}

        return each_host(spec, one)

    # ------------------------------------------------------------ up
    def up(self, spec: Spec, progress: bool = True, start_servers: bool = True) -> LabState:
        self.preflight(spec)
        say = print if progress else (lambda *a, **k: None)
        state = LabState(spec.name)
        state.create(spec)
        t0 = time.monotonic()
        self.ssh_config(spec.name).write_text(ssh_config_text(spec, state.dir))
        try:
            say(f"inspecting {len(spec.nodes)} host(s) …")
            facts = self.inspect(spec)
            problems, macs = [], {}
            for node in spec.nodes:
                probs, macs[node.name] = host_problems(spec, node.name, facts[node.name])
                problems += probs
            if problems:
                raise BackendError("nothing was changed on any host:\n  " + "\n  ".join(problems))
        except BaseException:
            self._close_masters(spec)
            state.remove()
            raise
        times = {"inspect": round(time.monotonic() - t0, 1)}
        try:
            preflight = self.performance(spec, macs, facts)
            for node, rows in preflight.items():
                for r in rows["rows"]:
                    if r["status"] in ("warn", "missing"):
                        say(f"  {node}: {r['name']}: {r['detail']}" + (f" (fix: {r['fix']})" if r["fix"] else ""))
            times["preflight"] = round(time.monotonic() - t0, 1)
            info = self._build(spec, state, macs, facts, say, start_servers, times, t0)
            for node, facts_of in preflight.items():
                info["hosts"][node]["preflight"] = facts_of
        except BaseException:
            self.down(spec.name)
            raise
        state.write_meta(status="ready", ready=time.time(), up_seconds=round(time.monotonic() - t0, 1), **info)
        state.close()
        return state

    def _build(self, spec: Spec, state: LabState, macs: dict, facts: dict, say, start_servers: bool,
               times: dict, t0: float) -> dict:
        state.record("hosts", nodes=[n.name for n in spec.nodes])
        tar = build_payload(spec, state.dir / "payload", tuple(facts[spec.nodes[0].name]["python"]))
        times["payload"] = round(time.monotonic() - t0, 1)
        say(f"building {len(spec.nodes)} node(s) on their hosts …")

        def one(node: str) -> dict:
            out = RemoteNode(self.machine(spec.name, node), spec, node).build(tar, macs[node], start_servers,
                                                                              host=True)
            out["host_seconds"] = round(time.monotonic() - t0, 1)
            return out

        results = list(each_host(spec, one).values())
        times["nodes"] = {r["node"]: r["host_seconds"] for r in results}
        times["total"] = round(time.monotonic() - t0, 1)
        hosts = {n.name: {k: facts[n.name][k] for k in ("hostname", "kernel", "python")} | {
            "ssh": spec.inventory.hosts[n.name].ssh, "management": spec.inventory.hosts[n.name].management,
            "nics": dict(spec.inventory.hosts[n.name].nics)} for n in spec.nodes}
        return {"times": times, "kernels": {r["node"]: r["kernel"] for r in results},
                "nodes": {r["node"]: r for r in results}, "hosts": hosts}

    # ------------------------------------------------------------ down
    def _close_masters(self, spec_or_lab) -> int:
        lab = spec_or_lab if isinstance(spec_or_lab, str) else spec_or_lab.name
        n = 0
        folder = LabState(lab).dir
        for sock in folder.glob("cm-*") if folder.exists() else []:
            try:
                self.machine(lab, sock.name[3:]).close(timeout=15)
                n += 1
            except (subprocess.TimeoutExpired, OSError, BackendError):
                pass
        return n

    def down(self, name: str, forget: bool = False, say=None) -> dict[str, int]:
        """Restore every host of lab ``name`` from its record; the lab's local state goes only when all
        hosts answered (an unreachable host keeps it: `labkit down` again once it is back).

        ``forget`` (``labkit down --forget``, for a host that is gone for good): the hosts that
        answer are restored as always; one that cannot be reached is given up, the lab's local state
        goes all the same, and ``say`` (default: stderr) names each such host with what stays there
        and the one command that restores it if it ever comes back (the record is in a tmpfs: a
        reboot drops it with everything labkit changed in the kernel). A host that answered but
        failed to restore is not forgotten: that is an error to look at, not an absence."""
        state = LabState(name)
        counts = {"hosts": 0, "links": 0, "routes": 0, "rules": 0, "sysctls": 0, "netfilter": 0, "processes": 0}
        if forget:
            counts["forgotten"] = 0
        if not state.exists:
            return counts
        close_datapaths(name)
        try:
            spec = state.spec()
        except Exception:  # noqa: BLE001 - a state folder without its spec: nothing to reach
            state.remove()
            return counts
        if not self.ssh_config(name).exists():
            self.ssh_config(name).write_text(ssh_config_text(spec, state.dir))
        # the payload's folder goes, or only its contents where it is a mount point (labkit's VM box)
        root = payload.REMOTE_ROOT
        cmd = (f"if [ -d {root}/lib/labkit ]; then {payload.agent_command('host-down', '--lab', name)} || exit $?; fi; "
               f"rm -rf {payload.RUN_DIR} && if [ -d {root} ]; then find {root} -mindepth 1 -delete && "
               f"{{ mountpoint -q {root} || rmdir {root}; }}; fi")

        def one(node: str) -> dict:
            proc = self.machine(name, node).run(cmd, check=False, timeout=DOWN_TIMEOUT)
            if proc.returncode != 0:
                unreached = proc.returncode == 255  # ssh's own status: the host was not reached
                raise (_Unreached if unreached else BackendError)(
                    f"host of node {node}: `host-down` exited {proc.returncode}: "
                    f"{(proc.stderr or proc.stdout).strip()[-600:]}")
            lines = proc.stdout.strip().splitlines()
            return json.loads(lines[-1]) if lines else {}

        failures, reports, unreached = [], {}, {}
        with ThreadPoolExecutor(len(spec.nodes)) as pool:
            futures = {n.name: pool.submit(one, n.name) for n in spec.nodes}
            for node, fut in futures.items():
                try:
                    reports[node] = fut.result()
                except (BackendError, subprocess.TimeoutExpired, OSError) as exc:
                    if forget and isinstance(exc, (_Unreached, subprocess.TimeoutExpired, OSError)):
                        unreached[node] = str(exc)
                    else:
                        failures.append(f"{node}: {exc}")
        for node, rep in reports.items():
            if "error" in rep:
                failures.append(f"{node}: {rep['error']}")
                continue
            counts["hosts"] += 1
            for k in ("links", "routes", "rules", "sysctls", "netfilter", "processes"):
                counts[k] += rep.get(k, 0)
            if rep.get("left"):
                failures.append(f"{node}: restored, except: " + "; ".join(rep["left"]))
        self._close_masters(name)
        for node, why in unreached.items():
            counts["forgotten"] += 1
            target = spec.inventory.hosts[node].ssh if spec.inventory else node
            (say or _stderr)(f"host of {node} ({target}) was not reached and is forgotten: what lab {name} changed "
                             f"there stays until it reboots or, back, runs as root: "
                             f"{payload.agent_command('host-down', '--lab', name)} && rm -rf {payload.REMOTE_ROOT}  "
                             f"({why.splitlines()[0][:200]})")
        if any(not f.split(": ", 1)[1].startswith("restored, except") for f in failures):
            raise BackendError(f"lab {name} was not taken down on every host (its state is kept: run `labkit down "
                               f"{name}` again once they answer, or `labkit down {name} --forget` for a host gone "
                               f"for good):\n  " + "\n  ".join(failures))
        state.remove()
        if failures:
            raise BackendError(f"lab {name} is down, but not everything was restored:\n  " + "\n  ".join(failures))
        return counts


class _Unreached(BackendError):
    """A host's `host-down` did not run: ssh's own exit status 255 (the host could not be reached),
    as opposed to the host answering with a failure."""


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


__all__ = ["HostsBackend", "check_hosts", "host_problems", "plan", "ssh_config_text", "ssh_parts", "vpc_routes"]
