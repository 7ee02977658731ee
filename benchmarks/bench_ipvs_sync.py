"""The ipvs datapath's sync costs inside a VM: load of N services, one added service at N, a full resync.

Each step is timed as a whole (the datapath's own ``SyncResult.seconds``) and command by command
(every ``ctx.run``), so the Python part is the difference; ``--profile`` adds cProfile's top functions.
The datapath runs in the VM's own namespace, as in the lab's agent, on the lab's node (its own
ipvs state is cleaned up first and at the end). Run as root on the host:

    .venv/bin/python benchmarks/bench_ipvs_sync.py                  # a 1-VM lab of its own, up and down
    .venv/bin/python benchmarks/bench_ipvs_sync.py --lab L --node N # a lab already up (left up)
    .venv/bin/python benchmarks/bench_ipvs_sync.py --services 5000 --profile

Measured here (2 cores, QEMU TCG, Debian 6.1 guest, 26 Nov 2026; 3 endpoints a service):

    5,000 services  before              partial sync (e6243d3)       + IPVS over netlink
    load            43.6 s              21.0 s (ip -batch 2.6,       8.3-8.7 s (IPVS 4.6-4.8 s in
                                        ipset 1.8, ipvsadm -R        Python and the kernel)
                                        10.8-15.7)
    +1 service      6.5 s (5.9-6.2 s    0.39-0.64 s (five commands   0.25-0.42 s (ip -batch, ipset,
                    listing the 5k      of 50-210 ms)                iptables-save, -restore)
                    dummy addresses
                    with pyroute2)
    full resync     12.7 s              7.4-7.7 s                    6.4-8.0 s (ipvsadm-save 3.9-4.6 s,
                                                                     ipset 1.3-1.7 s)

service-scale (--services 1,5000 --backend vagrant --datapaths ipvs): load 5,000 62 s -> 15.5 s ->
6.1 s; one update at 5,000 9.1 s -> 0.30-0.40 s -> 0.24-0.39 s.

kube-ipvs0's addresses through rtnetlink (one RTM_GETADDR dump, batched RTM_NEWADDR/DELADDR) instead
of ``ip -o address show`` / ``ip -batch``: load 5,000 5.2 s (commands 1.7 s: ipset restore 1.5 s),
+1 service 0.21-0.35 s, full resync 6.6 s (ipvsadm-save 4.0 s, ipset 1.4 s).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

INSIDE = r'''
import cProfile, io, ipaddress, pstats, subprocess, sys, time
from pathlib import Path
from labkit import nsexec
from labkit.datapath import NodeContext, get
from labkit.services import Endpoint, ServicePort, ServiceTable, TableDiff

N, UPDATES, PROFILE = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
BASE = int(ipaddress.IPv4Address("10.96.0.10"))
EPS = tuple(Endpoint(f"10.246.0.{10 + k}", 8080, f"be-{k}") for k in range(3))

def service(k):  # as service-scale's bulk_service
    return ServicePort("scale", f"svc-{k}", "", "TCP", str(ipaddress.IPv4Address(BASE + k)), 80, EPS)

ctx = NodeContext(lab="bench", prefix="lk-bench", node="n0", netns=None, pod_cidr="10.246.0.0/16",
                  service_cidr="10.96.0.0/12", state_dir=Path("/tmp/bench-ipvs"))
calls, run = [], nsexec.run
def timed(argv, *a, **kw):
    t = time.perf_counter()
    try:
        return run(argv, *a, **kw)
    finally:
        calls.append((" ".join(argv[:2]), time.perf_counter() - t, len(kw.get("input") or "")))
nsexec.run = timed

def step(label, fn):
    calls.clear()
    prof = cProfile.Profile() if PROFILE else None
    if prof: prof.enable()
    res = fn()
    if prof: prof.disable()
    cmds = sum(c[1] for c in calls)
    print(f"== {label}: {res.seconds:.3f} s (commands {cmds:.3f} s, Python {res.seconds - cmds:.3f} s)")
    for argv, took, size in calls:
        print(f"   {took * 1000:9.1f} ms  {argv}  (input {size} B)")
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(20)
        print(out.getvalue())

dp = get("ipvs")(ctx)
dp.cleanup()
table = ServiceTable.of(service(k) for k in range(N))
dp.sync(ServiceTable())
step(f"load {N}", lambda: dp.sync(table))
for k in range(UPDATES):
    extra = service(N + k)
    table = table.with_ports(extra)
    step(f"update +1 at {len(table) - 1}", lambda: dp.sync_changes(table, TableDiff(added=(extra,))))
step(f"full resync at {len(table)}", lambda: dp.sync_changes(table, TableDiff(added=tuple(table), full=True)))
vs = subprocess.run(["ipvsadm", "-Ln"], capture_output=True, text=True).stdout.count("TCP ")
addrs = subprocess.run(["ip", "-o", "-4", "address", "show", "dev", "kube-ipvs0"], capture_output=True,
                       text=True).stdout.count(" inet ")
print(f"kernel: {vs} virtual servers, {addrs} addresses on kube-ipvs0 (want {len(table)})")
dp.cleanup()
'''

SPEC = """name: {name}
backend: vagrant
vpc_cidr: 10.21.0.0/16
pod_cidr: 10.246.0.0/16
datapath: ipvs
nodes:
  - name: n0
    pods:
      - {{name: web-0, mode: veth, labels: {{app: web}}}}
services:
  - {{name: web, port: 80, target_port: 8080, selector: {{app: web}}}}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lab", help="a vagrant lab already up (default: one of its own, removed at the end)")
    ap.add_argument("--node", default="n0")
    ap.add_argument("--services", type=int, default=5000)
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()

    from labkit import lab as labmod
    from labkit.backends.vagrant import VM_ENV, VagrantBackend

    own = a.lab is None
    name = a.lab or "ipvsbench"
    if own:
        spec_path = Path(f"/tmp/{name}.yaml")
        spec_path.write_text(SPEC.format(name=name))
        labmod.up(str(spec_path))
    try:
        argv = VagrantBackend().ssh_argv(name, a.node, f"env {VM_ENV} python3 -B - {a.services} {a.updates} "
                                         f"{int(a.profile)}")
        return subprocess.run(argv, input=INSIDE, text=True).returncode
    finally:
        if own:
            labmod.down(name)


if __name__ == "__main__":
    sys.exit(main())
