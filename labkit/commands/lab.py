"""Lab commands: ``up``, ``down``, ``ls``, ``check``, ``exec``, ``services``."""

from __future__ import annotations

import json
import sys

from ..errors import LabkitError, UsageError
from ..textfmt import table
from . import command


def _up_args(p) -> None:
    p.add_argument("spec", help="YAML spec file")
    p.add_argument("--datapath", help="override the spec's datapath")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _down_args(p) -> None:
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--all", action="store_true", help="every lab of yours (the labs your user made)")
    p.add_argument("--everyone", action="store_true", help="with --all: every lab on this machine, whoever made it "
                   "(says how many first)")
    p.add_argument("--missing-ok", action="store_true", help="a lab that does not exist is not an error (scripts)")
    p.add_argument("--forget", action="store_true",
                   help="backend hosts: remove the lab even if a host cannot be reached (gone for good); each such "
                        "host is named with the command that restores it should it come back")


def _ls_args(p) -> None:
    p.add_argument("--json", action="store_true")


def _check_args(p) -> None:
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-services", action="store_true", help="pod-to-pod only")


def _exec_args(p) -> None:
    import argparse

    p.add_argument("name")
    p.add_argument("pod")
    p.add_argument("cmd", nargs=argparse.REMAINDER)


def _services_args(p) -> None:
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="list every service even when there are thousands")


@command("up", "build a lab from a spec file", _up_args, order=10)
def up(args) -> int:
    from .. import lab
    from ..serve.client import use_daemon
    from ..spec import load_spec

    if use_daemon():
        return _daemon_up(args)
    spec = load_spec(args.spec)
    if args.datapath:
        spec = spec.replace(datapath=args.datapath)  # lab.up validates it
    lab.up(spec, progress=not args.quiet)
    print(f"lab {spec.name} is up: {len(spec.nodes)} nodes, {len(spec.pods())} pods, datapath {spec.datapath}. "
          f"Next: labkit check {spec.name}")
    return 0


@command("down", "remove a lab and everything it created", _down_args, order=20)
def down(args) -> int:
    import os

    from .. import lab
    from ..errors import UsageError

    if args.everyone and not args.all:
        raise UsageError("--everyone goes with --all (every lab on this machine); to remove one lab, name it")
    if args.all and args.names:
        raise UsageError("name labs or give --all, not both")
    if args.forget and args.all:
        raise UsageError("--forget gives up unreachable hosts of the labs named: name them, not --all")
    from ..serve.client import use_daemon

    if use_daemon():
        if args.forget:
            raise UsageError("--forget is for labs on your own hosts (backend: hosts), which the classroom daemon "
                             "does not run")
        return _daemon_down(args)
    if args.all:
        mine = [r for r in lab.labs() if args.everyone or r["owner"] == os.getuid()]
        names = [r["name"] for r in mine]
        if args.everyone:
            owners = sorted({r["owner"] for r in mine})
            print(f"removing {len(names)} lab(s) of {len(owners)} user(s): {', '.join(names) or 'none'}")
        if not names:
            print("no lab of yours to remove" + ("" if args.everyone else " (--everyone: every lab on this machine)"))
            return 0
    else:
        names = args.names
        if not names:
            raise UsageError("name the lab to remove (labkit ls lists them), or give --all for every lab of yours")
    for name in names:
        if not lab.exists(name) and (args.missing_ok or args.all):
            print(f"lab {name}: not here, nothing to remove")
            continue
        counts = lab.down(name, missing_ok=False, forget=args.forget)
        print(f"lab {name} removed: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


@command("ls", "list labs", _ls_args, order=30)
def ls(args) -> int:
    from .. import lab
    from ..serve.client import Client, use_daemon

    if use_daemon():
        rows = Client().ls()
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        print(table(rows, ["name", "user", "backend", "status", "nodes", "pods", "datapath"]) if rows else "no labs")
        return 0
    rows = lab.labs()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no labs")
        return 0
    print(table(rows, ["name", "backend", "status", "nodes", "pods", "datapath"]))
    return 0


@command("check", "real connections between all pods and to every service", _check_args, order=40)
def check(args) -> int:
    from .. import lab
    from ..serve.client import Client, use_daemon

    if use_daemon():
        results = [lab.CheckResult(**r) for r in Client().check(args.name, args.no_services)["results"]]
    else:
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
    print(table(rows, ["service", "via", "target", "expected", "result", "observed"]))


@command("exec", "run a command inside a pod: labkit exec LAB POD -- CMD...", _exec_args, order=50)
def exec_(args) -> int:
    from .. import lab

    argv = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not argv:
        print("labkit exec: give a command after --, e.g. labkit exec demo web-0 -- ip addr", file=sys.stderr)
        return 2
    from ..serve.client import Client, use_daemon

    if use_daemon():
        return Client().exec(args.name, args.pod, argv)
    lb = lab.open_lab(args.name)
    try:
        lb.pod_netns(args.pod)
    except KeyError as exc:
        raise UsageError(str(exc).strip('"')) from None
    proc = lb.spawn(args.pod, argv, stdin=None, stdout=None, stderr=None)
    return proc.wait()


@command("services", "every service: ClusterIP, port, protocol, endpoints", _services_args, order=60)
def services(args) -> int:
    from .. import lab
    from ..serve.client import Client, use_daemon

    rows = Client().services(args.name) if use_daemon() else lab.services_json(lab.open_lab(args.name).services())
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    shown = rows if args.all or len(rows) <= 50 else rows[:20] + rows[-5:]
    print(table([{**r, "endpoints": ", ".join(r["endpoints"]) or "(none)"} for r in shown],
                ["name", "cluster_ip", "port", "protocol", "endpoints"]))
    if len(shown) < len(rows):
        print(f"… {len(rows)} services in all (first 20 and last 5 shown; --all for every one)")
    return 0


def _inspect_args(p) -> None:
    p.add_argument("name")
    p.add_argument("--json", action="store_true")


@command("inspect", "a lab's nodes, pods (addresses, modes, interfaces, servers), datapath and policies",
         _inspect_args, order=65)
def inspect(args) -> int:
    from .. import lab
    from ..serve.client import Client, use_daemon

    info = Client().inspect(args.name) if use_daemon() else lab.open_lab(args.name).inspect()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"lab {info['name']}: backend {info['backend']}, datapath {info['datapath']}, "
          f"{info['services']} service port(s), {info['policies']} polic(ies) ({info['policy_engine']}), "
          f"VPC {info['vpc']} (gateway {info['vpc_gateway']}), pods {info['pod_cidr']}")
    print("\nnodes")
    print(table(info["nodes"], ["name", "kernel", "nics", "pod_subnet", "overlay_subnet", "datapath_state"]))
    print("\npods")
    print(table(info["pods"], ["name", "node", "mode", "ip", "gateway", "via", "node_iface", "server", "labels"]))
    return 0


