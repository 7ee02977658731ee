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

import contextlib
import json
import random
import subprocess
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from .. import doctor
from .. import lab as labmod
from ..backends import get_backend
from ..errors import MeasurementError
from .. import modes as podmodes
from ..spec import parse_spec
from . import core
from .params import Params, estimate, param

def default_modes(backend: str = "netns") -> list[str]:
    """Every mode the backend's kernel has: this machine's on netns, all of them in the VMs."""
    return [m.name for m in podmodes.MODES if backend != "netns" or all(doctor.has(f) for f in m.features)]


def short(mode: str) -> str:
    return podmodes.get(mode).short


LATENCY = ("crr", "rr", "udp_rr")
RATES = {"crr-rate": "crr", "rr-rate": "rr", "udp-rr-rate": "udp_rr"}  # metric -> lkclient mode
METRICS = (*LATENCY, *RATES, "bandwidth")


def _backend_names() -> list[str]:
    from ..backends import BACKENDS

    return BACKENDS.names()


@dataclass
class PodModesParams(Params):
    experiment = "pod-modes"
    modes: list[str] = param(default_factory=default_modes, choices=podmodes.names,
                             help="the pod network modes to compare (default: every mode this kernel has)")
    metrics: list[str] = param(default_factory=lambda: ["crr", "rr", "udp_rr", "bandwidth"], choices=METRICS,
                               help="latency (crr, rr, udp_rr), rates under load (crr-rate, rr-rate, "
                                    "udp-rr-rate) and iperf3 bandwidth")
    repeats: int = param(3, min=1, max=100, help="repeats of every point, interleaved")
    samples: int = param(5000, min=10, help="latency samples per point")
    warmup: int = param(300, min=0, help="warm-up attempts per client before measuring")
    size: int = param(64, min=1, max=65536, help="payload bytes each way")
    bandwidth_seconds: float = param(3.0, min=1, max=600, help="iperf3's test time per point")
    burst: int = param(20, min=1, help="latency samples per point per turn (every point is measured interleaved)")
    seed: int = param(1, help="random choices (orders) of the run")
    backend: str = param("netns", choices=_backend_names, help="netns, or vagrant (node1 and node2 are VMs)")
    concurrency: int = param(16, min=1, max=1024, help="connections (flows) at once for the rate metrics")
    rate_seconds: float = param(3.0, min=0.2, max=600, help="measured time per rate point, in windows "
                                                           "interleaved with the other points")
    window_ms: int = param(100, min=20, max=10000, help="a rate point's window per turn")

    @classmethod
    def quick(cls) -> PodModesParams:
        return cls(repeats=3, samples=1000, warmup=100, bandwidth_seconds=1.0)

    def estimate(self) -> dict:
        grid = len(self.modes) * 2 * self.repeats
        points = {m: grid for m in self.metrics if m != "bandwidth"}
        extra = grid * (self.bandwidth_seconds + 1) if "bandwidth" in self.metrics else 0
        if "bandwidth" in self.metrics:
            points["bandwidth"] = grid
        labs = [{"name": "pm<run>", "nodes": 2, "pods": 3 * len(self.modes)}]
        return estimate(points, self.samples, self.rate_seconds, self.backend, labs, extra_seconds=extra)

    def checks(self) -> list[str]:
        problems = []
        if self.burst > self.samples:
            problems.append(f"burst: must be at most samples ({self.samples}); 20 is a good value")
        if self.window_ms / 1000 > self.rate_seconds:
            problems.append(f"window_ms: {self.window_ms} ms is longer than rate_seconds ({self.rate_seconds} s)")
        return problems


def lab_spec(modes: list[str], name: str = "podmodes", backend: str = "netns") -> dict:
    """Node 1: a client and a server per mode; node 2: a server per mode. Each node has the ENIs its
    pods need, and pods whose slave devices may not share a parent (ipvlan, macvlan) get shared
    ENIs of their own (:func:`labkit.modes.plan_enis`)."""
    n1 = [{"name": f"{r}-{short(m)}", "mode": m} for m in modes for r in ("c", "s")]
    n2 = [{"name": f"r-{short(m)}", "mode": m} for m in modes]
    nodes = []
    for node, pods in (("node1", n1), ("node2", n2)):
        enis, picks = podmodes.plan_enis([pod["mode"] for pod in pods])
        shared_choice = len({e for e in picks if e is not None}) > 1
        for pod, eni in zip(pods, picks):
            if eni is not None and shared_choice:  # else every sharing pod takes the first shared ENI anyway
                pod["eni"] = eni
        nodes.append({"name": node, "enis": enis, "pods": pods})
    return {"name": name, "backend": backend, "datapath": "none", "nodes": nodes}


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
        :func:`labkit.experiments.core.measure_interleaved`), then every rate point interleaved
        (:func:`labkit.experiments.core.measure_rates_interleaved`), then bandwidth, modes in a fresh
        random order per repeat (iperf3 runs alone: it fills the CPU)."""
        p: PodModesParams = ctx.params
        rng = random.Random(p.seed)
        lat = [m for m in p.metrics if m in LATENCY]
        rates = [m for m in p.metrics if m in RATES]
        order = [(rep, mode) for rep in range(1, p.repeats + 1) for mode in rng.sample(p.modes, len(p.modes))]
        where = (("same-node", "s"), ("cross-node", "r"))
        points = [self._point(mode, w, f"{server}-{short(mode)}", rep, metric) for rep, mode in order
                  for w, server in where for metric in lat]
        rate_points = [self._rate_point(mode, w, f"{server}-{short(mode)}", rep, metric) for rep, mode in order
                       for w, server in where for metric in rates]
        todo = [pt for pt in points if core.point_key(pt.full) not in ctx.done]
        bw = len(order) * 2 if "bandwidth" in p.metrics else 0
        total = (len(points) + bw) * p.samples + len(rate_points) * p.rate_seconds * 10000
        with tqdm(total=total, desc="pod-modes", unit="sample", unit_scale=True, disable=not ctx.progress) as bar:
            bar.update((len(points) - len(todo)) * p.samples)
            if todo:
                with ctx.phase("latency"):
                    core.measure_interleaved(ctx, todo, p.samples, p.warmup, p.size, p.burst,
                                             rng=random.Random(f"{p.seed}-lat"), on_samples=bar.update)
            if rate_points:
                with ctx.phase("rates"):
                        core.measure_rates_interleaved(ctx, rate_points, p.rate_seconds, p.window_ms, p.concurrency,
                                                   p.size, rng=random.Random(f"{p.seed}-rates"),
                                                   on_window=lambda k: bar.update(k * p.window_ms * 10))
            with ctx.phase("bandwidth") if bw else contextlib.nullcontext():
                for rep, mode in order if bw else ():
                    for w, server in where:
                        self._bandwidth(ctx, mode, w, f"{server}-{short(mode)}", rep)
                        bar.update(p.samples)

    def _row(self, mode, where, rep) -> dict:
        return {"experiment": self.name, "datapath": "none", "mode": mode, "services": 0, "position": where,
                "repeat": rep}

    def _rate_point(self, mode, where, server, rep, metric) -> core.RatePoint:
        return core.RatePoint(self._row(mode, where, rep), metric, RATES[metric], str(self.lab.plan.pods[server].ip),
                              8080, self.lab, f"c-{short(mode)}")

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
