"""``pod-modes``: the Alibaba chart again — each pod network mode, same node and across nodes.

One lab: for every mode, a client pod and a server pod on node 1 and a server pod on node 2, all in
that mode (``c-<m>``, ``s-<m>``, ``r-<m>``). TCP_CRR, TCP_RR and UDP_RR with the C client, to the
server on the same node (``position=same-node``) and on the other node (``cross-node``): every such
point of every repeat is measured interleaved with all the others; then bandwidth with iperf3
(JSON output), modes in a fresh random order per repeat.
Modes the kernel lacks (``eni-ipvlan`` here) are refused up front with the doctor's message.

``backend="vagrant"`` runs the same lab on two VMs (Debian's kernel: every mode, IPVLAN included);
clients and iperf3 run inside the VMs. Under QEMU TCG the figures are functional only (a TCG
round trip is ~1 ms); with KVM (or VirtualBox on a laptop) they are a real comparison.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .. import doctor
from .. import lab as labmod
from ..backends import get_backend
from ..errors import LabkitError, MeasurementError
from .. import modes as podmodes
from ..spec import parse_spec
from . import core

def default_modes(backend: str = "netns") -> list[str]:
    """Every mode the backend's kernel has: this machine's on netns, all of them in the VMs."""
    return [m.name for m in podmodes.MODES if backend != "netns" or all(doctor.has(f) for f in m.features)]


def short(mode: str) -> str:
    return podmodes.get(mode).short


@dataclass
class PodModesParams:
    modes: list[str] = field(default_factory=default_modes)
    metrics: list[str] = field(default_factory=lambda: ["crr", "rr", "udp_rr", "bandwidth"])
    repeats: int = 3
    samples: int = 5000
    warmup: int = 300
    size: int = 64
    bandwidth_seconds: float = 3.0
    burst: int = 20  # samples per latency point per turn (all latency points are interleaved)
    seed: int = 1
    backend: str = "netns"  # netns, or vagrant (node1 and node2 are VMs)

    @classmethod
    def quick(cls) -> PodModesParams:
        return cls(repeats=3, samples=1000, warmup=100, bandwidth_seconds=1.0)

    def validate(self) -> None:
        problems = [f"modes: unknown {m!r}; expected some of {', '.join(podmodes.names())}" for m in self.modes
                    if m not in podmodes.MODES]
        problems += [f"metrics: unknown {m!r}; expected crr, rr, udp_rr, bandwidth" for m in self.metrics
                     if m not in ("crr", "rr", "udp_rr", "bandwidth")]
        if self.repeats < 1 or self.samples < 10:
            problems.append("repeats must be ≥ 1 and samples ≥ 10")
        if not 1 <= self.burst <= self.samples:
            problems.append(f"burst: must be in 1..samples ({self.samples}); 20 is a good value")
        if "bandwidth" in self.metrics and self.bandwidth_seconds < 1:
            problems.append(f"bandwidth_seconds: {self.bandwidth_seconds} is below iperf3's 1 s minimum test time")
        try:
            get_backend(self.backend)
        except LabkitError as exc:
            problems.append(f"backend: {exc}")
        if problems:
            raise LabkitError("invalid pod-modes parameters:\n  " + "\n  ".join(problems))


def lab_spec(modes: list[str], name: str = "podmodes", backend: str = "netns") -> dict:
    n1 = [{"name": f"{r}-{short(m)}", "mode": m} for m in modes for r in ("c", "s")]
    n2 = [{"name": f"r-{short(m)}", "mode": m} for m in modes]
    return {"name": name, "backend": backend, "datapath": "none", "nodes": [
        {"name": "node1", "enis": podmodes.enis_needed([p["mode"] for p in n1]), "pods": n1},
        {"name": "node2", "enis": podmodes.enis_needed([p["mode"] for p in n2]), "pods": n2}]}


class PodModes:
    name = "pod-modes"

    def setup(self, ctx: core.RunContext) -> None:
        p: PodModesParams = ctx.params
        p.validate()
        name = f"pm{ctx.run.run_id[-4:]}"  # unique per run; a resumed run finds its own
        spec = parse_spec(lab_spec(p.modes, name, p.backend))
        get_backend(p.backend).preflight(spec)  # a missing kernel feature or tool: before anything exists
        labmod.down(name)
        self.lab = labmod.up(spec, progress=False)
        ctx.run.update_manifest(labs={"pod-modes": name}, backend=p.backend, node_kernels=self.lab.kernels())

    def teardown(self, ctx: core.RunContext) -> None:
        if getattr(self, "lab", None):
            labmod.down(self.lab.name)

    def measure(self, ctx: core.RunContext) -> None:
        """Every latency point (mode × same/cross node × repeat × metric) measured interleaved (see
        :func:`labkit.experiments.core.measure_interleaved`), then bandwidth, modes in a fresh
        random order per repeat (iperf3 runs alone: it fills the CPU)."""
        p: PodModesParams = ctx.params
        rng = random.Random(p.seed)
        lat = [m for m in p.metrics if m != "bandwidth"]
        order = [(rep, mode) for rep in range(1, p.repeats + 1) for mode in rng.sample(p.modes, len(p.modes))]
        points = [self._point(mode, where, f"{server}-{short(mode)}", rep, metric) for rep, mode in order
                  for where, server in (("same-node", "s"), ("cross-node", "r")) for metric in lat]
        todo = [pt for pt in points if core.point_key(pt.full) not in ctx.done]
        bw = len(order) * 2 if "bandwidth" in p.metrics else 0
        with tqdm(total=(len(points) + bw) * p.samples, desc="pod-modes", unit="sample", unit_scale=True,
                  disable=not ctx.progress) as bar:
            bar.update((len(points) - len(todo)) * p.samples)
            if todo:
                core.measure_interleaved(ctx, todo, p.samples, p.warmup, p.size, p.burst,
                                         rng=random.Random(f"{p.seed}-lat"), on_samples=bar.update)
            for rep, mode in order if bw else ():
                for where, server in (("same-node", "s"), ("cross-node", "r")):
                    self._bandwidth(ctx, mode, where, f"{server}-{short(mode)}", rep)
                    bar.update(p.samples)

    def _row(self, mode, where, rep) -> dict:
        return {"experiment": self.name, "datapath": "none", "mode": mode, "services": 0, "position": where,
                "repeat": rep}

    def _point(self, mode, where, server, rep, metric) -> core.LatencyPoint:
        client = f"c-{short(mode)}"
        return core.LatencyPoint(self._row(mode, where, rep), metric, self.lab.pod_netns(client),
                                 self.lab.backend.pod_cgroup(self.lab.spec, client),
                                 str(self.lab.plan.pods[server].ip), 8080, self.lab, client)

    def _bandwidth(self, ctx, mode, where, server, rep) -> None:
        row = self._row(mode, where, rep)
        if core.point_key({**row, "metric": "bandwidth"}) in ctx.done:
            return
        gbps = self._iperf(f"c-{short(mode)}", server, ctx.params.bandwidth_seconds, ctx)
        core.record_value(ctx, row, "bandwidth", gbps, "Gbit/s")

    def _iperf(self, client: str, server: str, seconds: float, ctx) -> float:
        """iperf3 from pod ``client`` to pod ``server`` (wherever they run: namespaces here or in VMs),
        Gbit/s received. The server serves one test and is bounded by ``timeout``, so that it never
        outlives the measurement (killing a local ssh would not stop it inside a VM)."""
        cpus = ctx.cpus.load_cpus if ctx.cpus.pinned else None
        host = str(self.lab.plan.pods[server].ip)
        srv = self.lab.spawn(server, ["timeout", str(int(seconds) + 120), "iperf3", "-s", "-1", "-p", "5201"],
                             cpus=cpus, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            data: dict = {}
            for _ in range(50):  # the server needs a moment to listen
                res = self.lab.exec(client, ["iperf3", "-c", host, "-p", "5201", "-t", str(int(seconds)), "-J"],
                                    check=False, cpus=cpus, timeout=seconds + 60)
                data = json.loads(res.stdout or "{}")
                if "error" not in data and data:
                    return data["end"]["sum_received"]["bits_per_second"] / 1e9
                time.sleep(0.05)
            raise MeasurementError(f"iperf3 from pod {client} to {server} ({host}) failed: "
                                   f"{data.get('error') or 'no output'}")
        finally:
            if srv.poll() is None:
                srv.terminate()  # `timeout` passes SIGTERM on to iperf3
                try:
                    srv.wait(5)
                except subprocess.TimeoutExpired:
                    srv.kill()
            srv.wait()


def run(params: PodModesParams | None = None, resume: str | None = None, progress: bool = True, on_point=None):
    return core.execute(PodModes(), params or PodModesParams(), resume=resume, progress=progress,
                        on_point=on_point)
