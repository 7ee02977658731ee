"""The ``labkit`` command line: one subcommand per verb, each a thin call into the library.

Errors labkit raises on purpose (bad spec, missing kernel feature, unknown lab) are printed as one
clear message and exit with status 2; a failed ``check`` exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from .errors import LabkitError


def _cmd_doctor(args) -> int:
    from . import doctor

    return doctor.cli(args)


def _cmd_up(args) -> int:
    from . import lab
    from .spec import load_spec

    spec = load_spec(args.spec)
    if args.datapath:
        spec = spec.replace(datapath=args.datapath)  # lab.up validates it
    lab.up(spec, progress=not args.quiet)
    print(f"lab {spec.name} is up: {len(spec.nodes)} nodes, {len(spec.pods())} pods, datapath {spec.datapath}. "
          f"Next: labkit check {spec.name}")
    return 0


def _cmd_down(args) -> int:
    from . import lab
    from .state import list_labs

    names = list_labs() if args.all else args.names
    if not names:
        print("no lab to remove" if args.all else "name a lab, or --all")
        return 0 if args.all else 2
    for name in names:
        counts = lab.down(name)
        print(f"lab {name} removed: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


def _cmd_ls(args) -> int:
    from . import lab

    rows = lab.labs()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no labs")
        return 0
    _table(rows, ["name", "backend", "status", "nodes", "pods", "datapath"])
    return 0


def _cmd_check(args) -> int:
    from . import lab

    results = lab.open_lab(args.name).check(services=not args.no_services)
    failed = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps({"lab": args.name, "ok": not failed, "results": lab.results_json(results)}, indent=1))
        return 1 if failed else 0
    if any(r.kind == "policy" for r in results):
        _print_policy_matrix([r for r in results if r.kind == "policy"])
    else:
        _print_matrix(results)
    svc = [r for r in results if r.kind not in ("pod", "policy")]
    if svc:
        _print_services(svc)
    total = len(results)
    print(f"\n{total - len(failed)}/{total} connections as expected" + ("" if not failed else f"; {len(failed)} FAILED"))
    for r in failed[:20]:
        print(f"  FAIL {r.kind} {r.src} -> {r.dst} ({r.host}:{r.port}/{r.proto}): expected {r.expected}, got {r.observed}")
    return 1 if failed else 0


def _print_matrix(results) -> None:
    pods = [r for r in results if r.kind == "pod"]
    names = sorted({r.src for r in pods} | {r.dst for r in pods})
    ok = {(r.src, r.dst): r.ok for r in pods}
    w = max((len(n) for n in names), default=4)
    print("pod to pod (rows: from, columns: to)")
    print(" " * (w + 1) + " ".join(n[:w].rjust(w) for n in names))
    for s in names:
        cells = ["-" if s == d else ("ok" if ok.get((s, d)) else "FAIL") for d in names]
        print(s.ljust(w + 1) + " ".join(c.rjust(w) for c in cells))


def _print_policy_matrix(results) -> None:
    """One allow/deny matrix per port: cells show what was observed; '!' marks a cell that differs
    from what the policy model expects."""
    names = sorted({r.src for r in results} | {r.dst for r in results})
    w = max(5, *(len(n) for n in names))
    for port in sorted({(r.proto, r.port) for r in results}):
        cell = {(r.src, r.dst): r for r in results if (r.proto, r.port) == port}
        print(f"network policy, {port[0].upper()} {port[1]} (rows: from, columns: to; '!' = not as expected)")
        print(" " * (w + 1) + " ".join(n[:w].rjust(w) for n in names))
        for s in names:
            cells = []
            for d in names:
                r = cell.get((s, d))
                cells.append("-" if r is None else r.observed + ("" if r.ok else "!"))
            print(s.ljust(w + 1) + " ".join(c.rjust(w) for c in cells))
        print()


def _print_services(results) -> None:
    agg: dict[tuple, list] = {}
    for r in results:
        agg.setdefault((r.dst, r.kind, f"{r.host}:{r.port}/{r.proto}", r.expected), []).append(r)
    rows = []
    for (dst, kind, target, expected), rs in agg.items():
        seen = sorted({r.observed for r in rs})
        rows.append({"service": dst, "via": kind, "target": target, "expected": expected,
                     "result": f"{sum(r.ok for r in rs)}/{len(rs)} ok", "observed": ",".join(seen)[:60]})
    print("\nservices")
    _table(rows, ["service", "via", "target", "expected", "result", "observed"])


def _cmd_exec(args) -> int:
    from . import lab

    argv = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not argv:
        print("labkit exec: give a command after --, e.g. labkit exec demo web-0 -- ip addr", file=sys.stderr)
        return 2
    lb = lab.open_lab(args.name)
    try:
        lb.pod_netns(args.pod)
    except KeyError as exc:
        raise LabkitError(str(exc).strip('"')) from None
    proc = lb.spawn(args.pod, argv, stdin=None, stdout=None, stderr=None)
    return proc.wait()


def _cmd_services(args) -> int:
    from . import lab

    table = lab.open_lab(args.name).services()
    rows = [{"name": sp.key, "cluster_ip": sp.cluster_ip, "port": sp.port, "protocol": sp.protocol,
             "endpoints": [f"{e.ip}:{e.port}" + (f" ({e.pod})" if e.pod else "") for e in sp.endpoints]}
            for sp in table]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    shown = rows if args.all or len(rows) <= 50 else rows[:20] + rows[-5:]
    _table([{**r, "endpoints": ", ".join(r["endpoints"]) or "(none)"} for r in shown],
           ["name", "cluster_ip", "port", "protocol", "endpoints"])
    if len(shown) < len(rows):
        print(f"… {len(rows)} services in all (first 20 and last 5 shown; --all for every one)")
    return 0


def _table(rows: list[dict], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols).rstrip())


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="labkit", description="Pod-network and Service-datapath labs on a real kernel.")
    p.add_argument("--version", action="version", version=f"labkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser("doctor", help="what this machine can run, and how to fix what it cannot")
    try:
        from . import doctor

        doctor.add_arguments(d)
    except ImportError:
        d.add_argument("--json", action="store_true")
    d.set_defaults(fn=_cmd_doctor)

    u = sub.add_parser("up", help="build a lab from a spec file")
    u.add_argument("spec", help="YAML spec file")
    u.add_argument("--datapath", help="override the spec's datapath")
    u.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    u.set_defaults(fn=_cmd_up)

    dn = sub.add_parser("down", help="remove a lab and everything it created")
    dn.add_argument("names", nargs="*", metavar="NAME")
    dn.add_argument("--all", action="store_true", help="every lab on this machine")
    dn.set_defaults(fn=_cmd_down)

    ls = sub.add_parser("ls", help="list labs")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=_cmd_ls)

    c = sub.add_parser("check", help="real connections between all pods and to every service")
    c.add_argument("name")
    c.add_argument("--json", action="store_true")
    c.add_argument("--no-services", action="store_true", help="pod-to-pod only")
    c.set_defaults(fn=_cmd_check)

    e = sub.add_parser("exec", help="run a command inside a pod: labkit exec LAB POD -- CMD...")
    e.add_argument("name")
    e.add_argument("pod")
    e.add_argument("cmd", nargs=argparse.REMAINDER)
    e.set_defaults(fn=_cmd_exec)

    s = sub.add_parser("services", help="every service: ClusterIP, port, protocol, endpoints")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.add_argument("--all", action="store_true", help="list every service even when there are thousands")
    s.set_defaults(fn=_cmd_services)

    _add_measurement(sub)
    _add_sweep(sub)
    from .backends.vagrant import box  # `labkit box build|status|rm` (vagrant backend's VM box; light imports)

    box.add_cli(sub)
    return p


def _lazy(module: str, func: str):
    """A handler that imports its module only when its subcommand runs (pandas/plotly are slow to
    import, and `labkit ls` should not pay for them)."""

    def handler(args):
        import importlib

        return getattr(importlib.import_module(module), func)(args)

    return handler


def _ints(text: str) -> list[int]:
    try:
        return [int(x.replace("_", "")) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,1000,5000; got {text!r}") from None


def _words(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def _add_measurement(sub) -> None:
    p = sub.add_parser("run", help="run an experiment, write results and an HTML report")
    p.add_argument("experiment", choices=["pod-modes", "service-scale", "policy-scale"])
    p.add_argument("--quick", action="store_true", help="the short variant (≤ 3 min here)")
    p.add_argument("--datapaths", type=_words, help="service-scale: comma-separated, e.g. iptables-nft,ebpf")
    p.add_argument("--services", type=_ints, help="service-scale: numbers of services, e.g. 1,1000,5000")
    p.add_argument("--positions", type=_words, help="service-scale: first,middle,last,random,pod")
    p.add_argument("--mode", help="service-scale: pod network mode of the experiment's pods (default veth)")
    p.add_argument("--backend", help="service-scale, pod-modes: where the labs run, netns (default) or vagrant "
                   "(VMs on Debian's kernel: ipvs, eni-ipvlan; see vagrant/README.md)")
    p.add_argument("--modes", type=_words, help="pod-modes: comma-separated pod network modes")
    p.add_argument("--metrics", type=_words, help="crr,rr (service-scale); crr,rr,udp_rr,bandwidth (pod-modes)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--samples", type=int, help="samples per point")
    p.add_argument("--warmup", type=int)
    p.add_argument("--burst", type=int, help="service-scale: samples per point per turn; the points of an N "
                   "are measured interleaved, turn by turn (default 20)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue a run that was stopped")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=_lazy("labkit.experiments", "cli_run"))

    r = sub.add_parser("results", help="list runs in the results store, or show one")
    r.add_argument("run", nargs="?", help="show one run's manifest and summary")
    r.add_argument("--json", action="store_true")
    r.set_defaults(fn=_lazy("labkit.results", "cli_results"))

    rep = sub.add_parser("report", help="(re)write the HTML report of a run")
    rep.add_argument("run")
    rep.add_argument("--images", action="store_true", help="also write every figure as PNG and SVG (kaleido)")
    rep.set_defaults(fn=_lazy("labkit.report", "cli_report"))


def _add_sweep(sub) -> None:
    w = sub.add_parser("sweep", help="run a notebook over a parameter grid with papermill")
    w.add_argument("notebook", help="e.g. notebooks/03-service-scale.ipynb")
    w.add_argument("-p", "--param", action="append", metavar="NAME=V1,V2",
                   help="grid values (YAML; commas inside [...] belong to the value); repeat for more names")
    w.add_argument("-o", "--out", help="folder for the output notebooks (default results/sweeps/<time>-<name>)")
    w.add_argument("--results", help="results store the runs go to (default $LABKIT_RESULTS or ./results)")
    w.add_argument("--kernel", help="Jupyter kernel name (default: the notebook's)")
    w.add_argument("--keep-going", action="store_true", help="run the remaining combinations after a failure")
    w.add_argument("--dry-run", action="store_true", help="print the combinations and stop")
    w.set_defaults(fn=_lazy("labkit.sweep", "cli_sweep"))


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `labkit … | head` ends quietly
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except LabkitError as exc:
        print(f"labkit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("labkit: interrupted", file=sys.stderr)
        return 130
    except PermissionError as exc:
        if os.geteuid() != 0:
            print(f"labkit: {exc}; labkit needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
