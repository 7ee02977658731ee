"""A node of a lab on a remote machine, seen from here: the same operations as a local node.

:class:`RemoteNode` builds the node (the payload and the agent's ``build-node`` in one ssh round
trip), runs commands in its pods (through the prebuilt ``lkexec``: namespace and cgroup, no Python
start-up on the machine), gives its Service datapaths (:class:`RemoteDatapath`, the datapath object
living in an ``agent serve`` process there) and the load client in a pod (:class:`RemoteClientSession`,
raw samples copied back here). A backend that owns machines (Vagrant VMs, hosts) only says how to
reach each one (:class:`~labkit.remote.ssh.Machine`).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ..datapath.base import NodeContext, SyncResult
from ..errors import BackendError, DatapathError
from ..measure import loadgen
from ..spec import Spec
from ..state import LabState
from . import payload
from .ssh import Machine, detached
from .wire import changes_to_json, table_to_json


class RemoteNode:
    """Node ``node`` of lab ``spec`` on ``machine``. ``cgroup``: the node's cgroup folder on the
    machine (the agent reports it when it builds the node)."""

    def __init__(self, machine: Machine, spec: Spec, node: str, cgroup: str | Path | None = None):
        self.machine, self.spec, self.node = machine, spec, node
        self.cgroup = Path(cgroup) if cgroup else None

    @property
    def lab(self) -> str:
        return self.spec.name

    # ------------------------------------------------------------ build
    def build(self, tar: Path, nics: dict[str, str], start_servers: bool = True, vm: bool = False,
              timeout: float = 900, host: bool = False) -> dict:
        """Unpack labkit on the machine and build the node with the agent. ``nics``: lab name -> MAC
        of each VPC NIC. ``vm``: a VM labkit made; ``host``: a machine it did not (recorded first, for
        ``down``). Returns the agent's report.

        The agent runs detached from the ssh connection that starts it (:func:`~.ssh.detached`), and
        a second command waits for its report: a connection that drops meanwhile (ssh's exit 255: a
        TCG guest too busy to answer keepalives, a network hiccup) is opened again and the wait goes
        on, instead of the build being lost with it. Usually both commands share one connection."""
        args = ["--spec", payload.REMOTE_SPEC, "--node", self.node, "--nics",
                ",".join(f"{n}={m}" for n, m in nics.items())]
        args += [] if start_servers else ["--no-servers"]
        args += ["--vm"] if vm else []
        args += ["--host"] if host else []
        folder = f"{payload.RUN_DIR}/build-{self.node}"
        start = payload.install_command(detached(payload.agent_command("build-node", *args), folder))
        proc = self.machine.run_detached(start, folder, stdin=tar, timeout=timeout)
        log = self._keep_log(proc.stderr + "".join(f"[labkit] the ssh connection dropped ({d}); opened again\n"
                                                   for d in proc.drops))
        if proc.returncode != 0:
            how = {3: f"it did not finish within {timeout:.0f} s",
                   255: "the ssh connection to the machine failed and did not come back"}.get(
                       proc.returncode, f"unpacking labkit there exited {proc.returncode}")
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise BackendError(f"building node {self.node} ({self.machine.label}) failed: {how}; its log is in "
                               f"{log}" + (f", ending:\n{tail}" if tail else ""))
        try:
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
            raise BackendError(f"building node {self.node} ({self.machine.label}) failed: the agent ended without "
                               f"a report; its output is in {log}" + (f", ending:\n{tail}" if tail else "")) from None
        if "error" in out:
            raise BackendError(f"node {self.node} ({self.machine.label}): {out['error']} (full trace: {log}, "
                               f"and {out.get('log') or 'the agent log'} on the machine)")
        self.cgroup = Path(out["cgroup"])
        out["ssh_drops"] = len(proc.drops)
        return out

    def _keep_log(self, text: str) -> Path:
        """The agent's stderr in this lab's log folder here (a traceback belongs there, not on a
        terminal)."""
        path = LabState(self.lab).dir / "logs" / f"agent-{self.node}-build.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
        return path

    def sync(self) -> dict:
        """Program the node's datapath again from the spec on the machine."""
        out = self.machine.run(payload.agent_command("sync", "--spec", payload.REMOTE_SPEC, "--node", self.node))
        return json.loads(out.stdout.strip().splitlines()[-1])

    # ------------------------------------------------------------ pods
    def pod_cgroup(self, pod: str) -> Path:
        if self.cgroup is None:
            raise BackendError(f"node {self.node} of lab {self.lab} has not reported its cgroup (is it built?)")
        return self.cgroup / pod

    def pod_netns(self, pod: str) -> str:
        from ..naming import netns_name

        return netns_name(self.lab, pod)

    def pod_command(self, pod: str, argv: Sequence[str]) -> str:
        """The remote shell command running ``argv`` in ``pod`` (its namespace and cgroup, as root)."""
        from .. import native

        lkexec = f"{payload.REMOTE_ROOT}/cache/bin/{native.binary('lkexec').name}"
        wrapped = [lkexec, "--cgroup", str(self.pod_cgroup(pod)), "--netns", f"/run/netns/{self.pod_netns(pod)}",
                   "--", *payload.remote_argv(list(argv))]
        return f"env {payload.REMOTE_ENV} " + " ".join(shlex.quote(str(a)) for a in wrapped)

    def pod_run(self, pod: str, argv: Sequence[str], input=None, check: bool = True, timeout: float | None = 300,
                text: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.machine.argv(self.pod_command(pod, argv)), input=input, capture_output=True,
                              text=text, timeout=timeout, stdin=subprocess.DEVNULL if input is None else None)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, list(argv), proc.stdout, proc.stderr)
        return proc

    def pod_spawn(self, pod: str, argv: Sequence[str], **popen) -> subprocess.Popen:
        """Start ``argv`` in the pod; a terminal on inherited stdin gets a remote terminal too (an
        interactive ``labkit exec``)."""
        import sys

        popen.pop("cpus", None)  # the machine's own CPUs: pinning is the machine's business
        tty = popen.get("stdin", subprocess.DEVNULL) is None and sys.stdin.isatty()
        return self.machine.popen(self.pod_command(pod, argv), tty=tty, **popen)

    # ------------------------------------------------------------ datapaths, measurement
    def context(self, plan=None) -> NodeContext:
        """The datapath's view of the node from here: ``run()`` runs on the machine."""
        from .. import addressing, topology

        plan = plan or addressing.plan(self.spec)
        return RemoteNodeContext(
            lab=self.lab, prefix=self.spec.prefix, node=self.node, netns=None, pod_cidr=self.spec.pod_cidr,
            service_cidr=self.spec.service_cidr, state_dir=Path(f"/run/labkit/{self.lab}/nodes/{self.node}"),
            cgroup=self.cgroup, pods=topology.pod_ifaces(self.spec, plan, self.node, self.pod_netns),
            node_ip=str(plan.nodes[self.node].primary.ip), machine=self.machine)

    def datapath(self, name: str, **options) -> RemoteDatapath:
        return RemoteDatapath(self, name, options)

    def client_session(self, pod: str) -> RemoteClientSession:
        return RemoteClientSession(self, pod)


