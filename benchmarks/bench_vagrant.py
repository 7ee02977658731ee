"""The vagrant backend's costs: box build from nothing, `up` of 3 VMs from a cached box, `down`.

Goals on this 2-core machine under QEMU TCG (issue 6): box from nothing ≤ 6 min, `up` of 3 nodes from
a cached box ≤ 3 min. Each phase is timed separately; `up` is also split into its parts (host objects,
`vagrant up`, labkit inside the VMs) from the lab's meta. Run as root:

    .venv/bin/python benchmarks/bench_vagrant.py              # box from nothing (deb cache too), up, down
    .venv/bin/python benchmarks/bench_vagrant.py --keep-box   # reuse the cached box: up/check/down only
    .venv/bin/python benchmarks/bench_vagrant.py --keep-debs  # rebuild the box, reuse downloaded .debs

    .venv/bin/python benchmarks/bench_vagrant.py --keep-box --cpus 1   # A/B of vCPUs per VM

Prints one JSON object; `--out FILE` also writes it (and Vagrant's timestamped log to FILE.vagrant.log).
`up_parts_s` has: `host` (networks, router), `vagrant_steps` (per VM, seconds since `vagrant up` started
at which Vagrant defined, started it, saw its DHCP lease (`wait_ssh`) and its ssh (`ready`)),
`nodes` (per VM: labkit saw sshd answer, node built), `vagrant_up`/`vagrant_exit`; `agent_s` is the
in-VM agent's own part (wiring, in-pod servers, datapath sync).

Measured here (2 cores, QEMU TCG, 26 Nov 2026, with other test runs on the machine, load 3-7):

    box from nothing (bcc + headers)   118 s  download 34, dpkg 64, mkfs 9, qcow2 1, pack 2, box add 8
                                               (before: 204 s without bcc)
    up, 3 nodes, cached box            146 s, 147 s, 171 s; 203 s when it also uploaded the image to libvirt
                                               (before: 485 s). 147 s run: DHCP 61-74 s, sshd 66-81 s,
                                               nodes built 128-147 s (agent 14-32 s); 1 vCPU/VM: 204 s
                                               quiet machine, guest named in the Vagrantfile: 86 s
                                               (97 s without: Vagrant's guest detection)
    check                              48/48 in 5-10 s
    down                               14 s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time

from labkit import lab
from labkit.backends.vagrant import box
from labkit.backends import vagrant as vg
from labkit.backends.vagrant.libvirt import vm_driver
from labkit.spec import parse_spec


def spec(nodes: int = 3, datapath: str = "ipvs", cpus: int | None = None) -> dict:
    extra = {"cpus": cpus} if cpus else {}
    return {"name": "benchvm", "backend": "vagrant", "vpc_cidr": "10.30.0.0/16", "pod_cidr": "10.246.0.0/16",
            "datapath": datapath,
            "nodes": [{"name": f"node{i}", "enis": 1, **extra,
                       "pods": [{"name": f"web-{i}", "mode": "eni-ipvlan", "labels": {"app": "web"}},
                                {"name": f"cli-{i}", "mode": "veth"}]} for i in range(1, nodes + 1)],
            "services": [{"name": "web", "port": 80, "target_port": 8080, "selector": {"app": "web"}}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep-box", action="store_true", help="do not rebuild the box")
    ap.add_argument("--keep-debs", action="store_true", help="rebuild the box but keep debootstrap's .deb cache")
    ap.add_argument("--box-only", action="store_true", help="build the box, bring nothing up")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--datapath", default="ipvs", help="the lab's Service datapath (ebpf: bcc compiles in the VMs)")
    ap.add_argument("--cpus", type=int, help="vCPUs per VM (default: the spec's)")
    ap.add_argument("--out")
    args = ap.parse_args()
    out: dict = {"machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "driver": vm_driver(box.box_for().kernel)}}
    s = parse_spec(spec(args.nodes, args.datapath, args.cpus))
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
        out["box_phases_s"] = json.loads((built.dir / "recipe.json").read_text()).get("phases_s")

    if args.box_only:
        print(json.dumps(out, indent=1))
        return
    t0 = time.monotonic()
    lb = lab.up(s, progress=True)
    out["up_s"] = round(time.monotonic() - t0, 1)
    meta = vg.LabState(s.name).meta()
    out["up_parts_s"] = meta.get("times")
    # inside each VM: the agent's own build (wiring, servers, datapath); the rest of a node's time from
    # sshd's first answer to "built" is the copy, ssh and Python's start-up under TCG
    out["agent_s"] = {n: r.get("seconds") for n, r in meta.get("nodes", {}).items()}
    out["vm_kernels"] = sorted(set(meta.get("kernels", {}).values()))
    t0 = time.monotonic()
    results = lb.check()
    out["check_s"] = round(time.monotonic() - t0, 1)
    out["check"] = f"{sum(r.ok for r in results)}/{len(results)} ok"
    if args.out:  # Vagrant's own timeline (the lab's folder goes with `down`)
        shutil.copyfile(vg.vagrant_dir(s.name) / "vagrant.log", args.out + ".vagrant.log")
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
