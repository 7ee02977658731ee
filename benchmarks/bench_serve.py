"""The labkit daemon under a classroom's load: participants as real other uids (setpriv), talking to a
daemon of this benchmark on its own socket.

1. ``--participants`` (default 10) each bring up a 2-node, 6-pod lab at the same moment: the time
   until the last is up (the issue's goal: within 30 s here), each participant's own time, and a
   check of every lab.
2. Two measurement runs asked for at the same moment (a small service-scale run, ebpf and
   iptables-nft to the last of 1,000 services): they take the measurement CPUs one after the other;
   their figures against the same run done alone (ratio per datapath; the goal: within ±3 %).

Everything made is removed at the end, also on failure.

    .venv/bin/python benchmarks/bench_serve.py [--participants 10] [--samples 2000]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from labkit import lab as labmod  # noqa: E402
from labkit.serve.daemon import Daemon, Quota, owner_of  # noqa: E402

FIRST_UID = 64900


def spec(i: int) -> dict:
    return {"name": "room", "datapath": "iptables-nft", "nodes": [
        {"name": f"n{k}", "pods": [{"name": f"p{k}{j}", "labels": {"app": "web"}} for j in range(3)]} for k in (1, 2)],
        "services": [{"name": "web", "port": 80, "target_port": 8080, "selector": {"app": "web"}}]}


def as_user(uid: int, sock: Path, code: str, *argv: str, timeout: float = 900) -> dict:
    script = ("import json, sys, time\nfrom labkit.serve.client import Client\nc = Client(sys.argv[1])\n" + code)
    proc = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable, "-c",
                           script, str(sock), *argv], capture_output=True, text=True, timeout=timeout, cwd="/")
    if proc.returncode != 0:
        return {"error": proc.stderr[-600:]}
    return json.loads(proc.stdout.splitlines()[-1])


UP = """t0 = time.monotonic()
r = c.up(json.loads(sys.argv[2]))
t1 = time.monotonic()
ok = c.check("room")["ok"]
print(json.dumps({"up_s": t1 - t0, "ok": ok}))
"""

RUN = """events = []
c.progress = events.append
t0 = time.time()
code = c.run("service-scale", json.loads(sys.argv[2]))
print(json.dumps({"exit": code, "waited": any("ahead of yours" in e for e in events), "t0": t0, "t1": time.time()}))
"""


def run_argv(samples: int) -> list[str]:
    return ["-q", "--no-report", "--datapaths", "ebpf,iptables-nft", "--services", "1000", "--positions", "last",
            "--samples", str(samples), "--repeats", "3", "--updates", "0"]


def p50s(folder: Path) -> dict[str, float]:
    import pandas as pd

    (run,) = sorted(p for p in folder.iterdir() if p.is_dir())[-1:]
    pts = pd.read_csv(run / "points.csv")
    pts = pts[pts.metric == "crr"]
    return pts.groupby("datapath")["p50_us"].median().to_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--participants", type=int, default=10)
    ap.add_argument("--samples", type=int, default=2000)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="lkbench-serve-", dir="/tmp"))
    folder.chmod(0o755)
    daemon = Daemon(folder / "labkit.sock", "instructor", Quota(labs=1, nodes=2, pods=6), max_clients=64,
                    log=lambda text: None, results=folder / "results")
    daemon.bind()
    t = threading.Thread(target=daemon.serve_forever, daemon=True)
    t.start()
    uids = [FIRST_UID + i for i in range(args.participants)]
    try:
        # 1. a room's labs at once
        out: dict[int, dict] = {}
        t0 = time.monotonic()
        threads = [threading.Thread(target=lambda u=u: out.__setitem__(u, as_user(u, daemon.path, UP,
                                                                                    json.dumps(spec(u)))))
                   for u in uids]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.monotonic() - t0
        for u, r in sorted(out.items()):
            if "error" in r:
                print(f"participant {u}: {r['error']}")
        ups = sorted(r["up_s"] for r in out.values() if "up_s" in r) or [float("nan")]
        print(f"{args.participants} participants, each a 2-node 6-pod lab at once: all up and checked in "
              f"{wall:.1f} s; up per participant {ups[0]:.1f}-{ups[-1]:.1f} s (median {ups[len(ups) // 2]:.1f}); "
              f"checks ok: {sum(r.get('ok', False) for r in out.values())}/{args.participants}")
        for r in labmod.labs():
            if owner_of(r["name"]) in uids:
                labmod.down(r["name"])

        # 2. two runs asked for together, against each alone
        alone = {}
        for u in uids[:2]:
            as_user(u, daemon.path, RUN, json.dumps(run_argv(args.samples)))
            alone[u] = p50s(daemon.results / str(u))
        runs: dict[int, dict] = {}
        threads = [threading.Thread(target=lambda u=u: runs.__setitem__(u, as_user(u, daemon.path, RUN,
                                                                                     json.dumps(run_argv(args.samples)))))
                   for u in uids[:2]]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        (a0, a1), (b0, b1) = sorted((r["t0"], r["t1"]) for r in runs.values())
        print(f"two runs asked for together: exits {[r['exit'] for r in runs.values()]}, one waited: "
              f"{sum(r['waited'] for r in runs.values()) == 1}; the second ended {b1 - a1:.1f} s after the first")
        print("TCP_CRR p50 to the last of 1,000 services (µs, medians of 3 repeats); this host's speed drifts by up to "
              "~20 % between runs minutes apart, so the ratio within a run (iptables-nft / ebpf) is the figure to "
              "compare")
        print(f"{'participant':<12} {'datapath':<14} {'alone':>8} {'together':>9} {'ratio':>6}")
        for u in uids[:2]:
            together = p50s(daemon.results / str(u))
            for dp, v in alone[u].items():
                print(f"{u:<12} {dp:<14} {v:>8.1f} {together[dp]:>9.1f} {together[dp] / v:>6.3f}")
            within = {k: d["iptables-nft"] / d["ebpf"] for k, d in (("alone", alone[u]), ("together", together))}
            print(f"{u:<12} {'nft / ebpf':<14} {within['alone']:>8.3f} {within['together']:>9.3f} "
                  f"{within['together'] / within['alone']:>6.3f}")
    finally:
        for r in labmod.labs():
            if owner_of(r["name"]) in uids:
                labmod.down(r["name"])
        daemon.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
