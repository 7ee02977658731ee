"""A live lab: build it, open it by name, run commands in its pods, check it, tear it down.

:func:`up` realises a spec with its backend and returns a :class:`Lab`; :func:`open_lab` re-opens a
lab another process built (its spec and backend are in its state folder); :func:`down` removes one.
:meth:`Lab.check` opens real TCP connections between every pair of pods and to every Service (through
its ClusterIP, from every pod whose traffic the datapath can see) and to every Service backend.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from . import addressing, modes, naming, nsexec
from .backends import get_backend
from .datapath import get as get_datapath
from .errors import LabStateError, NoSuchLab, UsageError
from .services import ServiceTable, table_from_spec
from .spec import Spec, load_spec, validate
from .state import LabState, list_labs

SERVER_PORT = 8080
BULK_SAMPLE = 5
POLICY_TIMEOUT = 1.0  # a policy row's connection timeout: a denied connection waits this long


@dataclass
class CheckResult:
    kind: str  # "pod" (pod to pod), "service" (through the ClusterIP), "backend" (to an endpoint directly),
    # "policy" (pod to pod on one port under the spec's NetworkPolicies: expected/observed allow or deny)
    src: str
    dst: str  # pod name, or "ns/service"
    host: str
    port: int
    proto: str
    ok: bool
    expected: str  # "reach <pod>", "one of <pods>", "refused"
    observed: str


class Lab:
    """A lab that exists (built by this or another process)."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.backend = get_backend(spec.backend)
        self.plan = addressing.plan(spec)

    @property
    def name(self) -> str:
        return self.spec.name

    def services(self) -> ServiceTable:
        return table_from_spec(self.spec, self.plan)

    def pod_netns(self, pod: str) -> str:
        return self.backend.pod_netns(self.spec, pod)

    def exec(self, pod: str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run a command inside a pod (its namespace and cgroup) and wait for it, like ``docker exec``."""
        return self.backend.pod_run(self.spec, pod, list(argv), **kw)

    def spawn(self, pod: str, argv: Sequence[str], **popen) -> subprocess.Popen:
        """Start a command inside a pod without waiting (stdio as for :class:`subprocess.Popen`).
        ``argv[0] == sys.executable`` means labkit's Python, whichever machine the pod is on."""
        return self.backend.pod_spawn(self.spec, pod, list(argv), **popen)

    def run_client(self, pod: str, mode: str, host: str, port: int, **kw) -> dict:
        """Run the load client (``lkclient``, a ``mode`` of :data:`labkit.measure.loadgen.MODES`) once in
        ``pod`` and return its JSON result, wherever the pod runs; ``raw_path`` (a path on this machine)
        receives the raw samples, also when the client fails (:class:`MeasurementError` carries the
        partial result in ``.result``). Options as :func:`labkit.measure.loadgen.run_client`."""
        return self.backend.run_client(self.spec, pod, mode, host, port, **kw)

    def client_session(self, pod: str, cpus=None):
        """One ``lkclient --serve`` kept in ``pod`` for many measurements
        (:class:`labkit.measure.loadgen.ClientSession`: ``run(mode, host, port, …)``, ``close()``),
        wherever the pod runs; ``raw_path`` of each run is a path on this machine. ``cpus`` (the load
        CPUs of this machine's plan) applies where the pod runs on this machine."""
        return self.backend.client_session(self.spec, pod, cpus)

    def datapath(self, node: str, name: str, **options):
        """Service datapath ``name`` programming ``node`` (``sync``, ``sync_changes``, ``cleanup``,
        ``describe``, ``chain_order``, ``walk``), whether the node is a namespace here or a VM (then it
        runs in the VM, driven from here). ``options``: the class's keywords (``Datapath.options``)."""
        return self.backend.datapath(self.spec, node, name, self.plan, **options)

    def kernels(self) -> dict[str, str]:
        """The kernel release each node runs (this machine's on the netns backend)."""
        return self.backend.kernels(self.spec)

    def down(self) -> dict:
        return self.backend.down(self.name)

    def inspect(self) -> dict:
        """Everything about the lab as plain data: nodes (NICs, subnets, kernel, datapath state),
        pods (address, mode, NIC, node-side interface, server), the Service table's size and the
        policies (``labkit inspect``)."""
        spec, plan = self.spec, self.plan
        kernels = self.kernels()
        nodes = []
        for node in spec.nodes:
            np_ = plan.nodes[node.name]
            try:
                state = self.datapath(node.name, spec.datapath).describe() if spec.datapath != "none" else {}
            except Exception as exc:  # noqa: BLE001 - inspecting must not fail on one node's datapath
                state = {"error": str(exc)}
            nodes.append({"name": node.name, "kernel": kernels.get(node.name, ""),
                          "nics": ", ".join(f"{n.ifname} {n.ip}" for n in np_.nics),
                          "pod_subnet": str(np_.native_subnet), "overlay_subnet": str(np_.overlay_subnet or ""),
                          "datapath_state": ", ".join(f"{k}={v}" for k, v in state.items()
                                                      if k not in ("datapath", "node")),
                          "datapath": state})
        pods = []
        for node, pod in spec.pods():
            pp = plan.pods[pod.name]
            server = spec.server_of(pod)
            pods.append({"name": pod.name, "node": node.name, "mode": pod.mode, "ip": f"{pp.ip}/{pp.prefixlen}",
                         "gateway": str(pp.gateway), "mtu": pp.mtu,
                         "via": plan.nodes[node.name].nics[pp.nic].ifname if pp.nic is not None else "node",
                         "node_iface": modes.get(pod.mode).host_ifname(pod.name) or "-",
                         "server": server.kind + (f":{server.serves}" if server.serves else ""),
                         "labels": ",".join(f"{k}={v}" for k, v in pod.labels.items())})
        return {"name": spec.name, "backend": spec.backend, "datapath": spec.datapath, "vpc": str(plan.vpc),
                "vpc_gateway": str(plan.vpc_gateway), "pod_cidr": str(plan.pod_cidr),
                "service_cidr": spec.service_cidr, "services": len(self.services()),
                "policies": sum(p.count or 1 for p in spec.policies), "policy_engine": spec.policy_engine,
                "nodes": nodes, "pods": pods}

    # ------------------------------------------------------------ check
    @nsexec.outside_event_loop
    def check(self, services: bool = True, seed: int = 0) -> list[CheckResult]:
        """Real connections: every pod to every other pod, every service through its ClusterIP from
        every pod that can use it, and every service backend directly. One probe process per pod."""
        plan = self.plan.pods
        jobs: dict[str, list[tuple[dict, CheckResult]]] = {p.name: [] for _, p in self.spec.pods()}
        if self.spec.policies:
            self._policy_jobs(jobs)
        else:
            for src in jobs:
                for dst, pp in plan.items():
                    if dst != src:
                        jobs[src].append(self._job(src, "pod", dst, str(pp.ip), SERVER_PORT, "tcp",
                                                   self._expect([dst], SERVER_PORT)))
        if services:
            self._service_jobs(jobs, random.Random(seed))
        todo = {src: [t for t, _ in items] for src, items in jobs.items() if items}
        answers = self._run_probes(todo)
        # one retry of what failed, alone and slower: a timeout on a loaded 2-CPU machine is not a
        # routing bug, while a real fault fails twice
        failed = {src: [i for i, r in res.items() if not _judge(_copy(jobs[src][i][1]), r).ok]
                  for src, res in answers.items()}
        again = self._run_probes({src: [dict(jobs[src][i][0], timeout=3.0) for i in ids]
                                  for src, ids in failed.items() if ids}, parallel=2)
        for src, res in again.items():
            for k, r in res.items():
                answers[src][failed[src][k]] = r
        return [_judge(jobs[src][i][1], r) for src, res in answers.items() for i, r in sorted(res.items())]

    def _run_probes(self, todo: dict[str, list[dict]], parallel: int = 8) -> dict[str, dict[int, dict]]:
        """Run one probe process per source pod, at most ``parallel`` at once; answers by target index."""
        answers: dict[str, dict[int, dict]] = {}
        pending = list(todo.items())
        running: list[tuple[str, subprocess.Popen, str]] = []
        while pending or running:
            while pending and len(running) < parallel:
                src, targets = pending.pop(0)
                payload = json.dumps([dict(t, id=i) for i, t in enumerate(targets)])
                proc = self._probe(src)
                proc.stdin.write(payload)
                proc.stdin.close()
                running.append((src, proc, payload))
            src, proc, _ = running.pop(0)
            out = proc.stdout.read()
            err = proc.stderr.read()
            if proc.wait(timeout=120) != 0:
                raise LabStateError(f"probe in pod {src} failed: {err.strip()[-500:]}")
            answers[src] = {r["id"]: r for r in json.loads(out)}
        return answers

    def _policy_jobs(self, jobs) -> None:
        """The policy matrix: every ordered pod pair × matrix port, expected from the model's oracle
        (:class:`labkit.policy.model.Oracle`), observed with a real connection: a reply or a refusal
        means the packets got through (allow), a timeout that they were dropped (deny)."""
        from .policy.model import Oracle, matrix_ports

        oracle = Oracle(self.spec, self.plan)
        for proto, port in matrix_ports(self.spec):
            for src in jobs:
                for dst, pp in self.plan.pods.items():
                    if dst != src:
                        want = "allow" if oracle.allowed(src, dst, port, proto) else "deny"
                        job, row = self._job(src, "policy", dst, str(pp.ip), port, proto.lower(), want)
                        jobs[src].append((dict(job, timeout=POLICY_TIMEOUT), row))

    def _policy_admits(self, src: str, sp) -> bool:
        """Service rows under policies: only from clients whose egress is not isolated (engines may
        see the ClusterIP before translation) and whom every endpoint admits."""
        if not self.spec.policies:
            return True
        from .policy.model import EGRESS, Oracle

        oracle = getattr(self, "_oracle", None) or Oracle(self.spec, self.plan)
        self._oracle = oracle
        return not oracle.isolated(src, EGRESS) and all(
            e.pod and oracle.allowed(src, e.pod, e.port, sp.protocol) for e in sp.endpoints)

    def _expect(self, pods: list[str], port: int) -> str:
        """What a connection to ``port`` of one of ``pods`` should meet, by what serves there
        (:mod:`labkit.workloads`): "reach <pod>" / "one of <pods>" (the server says its name), "a
        reply from <pods>" (a user's server: any reply), or "refused" (nothing serves there)."""
        ports = set(self._server_ports())
        answers = {self.spec.server_of(self.spec.pod(p)[1]).answers(port, ports) for p in pods}
        if answers == {"refused"}:
            return "refused"
        if answers == {"name"}:
            return f"reach {pods[0]}" if len(pods) == 1 else f"one of {','.join(pods)}"
        return f"a reply from {','.join(pods)}"

    def _server_ports(self) -> list[int]:
        from .node import NodeRuntime

        if not hasattr(self, "_ports"):
            self._ports = NodeRuntime(self.spec, self.spec.nodes[0].name, self.plan).server_ports()
        return self._ports

    def _job(self, src, kind, dst, host, port, proto, expected):
        probe = {"host": host, "port": port, "proto": proto}
        if expected.startswith("a reply"):
            probe["expect"] = "any"
        return probe, CheckResult(kind, src, dst, host, port, proto, False, expected, "")

    def _service_jobs(self, jobs, rng: random.Random) -> None:
        table = list(self.services())
        explicit = {(s.namespace, s.name) for s in self.spec.services if not s.bulk}
        chosen = [sp for sp in table if (sp.namespace, sp.name) in explicit]
        bulk = [sp for sp in table if (sp.namespace, sp.name) not in explicit]
        if bulk:
            picks = {0, len(bulk) - 1} | set(rng.sample(range(len(bulk)), min(BULK_SAMPLE, len(bulk))))
            chosen += [bulk[i] for i in sorted(picks)]
        datapath = get_datapath(self.spec.datapath)
        # only pods whose ClusterIP traffic the datapath sees (kube-proxy never sees an IPVLAN pod's)
        clients = [p.name for _, p in self.spec.pods() if modes.get(p.mode).served_by(datapath)]
        for sp in chosen:
            eps = sorted({e.pod for e in sp.endpoints})
            expected = self._expect(eps, sp.endpoints[0].port) if eps else "refused"
            tries = max(4, 2 * len(eps)) if eps else 2
            for src in [c for c in clients if self._policy_admits(c, sp)]:
                for _ in range(tries):
                    jobs[src].append(self._job(src, "service", sp.key, sp.cluster_ip, sp.port, sp.proto, expected))
            admitted = [c for c in clients if self._policy_admits(c, sp)]
            if self.spec.policies and not admitted:
                continue
            src = admitted[0] if admitted else next(iter(jobs))
            for ep in sp.endpoints:
                if ep.port != SERVER_PORT or sp.protocol != "TCP":
                    jobs[src].append(self._job(src, "backend", sp.key, ep.ip, ep.port, sp.proto,
                                               self._expect([ep.pod], ep.port)))

    def _probe(self, pod: str) -> subprocess.Popen:
        return self.spawn(pod, [sys.executable, "-m", "labkit.probe"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _copy(row: CheckResult) -> CheckResult:
    return CheckResult(**asdict(row))


def _judge(row: CheckResult, res: dict) -> CheckResult:
    if row.kind == "policy":  # got through (answered or refused) = allow; no answer = deny
        # EPERM: the pod's own OUTPUT chain dropped it (a firewall drop reported to the local sender)
        dropped = not res["ok"] and res["error"] in ("timeout", "Operation not permitted")
        row.observed = "deny" if dropped else "allow"
        row.ok = row.observed == row.expected
        return row
    if row.expected == "refused":
        row.ok = not res["ok"] and res["error"] != "timeout"
        row.observed = res["error"] or f"answered by {res['backend']}"
    elif row.expected.startswith("one of "):
        allowed = row.expected[len("one of "):].split(",")
        row.ok = res["ok"] and res["backend"] in allowed
        row.observed = res["backend"] if res["ok"] else res["error"]
    elif row.expected.startswith("a reply"):  # a server of the user's: anything it answers will do
        row.ok = res["ok"]
        row.observed = f"a reply ({res['backend'][:30]!r})" if res["ok"] else res["error"]
    else:
        want = row.expected[len("reach "):]
        row.ok = res["ok"] and res["backend"] == want
        row.observed = res["backend"] if res["ok"] else res["error"]
    return row


def results_json(results: list[CheckResult]) -> list[dict]:
    return [asdict(r) for r in results]


def services_json(table) -> list[dict]:
    """A service table as `labkit services` lists it: name, ClusterIP, port, protocol, endpoints."""
    return [{"name": sp.key, "cluster_ip": sp.cluster_ip, "port": sp.port, "protocol": sp.protocol,
             "endpoints": [f"{e.ip}:{e.port}" + (f" ({e.pod})" if e.pod else "") for e in sp.endpoints]}
            for sp in table]


# ---------------------------------------------------------------- module functions

@nsexec.outside_event_loop
def up(spec: Spec | str, progress: bool = True) -> Lab:
    """Build a lab from a spec (a :class:`Spec`, validated here before anything exists, or a YAML
    file or text)."""
    from .measure.cpus import off_the_load_cpus

    if _participant():
        from .serve import participant

        return participant.up(spec, progress=progress)  # type: ignore[return-value]
    spec = validate(spec) if isinstance(spec, Spec) else load_spec(spec)
    with off_the_load_cpus():  # another lab may be measuring there
        get_backend(spec.backend).up(spec, progress=progress)
    return Lab(spec)


def _participant() -> bool:
    """Not root, and a labkit daemon serves: labs are built and used through it
    (:mod:`labkit.serve.participant`; a :class:`~labkit.serve.participant.ParticipantLab` stands for a Lab)."""
    from .serve.client import use_daemon

    return use_daemon()


def open_lab(name: str) -> Lab:
    if _participant():
        from .serve import participant

        return participant.open_lab(name)  # type: ignore[return-value]
    return Lab(LabState(name).spec())


def exists(name: str) -> bool:
    """Whether anything of lab ``name`` is on this machine: its state, or objects with its prefix."""
    if _participant():
        from .serve import participant

        return participant.exists(name)
    return LabState(name).dir.exists() or bool(nsexec.list_netns(naming.netns_name(name, "")))


@nsexec.outside_event_loop
def down(name: str, missing_ok: bool = True, forget: bool = False) -> dict:
    """Remove lab ``name``. A lab whose state folder is gone is still swept by prefix (netns backend).
    ``missing_ok=False``: :class:`NoSuchLab` when nothing of it is here. ``forget``: a lab on
    ``backend: hosts`` goes even when some of its hosts cannot be reached (gone for good); each is
    named with what stays on it (:meth:`labkit.backends.hosts.HostsBackend.down`)."""
    if _participant():
        from .serve import participant

        if forget:
            raise UsageError("--forget is for labs on your own hosts (backend: hosts), which the classroom "
                             "daemon does not run")
        return participant.down(name, missing_ok=missing_ok)
    if not missing_ok and not exists(name):
        raise NoSuchLab(f"no lab named {name!r} on this machine (see `labkit ls`; --missing-ok for scripts)")
    from .measure.cpus import off_the_load_cpus

    from .doctor import sweep_probe_namespaces

    state = LabState(name)
    backend = state.meta().get("backend", "netns") if state.exists else "netns"
    if forget and backend != "hosts":
        raise UsageError(f"--forget: lab {name} runs on backend {backend}, where nothing is out of reach; it is "
                         "for labs on backend: hosts whose host is gone for good (leave --forget out)")
    sweep_probe_namespaces()  # a probe namespace of a labkit process SIGKILLed mid-doctor (lkdoc-<pid>)
    with off_the_load_cpus():  # another lab may be measuring there
        return get_backend(backend).down(name, forget=True) if forget else get_backend(backend).down(name)


def _owner(state: LabState) -> int:
    try:
        return state.dir.stat().st_uid
    except OSError:
        return 0


def labs() -> list[dict]:
    if _participant():
        from .serve import participant

        return participant.labs()
    out = []
    for name in list_labs():
        st = LabState(name)
        try:
            meta = st.meta()
            spec = st.spec()
            out.append({"name": name, "backend": meta.get("backend"), "status": meta.get("status"),
                        "nodes": len(spec.nodes), "pods": len(spec.pods()), "datapath": spec.datapath,
                        "owner": meta.get("owner", 0)})
        except Exception as exc:  # a half-written state folder must still be listed (and removable)
            out.append({"name": name, "backend": "?", "status": f"unreadable: {exc}", "nodes": 0, "pods": 0,
                        "datapath": "?", "owner": _owner(st)})
    return out
