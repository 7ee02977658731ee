"""NetworkPolicy engines versus the number of policies: load, update, model compile and CRR.

For each engine (``iptables``, ``ebpf``) and each N: N bulk policies (``--rules`` generated rules
each) selecting the server pod, plus ``allow-cli`` last. Timed:
  compile   the model: spec policies -> the node's PolicyTable (shared by both engines)
  load      a full sync of the table onto an empty engine (engine time only)
  update    one policy added at N (a partial sync)
  remove    that policy removed again
and TCP_CRR p50 from the client to the server through the N policies (``--samples`` connections).
Medians over ``--repeat`` runs. One lab per engine, ``lkbp<pid>-<engine>``, torn down at the end
(also on failure); no traffic leaves it.

    .venv/bin/python benchmarks/bench_policy.py [--sizes 10,100,1000,10000] [--rules 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkit import lab as labmod  # noqa: E402
from labkit.experiments.policy_scale import lab_spec, policies  # noqa: E402
from labkit.policy import compile_table, expand, get  # noqa: E402
from labkit.spec import PolicySpec, parse_spec  # noqa: E402

TAG = f"{os.getpid() % 100000}"
NODE = "n0"  # policy-scale's lab of one node: n0 with cli-0 and srv-0


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_engine(engine: str, sizes: list[int], rules: int, repeat: int, samples: int) -> list[dict]:
    spec = parse_spec({**lab_spec(engine, "veth", f"b{TAG}"), "name": f"lkbp{TAG}-{engine[:4]}"})
    labmod.down(spec.name)
    lb = labmod.up(spec, progress=False)
    rows = []
    try:
        ctx = lb.backend.node_context(lb.spec, NODE, lb.plan)
        ctx.state_dir.mkdir(parents=True, exist_ok=True)
        eng = get(engine)(ctx, "none")
        empty = compile_table(lb.spec, NODE, lb.plan, policies=[])
        compile_s = timed(lambda: eng.sync(compile_table(lb.spec, NODE, lb.plan, policies=policies(1, 1))))
        eng.sync(empty)
        srv = str(lb.plan.pods["srv-0"].ip)
        for n in sizes:
            pols = policies(n, rules)
            t0 = time.perf_counter()
            table = compile_table(lb.spec, NODE, lb.plan, policies=pols)
            model = time.perf_counter() - t0
            extra = expand([PolicySpec("extra", {"app": "srv-0"}, ("Ingress",), count=1, rules=rules,
                                       peer_cidr="100.127.0.0/16")])
            plus = compile_table(lb.spec, NODE, lb.plan, policies=pols[:-1] + extra + pols[-1:])
            loads, updates, removes = [], [], []
            for _ in range(repeat):
                eng.sync(empty)
                loads.append(eng.sync(table).seconds)
                updates.append(eng.sync(plus).seconds)
                removes.append(eng.sync(table).seconds)
            crr = lb.run_client("cli-0", "crr", srv, 8080, samples=samples, warmup=samples // 10)
            rows.append({"engine": engine, "policies": n, "rules": table.rules(), "model_s": model,
                         "load_s": statistics.median(loads), "update_ms": 1e3 * statistics.median(updates),
                         "remove_ms": 1e3 * statistics.median(removes), "crr_p50_us": crr["p50_us"],
                         "first_sync_s": compile_s})
        eng.cleanup()
    finally:
        labmod.down(lb.name)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10,100,1000,10000")
    ap.add_argument("--rules", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--engines", default="iptables,ebpf")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_policy: needs root (builds a lab)", file=sys.stderr)
        return 2
    sizes = [int(x) for x in args.sizes.split(",")]
    rows = []
    for engine in args.engines.split(","):
        rows += bench_engine(engine, sizes, args.rules, args.repeat, args.samples)
    cols = ["engine", "policies", "rules", "model_s", "load_s", "update_ms", "remove_ms", "crr_p50_us"]
    print("  ".join(f"{c:>10}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>10.4g}" if isinstance(r[c], float) else f"{r[c]:>10}" for c in cols))
    firsts = {r["engine"]: r["first_sync_s"] for r in rows}
    print("first sync (eBPF: compile + attach; iptables: first restore): "
          + ", ".join(f"{e} {s:.2f} s" for e, s in firsts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