def _graph_args(p) -> None:
    p.add_argument("name")
    p.add_argument("-o", "--out", required=True, help="FILE.html (interactive, offline) or FILE.svg / FILE.png")


@command("graph", "draw a lab's topology (VPC, nodes, NICs, pods by mode) to an HTML or SVG file", _graph_args,
         order=66)
def graph(args) -> int:
    from pathlib import Path

    from .. import lab, plots
    from ..errors import UsageError

    out = Path(args.out)
    if out.suffix not in (".html", ".svg", ".png"):
        raise UsageError(f"--out {out}: give a .html, .svg or .png file")
    if not out.parent.exists():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    fig = plots.topology(lab.open_lab(args.name))
    if out.suffix == ".html":
        fig.write_html(out, include_plotlyjs=True)  # the whole plotly.js: opens offline
    else:
        written = plots.export({out.stem: fig}, out.parent, formats=(out.suffix[1:],))
        out = written[0]
    print(out)
    return 0


# ---------------------------------------------------------------- through the daemon (not root)

def _daemon_up(args) -> int:
    from pathlib import Path

    from ..errors import SpecError
    from ..serve.client import Client
    from ..spec.load import read_spec_data

    data = read_spec_data(Path(args.spec))
    if not isinstance(data, dict):
        raise SpecError([("", "a lab spec is a mapping (name:, nodes:, ...)")])
    if args.datapath:
        data = {**data, "datapath": args.datapath}
    say = None if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    res = Client(progress=say).up(data)
    print(f"lab {res['lab']} is up: {res['nodes']} nodes, {res['pods']} pods, datapath {res['datapath']} "
          f"(through the labkit daemon; on this machine {res['machine_name']}). Next: labkit check {res['lab']}")
    return 0


def _daemon_down(args) -> int:
    import os

    from ..errors import NoSuchLab
    from ..serve.client import Client, DaemonError
    from ..serve.daemon import owner_of

    client = Client()
    names = [r["name"] for r in client.ls() if owner_of(r["machine_name"]) == os.getuid()] if args.all else args.names
    if args.all and not names:
        print("no lab of yours to remove")
        return 0
    if not names:
        raise UsageError("name the lab to remove (labkit ls lists them), or give --all for every lab of yours")
    for name in names:
        try:
            counts = client.down(name)["removed"]
        except DaemonError as exc:
            if exc.exit_code == NoSuchLab.exit_code and args.missing_ok:
                print(f"lab {name}: not here, nothing to remove")
                continue
            raise
        print(f"lab {name} removed: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0