class RemoteNodeContext(NodeContext):
    """A :class:`NodeContext` whose commands run on the remote machine."""

    def __init__(self, machine: Machine, **fields):
        super().__init__(**fields)
        object.__setattr__(self, "machine", machine)

    def run(self, argv, input=None, check=True, timeout=600):
        cmd = " ".join(shlex.quote(str(a)) for a in argv)
        proc = self.machine.run(cmd, input=input, check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, list(argv), proc.stdout, proc.stderr)
        return proc


class RemoteDatapath:
    """A Service datapath of a remote node, driven from here with the interface of
    :class:`labkit.datapath.base.Datapath` (``sync``, ``sync_changes``, ``cleanup``, ``describe``).

    The datapath object itself lives in one ``agent serve`` process on the machine, reached over one
    ssh channel and kept for this object's life, so that what it holds between syncs (the table last
    applied, the eBPF service ids) persists as it does in one process on the netns backend: a known
    change set is sent alone and applied as a partial sync. :class:`SyncResult`'s ``seconds`` are the
    machine's own (the apply, without the ssh round trip). Channels are closed by :meth:`close` or by
    :func:`close_datapaths` (the lab's ``down``)."""

    def __init__(self, node: RemoteNode, name: str, options: dict | None = None):
        self.remote, self.node, self.name = node, node.node, name
        self.options = dict(options or {})
        self._applied = None
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self.log_path = LabState(node.lab).dir / "logs" / f"agent-{node.node}-{name}.log"
        _OPEN_DATAPATHS.setdefault(node.lab, []).append(self)

    @property
    def applied(self):
        return self._applied

    def _channel(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                cmd = payload.agent_command("serve", "--spec", payload.REMOTE_SPEC, "--node", self.node)
                self._proc = self.remote.machine.popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                       stderr=log, text=True)
        return self._proc

    def _call(self, request: dict, timeout: float = 900) -> dict:
        request = {**request, "options": self.options}
        with self._lock:
            proc = self._channel()
            proc.stdin.write(json.dumps(request, separators=(",", ":")) + "\n")
            proc.stdin.flush()
            line = _readline(proc, timeout)
        if not line:
            raise DatapathError(f"{self.name} on node {self.node}: the agent on the machine stopped (log: "
                                f"{self.log_path})")
        reply = json.loads(line)
        if "error" in reply:
            raise DatapathError(f"{self.name} on node {self.node} (remote): {reply['error']}")
        return reply["result"]

    def sync(self, desired):
        from ..services import diff

        return self.sync_changes(desired, diff(self._applied, desired))

    def sync_changes(self, desired, changes):
        request = {"op": "sync", "datapath": self.name}
        if self._applied is None or changes.full:
            request["table"] = table_to_json(desired)
        else:
            request["changes"] = changes_to_json(changes)
        self._applied = None  # unknown until the machine says it applied
        result = SyncResult(**self._call(request))
        self._applied = desired
        return result

    def cleanup(self) -> None:
        self._call({"op": "cleanup", "datapath": self.name})
        self._applied = None

    def describe(self) -> dict:
        return self._call({"op": "describe", "datapath": self.name})

    def chain_order(self) -> list[str]:
        return self._call({"op": "chain_order", "datapath": self.name})

    def walk(self, key: str) -> dict:
        return self._call({"op": "walk", "datapath": self.name, "key": key})

    def close(self) -> None:
        """End the agent (its datapath keeps running in the machine's kernel)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if self in _OPEN_DATAPATHS.get(self.remote.lab, []):
            _OPEN_DATAPATHS[self.remote.lab].remove(self)


_OPEN_DATAPATHS: dict[str, list[RemoteDatapath]] = {}


def close_datapaths(lab: str) -> None:
    """Close the agent channels this process opened for ``lab``'s datapaths."""
    for dp in list(_OPEN_DATAPATHS.get(lab, [])):
        dp.close()


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """One line of ``proc``'s stdout, "" at EOF; kills it after ``timeout`` seconds of silence."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            return ""
    return proc.stdout.readline()


class RemoteClientSession(loadgen.ClientSession):
    """:class:`labkit.measure.loadgen.ClientSession` with its ``lkclient --serve`` in a pod of a remote
    node. Raw samples are written on the machine (``/run/labkit/<lab>/raw``) and brought here after
    every request, also when it failed (raw samples are kept before an error propagates): :meth:`run`
    fills its ``raw_path``; bursts (latency and rate) append to a file per target on the machine,
    brought over and appended to the local raw file by :meth:`collect` (when a point is finished)
    and at :meth:`close`."""

    def __init__(self, node: RemoteNode, pod: str):
        from ..native import binary

        self.node = node
        self.where = f" from pod {pod} (node {node.node}, remote)"
        self.raw_dir = f"/run/labkit/{node.lab}/raw"
        self._err = tempfile.TemporaryFile()
        self._remote_names: dict[str, str] = {}  # local raw file -> its file on the machine
        cmd = f"mkdir -p {self.raw_dir} && exec " + node.pod_command(pod, [str(binary("lkclient")), "--serve"])
        self.proc = node.machine.popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err)

    def run(self, mode: str, host: str, port: int, samples: int = 1000, warmup: int | None = None,
            size: int = 64, raw_path: Path | None = None, timeout: float | None = None, **options) -> dict:
        remote = f"{self.raw_dir}/{threading.get_ident()}-{time.monotonic_ns()}.i64" if raw_path else None
        if timeout is None:  # loadgen's, plus slower handshakes (TCG)
            per_try = (options.get("connect_timeout_ms", 1000) + options.get("timeout_ms", 1000)) / 1000
            timeout = 120 + per_try * min(samples + (warmup or 0), 1000)
        try:
            return super().run(mode, host, port, samples, warmup, size, remote, timeout, **options)
        finally:
            if raw_path:
                self.node.machine.fetch(remote, Path(raw_path))

    def _targets(self, argv, targets, what, timeout):
        """A burst (latency or rate) with each target's raw file kept on the machine, appended to
        burst after burst (one file per local raw file), until :meth:`collect` brings it over: a copy
        per point, not per burst (under TCG an ssh command costs a tenth of a second)."""
        remote = []
        for host, port, raw in targets:
            if str(raw) == os.devnull:  # warm-up: nothing to keep
                remote.append((host, port, os.devnull))
                continue
            name = self._remote_names.setdefault(str(raw), f"r{os.getpid()}-{id(self)}-{len(self._remote_names)}.i64")
            remote.append((host, port, f"{self.raw_dir}/{name}"))
        return super()._targets(argv, remote, what, timeout)

    def collect(self, raws) -> None:
        copies = [(self._remote_names.pop(str(raw)), Path(raw)) for raw in raws if str(raw) in self._remote_names]
        if copies:
            self.node.machine.fetch_append(self.raw_dir, copies)

    def close(self) -> None:
        try:
            self.collect(list(self._remote_names))  # what was taken is kept, also when a run stops
        finally:
            super().close()


__all__ = ["RemoteNode", "RemoteNodeContext", "RemoteDatapath", "RemoteClientSession", "close_datapaths"]
