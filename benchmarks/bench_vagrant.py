"""The vagrant backend's costs: box build from nothing, `up` of 3 VMs from a cached box, `down`.

Goals on this 2-core machine under QEMU TCG (issue 6): box from nothing ≤ 6 min, `up` of 3 nodes from
a cached box ≤ 3 min. Each phase is timed separately; `up` is also split into its parts (host objects,
`vagrant up`, labkit inside the VMs) from the lab's meta. Run as root:

    .venv/bin/python benchmarks/bench_vagrant.py              # box from nothing (deb cache too), up, down
    .venv/bin/python benchmarks/bench_vagrant.py --keep-box   # reuse the cached box: up/check/down only
    .venv/bin/python benchmarks/bench_vagrant.py --keep-debs  # rebuild the box, reuse downloaded .debs

Prints one JSON object; `--out FILE` also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time

from labkit import box, lab
from labkit.backends import vagrant as vg
from labkit.spec import parse_spec


def spec(nodes: int = 3) -> dict:
    return {"name": "benchvm", "backend": "vagrant", "vpc_cidr": "10.30.0.0/16", "pod_cidr": "10.246.0.0/16",
            "datapath": "ipvs",
            "nodes": [{"name": f"node{i}", "enis": 1,
                       "pods": [{"name": f"web-{i}", "mode": "eni-ipvlan", "labels": {"app": "web"}},
                                {"name": f"cli-{i}", "mode": "veth"}]} for i in range(1, nodes + 1)],
            "services": [{"name": "web", "port": 80, "target_port": 8080, "selector": {"app": "web"}}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep-box", action="store_true", help="do not rebuild the box")
    ap.add_argument("--keep-debs", action="store_true", help="rebuild the box but keep debootstrap's .deb cache")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    out: dict = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "driver": vg.vm_driver()}}
    s = parse_spec(spec(args.nodes))
    lab.down(s.name) if vg.LabState(s.name).exists else None

    if not args.keep_box:
        box.remove(log=lambda *a: None)
        if not args.keep_debs:
            shutil.rmtree(box.cache_root() / "boxes" / "debs", ignore_errors=True)
        t0 = time.monotonic()
        built = box.build(log=print)
        out["box_build_s"] = round(time.monotonic() - t0, 1)
        out["box_from"] = "deb cache" if args.keep_debs else "nothing (debs downloaded from the apt mirror)"
        out["box"] = built.info()

    t0 = time.monotonic()
    lb = lab.up(s, progress=True)
    out["up_s"] = round(time.monotonic() - t0, 1)
    meta = vg.LabState(s.name).meta()
    out["up_parts_s"] = meta.get("times")
    out["vm_kernels"] = sorted(set(meta.get("kernels", {}).values()))
    t0 = time.monotonic()
    results = lb.check()
    out["check_s"] = round(time.monotonic() - t0, 1)
    out["check"] = f"{sum(r.ok for r in results)}/{len(results)} ok"
    t0 = time.monotonic()
    out["down"] = lab.down(s.name)
    out["down_s"] = round(time.monotonic() - t0, 1)
    out["goals"] = {"box_from_nothing_le_360s": out.get("box_build_s", 0) <= 360, "up_cached_le_180s": out["up_s"] <= 180}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
