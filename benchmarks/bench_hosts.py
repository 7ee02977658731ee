"""The hosts backend's costs and a cross-backend comparison, on two VMs standing in for hosts.

Goals (issue 15): `up` of 2 hosts that are already running ≤ 60 s, `down` ≤ 15 s; the same
service-scale run on the hosts backend and on the netns backend side by side with `labkit compare`.
The VMs are booted bare by the vagrant backend (no labkit inside); the hosts backend knows only their
ssh targets, as in tests/test_hosts_backend.py. Run as root:

    .venv/bin/python benchmarks/bench_hosts.py               # up/check/down x3, then service-scale both ways
    .venv/bin/python benchmarks/bench_hosts.py --no-runs     # up/check/down only

Prints the figures and one JSON object at the end. TCG guests: functional figures, not performance.

Measured here (2 cores, 2 bookworm VMs under QEMU TCG as hosts, 2026-12-04):

    up of 2 running hosts (inspect, preflight, payload, build)   41.5, 33.6, 24.3 s  (tests: 24.7, 25.3 s)
    labkit check (IPVLAN, exclusive ENI, veth pods, IPVS)        30/30 in 3.8-5.4 s
    down (restore both hosts to their record)                    17.2, 14.4, 15.7 s  (tests: 10.4, 12.9 s)
    service-scale, iptables-nft and iptables-legacy, N = 1 and 1,000, first/last, CRR, 3 repeats:
      on the hosts 2 min (one host per datapath), on netns 4 s;
      CRR p50 to the last service: hosts 1775.5 -> 1788.7 µs (legacy, 1.01x), 1855.0 -> 2064.7 (nft, 1.11x);
      netns 61.7 -> 67.9 (1.10x), 64.7 -> 84.6 (1.31x); labkit compare: hosts x28.1 [24.4..28.8] over the
      8 shared points (TCG's emulation), table loads x25.6.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_hosts_backend import Hosts, spec_data  # noqa: E402  (the tests' stand-in hosts)

LABKIT = [sys.executable, "-m", "labkit.cli"]


def labkit(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    out = subprocess.run([*LABKIT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"labkit {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out


def run_id(out: str) -> str:
    import re

    for found in re.findall(r"\b\d{8}-\d{6}-[a-z-]+-[0-9a-f]{4}\b", out)[::-1]:
        if (ROOT / "results" / found / "manifest.json").exists():
            return found
    raise SystemExit(f"no run id in:\n{out[-1500:]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-runs", action="store_true", help="skip the service-scale comparison")
    ap.add_argument("--services", default="1,1000")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-hosts-"))
    t0 = time.monotonic()
    vms = Hosts(tmp)
    out: dict = {"boot_s": round(time.monotonic() - t0, 1), "up_s": [], "check_s": [], "down_s": []}
    try:
        spec = tmp / "lab.yaml"
        spec.write_text(yaml.safe_dump(spec_data(vms.inventory(), name="benchhl")))
        for _ in range(args.rounds):
            t = time.monotonic()
            labkit("up", str(spec), "-q")
            out["up_s"].append(round(time.monotonic() - t, 1))
            t = time.monotonic()
            rows = json.loads(labkit("check", "benchhl", "--json").stdout)["results"]
            out["check_s"].append(round(time.monotonic() - t, 1))
            out["check"] = f"{sum(r['ok'] for r in rows)}/{len(rows)}"
            t = time.monotonic()
            labkit("down", "benchhl")
            out["down_s"].append(round(time.monotonic() - t, 1))
            print(f"up {out['up_s'][-1]} s, check {out['check']} in {out['check_s'][-1]} s, "
                  f"down {out['down_s'][-1]} s", flush=True)
        if not args.no_runs:
            inv = tmp / "hosts.yaml"
            inv.write_text(yaml.safe_dump(vms.inventory()))
            common = ["--datapaths", "iptables-nft,iptables-legacy", "--services", args.services,
                      "--positions", "first,last", "--metrics", "crr", "--samples", "300", "--warmup", "30",
                      "--repeats", "3", "--updates", "0"]
            t = time.monotonic()
            hosts_run = run_id(labkit("run", "service-scale", "--backend", "hosts", "--inventory", str(inv),
                                      *common).stdout)
            out["hosts_run_s"] = round(time.monotonic() - t, 1)
            t = time.monotonic()
            netns_run = run_id(labkit("run", "service-scale", *common).stdout)
            out["netns_run_s"] = round(time.monotonic() - t, 1)
            cmp = labkit("compare", hosts_run, netns_run, "--baseline", netns_run)
            print(cmp.stdout)
            out["runs"] = {"hosts": hosts_run, "netns": netns_run}
            out["compare"] = json.loads(labkit("compare", hosts_run, netns_run, "--baseline", netns_run,
                                               "--json").stdout)
    finally:
        vms.down()
    out["up_median_s"] = statistics.median(out["up_s"])
    out["down_median_s"] = statistics.median(out["down_s"])
    print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
