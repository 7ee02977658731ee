"""``pod-modes``: the Alibaba chart again — each pod network mode, same node and across nodes.

One lab: for every mode, a client pod and a server pod on node 1 and a server pod on node 2, all in
that mode (``c-<m>``, ``s-<m>``, ``r-<m>``). In every repeat the modes are measured in a fresh random
order: TCP_CRR, TCP_RR and UDP_RR with the C client, and bandwidth with iperf3 (JSON output), to the
server on the same node (``position=same-node``) and on the other node (``cross-node``).
Modes the kernel lacks (``eni-ipvlan`` here) are refused up front with the doctor's message.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .. import doctor
from .. import lab as labmod
from .. import nsexec
from ..errors import LabkitError, MeasurementError
from ..spec import MODES, parse_spec
from . import core

SHORT = {"eni-exclusive": "ex", "eni-ipvlan": "iv", "eni-policy-route": "pr", "veth": "ve", "bridge": "br",
         "overlay": "ov", "macvlan": "mv"}
DEFAULT_MODES = ("eni-exclusive", "eni-ipvlan", "eni-policy-route", "veth", "bridge", "overlay", "macvlan")


@dataclass
class PodModesParams:
    modes: list[str] = field(default_factory=lambda: [m for m in DEFAULT_MODES
                                                      if m != "eni-ipvlan" or doctor.has("ipvlan")])
    metrics: list[str] = field(default_factory=lambda: ["crr", "rr", "udp_rr", "bandwidth"])
    repeats: int = 3
    samples: int = 5000
    warmup: int = 300
    size: int = 64
    bandwidth_seconds: float = 3.0
    seed: int = 1

    @classmethod
    def quick(cls) -> PodModesParams:
        return cls(repeats=3, samples=1000, warmup=100, bandwidth_seconds=1.0)

    def validate(self) -> None:
        problems = [f"modes: unknown {m!r}; expected some of {', '.join(MODES)}" for m in self.modes if m not in MODES]
        problems += [f"metrics: unknown {m!r}; expected crr, rr, udp_rr, bandwidth" for m in self.metrics
                     if m not in ("crr", "rr", "udp_rr", "bandwidth")]
        if self.repeats < 1 or self.samples < 10:
            problems.append("repeats must be ≥ 1 and samples ≥ 10")
        if "bandwidth" in self.metrics and self.bandwidth_seconds < 1:
            problems.append(f"bandwidth_seconds: {self.bandwidth_seconds} is below iperf3's 1 s minimum test time")
        if problems:
            raise LabkitError("invalid pod-modes parameters:\n  " + "\n  ".join(problems))


def lab_spec(modes: list[str], name: str = "podmodes") -> dict:
    exclusive = "eni-exclusive" in modes
    shared = any(m in modes for m in ("eni-ipvlan", "eni-policy-route", "macvlan"))
    n1 = [{"name": f"{r}-{SHORT[m]}", "mode": m} for m in modes for r in ("c", "s")]
    n2 = [{"name": f"r-{SHORT[m]}", "mode": m} for m in modes]
    return {"name": name, "datapath": "none", "nodes": [
        {"name": "node1", "enis": 2 * exclusive + shared, "pods": n1},
        {"name": "node2", "enis": exclusive + shared, "pods": n2}]}


class PodModes:
    name = "pod-modes"

    def setup(self, ctx: core.RunContext) -> None:
        p: PodModesParams = ctx.params
        p.validate()
        name = f"pm{ctx.run.run_id[-4:]}"  # unique per run; a resumed run finds its own
        labmod.down(name)
        self.lab = labmod.up(parse_spec(lab_spec(p.modes, name)), progress=False)
        ctx.run.update_manifest(labs={"pod-modes": name})

    def teardown(self, ctx: core.RunContext) -> None:
        if getattr(self, "lab", None):
            labmod.down(self.lab.name)

    def measure(self, ctx: core.RunContext) -> None:
        p: PodModesParams = ctx.params
        rng = random.Random(p.seed)
        total = p.repeats * len(p.modes) * 2 * len(p.metrics)
        with tqdm(total=total, desc="pod-modes", unit="pt", disable=not ctx.progress) as bar:
            for rep in range(1, p.repeats + 1):
                for mode in rng.sample(p.modes, len(p.modes)):
                    for where, server in (("same-node", "s"), ("cross-node", "r")):
                        for metric in p.metrics:
                            self._point(ctx, mode, where, f"{server}-{SHORT[mode]}", rep, metric)
                            bar.update()

    def _point(self, ctx, mode, where, server, rep, metric) -> None:
        p: PodModesParams = ctx.params
        row = {"experiment": self.name, "datapath": "none", "mode": mode, "services": 0, "position": where,
               "repeat": rep}
        if core.point_key({**row, "metric": metric}) in ctx.done:
            return
        client = f"c-{SHORT[mode]}"
        host = str(self.lab.plan.pods[server].ip)
        netns, cgroup = self.lab.pod_netns(client), self.lab.backend.pod_cgroup(self.lab.spec, client)
        if metric == "bandwidth":
            gbps = self._iperf(netns, self.lab.pod_netns(server), host, p.bandwidth_seconds, ctx)
            core.record_value(ctx, row, "bandwidth", gbps, "Gbit/s")
        else:
            core.measure_latency(ctx, netns, cgroup, metric, host, 8080, row, p.samples, p.warmup, p.size)

    def _iperf(self, client_ns: str, server_ns: str, host: str, seconds: float, ctx) -> float:
        cpus = ctx.cpus.load_cpus if ctx.cpus.pinned else None
        server = nsexec.spawn(["iperf3", "-s", "-1", "-p", "5201"], server_ns, cpus=cpus)
        try:
            out = None
            for _ in range(50):  # the server needs a moment to listen
                res = nsexec.run(["iperf3", "-c", host, "-p", "5201", "-t", str(seconds), "-J"], client_ns,
                                 check=False, cpus=cpus, timeout=seconds + 30)
                data = json.loads(res.stdout or "{}")
                if "error" not in data:
                    out = data
                    break
                time.sleep(0.05)
            if out is None:
                raise MeasurementError(f"iperf3 to {host} failed: {data.get('error')}")
            return out["end"]["sum_received"]["bits_per_second"] / 1e9
        finally:
            server.kill()
            server.wait()


def run(params: PodModesParams | None = None, resume: str | None = None, progress: bool = True, on_point=None):
    return core.execute(PodModes(), params or PodModesParams(), resume=resume, progress=progress,
                        on_point=on_point)
