"""Why a kube-proxy iptables datapath grows with the number of Services and eBPF socket-LB does not,
shown on one new connection and read from the kernel (notebook ``05-why-linear``).

iptables (:func:`iptables_walk`): the node's nat table is read with ``iptables-<backend>-save -c``
before and after one connection from a pod; the rules whose packet counters went up are the path
of its first packet (a rule's counter counts packets that *matched* it: the rules compared and
passed over before a match keep their counters). The matched rule's line in ``KUBE-SERVICES`` is
how many rules that packet was compared with there. :func:`trace_first_packet` adds the kernel's
own trace of that packet (``xtables-monitor --trace``, iptables-nft only; why not on legacy:
:data:`LEGACY_TRACE_WHY`).

eBPF socket-LB (:func:`socket_lb_connect`): the service map's size, the one hash lookup of the
service's key (read back from user space with the same key the program builds) and its backends,
the connect() program's run count and run time (the kernel's BPF statistics, switched on only for
the connection), and where the socket points after connect(): a backend, before any packet exists.

:func:`path_diagram` draws the path per datapath, annotated with what was observed;
:func:`lookups_figure` sets the rules walked beside the lookups made, per place of the service.
kube-proxy's nftables mode is the third case: netfilter, but its ``services`` chain is one
verdict-map lookup (:func:`trace_first_packet` shows the packet matching its rule 1 for every
service; :func:`vmap_elements` counts the map).

The client side is this module run inside a pod (``python -m labkit.why HOST PORT``): it connects,
says whom the socket is connected to (``getpeername``) and which pod answered. Every kernel object
this module adds (the TRACE rule) is removed before its function returns, whatever happens.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

CHAIN_ORDER = ("PREROUTING", "OUTPUT", "KUBE-SERVICES", "KUBE-SVC-", "KUBE-SEP-", "KUBE-MARK-MASQ",
               "POSTROUTING", "KUBE-POSTROUTING")  # nat chains in the order a new connection meets them
NF_LOG_ALL_NETNS = "/proc/sys/net/netfilter/nf_log_all_netns"
LEGACY_TRACE_WHY = (
    "iptables-legacy's TRACE target writes its trace to the kernel log through nf_log, which the kernel "
    "switches off in every network namespace but the host's unless net.netfilter.nf_log_all_netns is 1 "
    "(here: {value}); that is a host-wide setting that would send other labs' logged packets to the kernel "
    "log too, so labkit leaves it alone. iptables-nft traces through nftables' netlink events instead, per "
    "namespace: run with datapath='iptables-nft' to see one.")
_SAVE_LINE = re.compile(r"\[(\d+):(\d+)\] -A (\S+) (.*)")
BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 32, 0


# ---------------------------------------------------------------- the client, inside a pod

def connect_once(host: str, port: int, timeout: float = 3.0) -> dict:
    """One new TCP connection: the socket's peer right after connect() and the pod that answered
    (the in-pod server replies to ``GET /`` with its name)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        peer = "%s:%d" % s.getpeername()
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return {"dialed": f"{host}:{port}", "peer": peer, "backend": data.partition(b"\r\n\r\n")[2].decode().strip()}


def connect_from(lab, pod: str, host: str, port: int) -> dict:
    """:func:`connect_once` run in ``pod`` (its namespace and cgroup: socket-LB hooks apply)."""
    out = lab.exec(pod, [sys.executable, "-m", "labkit.why", host, str(port)], timeout=30)
    return json.loads(out.stdout)


# ---------------------------------------------------------------- iptables: counters

@dataclass(frozen=True)
class NatRule:
    """One rule of the nat table with its counters, as ``iptables-save -c`` prints it."""

    chain: str
    line: int  # 1-based position in its chain (``iptables -L --line-numbers``)
    packets: int
    bytes: int
    rule: str  # the rule without "-A <chain>"


def nat_rules(ctx, backend: str) -> list[NatRule]:
    """Every rule of the node's nat table with its counters (``backend``: "legacy" or "nft")."""
    text = ctx.run([f"iptables-{backend}-save", "-c", "-t", "nat"]).stdout
    seen: dict[str, int] = {}
    out = []
    for m in map(_SAVE_LINE.match, text.splitlines()):
        if m:
            chain = m.group(3)
            seen[chain] = seen.get(chain, 0) + 1
            out.append(NatRule(chain, seen[chain], int(m.group(1)), int(m.group(2)), m.group(4)))
    return out


def _chain_rank(chain: str) -> int:
    return next((i for i, c in enumerate(CHAIN_ORDER) if chain == c or (c.endswith("-") and chain.startswith(c))),
                len(CHAIN_ORDER))


@dataclass
class Walk:
    """What one new connection to a service did in the node's nat table."""

    service: str  # service port key, e.g. "default/svc-199"
    cluster_ip: str
    connection: dict  # connect_once's answer
    hits: list[dict]  # the rules whose counters went up, in path order: chain, line, packets, rule
    position: int  # line of the KUBE-SERVICES rule that matched = rules compared there
    services_rules: int  # rules in KUBE-SERVICES (the services', then the NodePorts jump)
    nat_rules: int  # rules in the whole nat table
    first_packet_only: bool  # every counter went up by exactly one packet

    def as_dict(self) -> dict:
        return asdict(self)


def iptables_walk(lab, node: str, pod: str, sp, backend: str) -> Walk:
    """Open one new connection from ``pod`` to service port ``sp`` and read which nat rules of
    ``node`` it incremented. Fails if anything else touched those counters meanwhile (two rules
    of KUBE-SERVICES, or a counter up by more than the connection's first packet)."""
    ctx = lab.backend.node_context(lab.spec, node, lab.plan)
    before = {(r.chain, r.line): r for r in nat_rules(ctx, backend)}
    conn = connect_from(lab, pod, sp.cluster_ip, sp.port)
    after = nat_rules(ctx, backend)
    hits = [(r, r.packets - before[(r.chain, r.line)].packets) for r in after
            if (r.chain, r.line) in before and r.packets != before[(r.chain, r.line)].packets]
    hits.sort(key=lambda h: (_chain_rank(h[0].chain), h[0].chain, h[0].line))
    matched = [r for r, _ in hits if r.chain == "KUBE-SERVICES"]
    if len(matched) != 1:
        raise RuntimeError(f"expected one KUBE-SERVICES rule to count the connection, found {len(matched)}: "
                           f"{[r.rule for r in matched]}")
    if f"{sp.key} cluster IP" not in matched[0].rule:
        raise RuntimeError(f"the rule that matched is not {sp.key}'s: {matched[0].rule}")
    return Walk(sp.key, sp.cluster_ip, conn,
                [{"chain": r.chain, "line": r.line, "packets": d, "rule": r.rule} for r, d in hits],
                matched[0].line, sum(r.chain == "KUBE-SERVICES" for r in after), len(after),
                all(d == 1 for _, d in hits))


# ---------------------------------------------------------------- iptables: a trace

class TraceUnavailable(Exception):
    """A packet trace cannot be taken here; the message says why."""


@dataclass
class Trace:
    """The kernel's trace of one packet: every rule it matched, with its nftables handle."""

    service: str
    lines: list[str]  # xtables-monitor's lines for the packet (PACKET and TRACE)
    steps: list[dict] = field(default_factory=list)  # table, chain, handle, verdict, rule, line

    def as_dict(self) -> dict:
        return asdict(self)


_XT_TRACE = re.compile(r"TRACE: \d+ (\w+) (\w+):([^:]+):(rule|policy|return):?(0x[0-9a-f]+)?:?(\S*)\s*(.*)")
_NFT_TRACE = re.compile(r"trace id (\w+) ip (\S+) (\S+) (rule|policy) (.*?)"
                        r"(?: # handle (\d+))?(?: \(verdict (.+)\))?\s*$")
TRACE_TABLE = "lk_why_trace"  # the nftables table holding the marking rule (nftables datapaths)


def trace_first_packet(lab, node: str, pod: str, sp, datapath: str, settle: float = 0.5) -> Trace:
    """Trace the first packet of one new connection to ``sp`` through the node's tables: a rule
    marks the SYNs to the ClusterIP for tracing, a monitor listens in the node's namespace, and
    each rule the packet matched is placed in its chain (``nft -j`` lists handles in chain order).
    iptables-nft: ``-j TRACE`` in raw PREROUTING (which iptables-nft makes ``meta nftrace set 1``)
    and ``xtables-monitor --trace``; nftables: ``meta nftrace set 1`` in a table of its own
    (:data:`TRACE_TABLE`, before kube-proxy's chains) and ``nft -a monitor trace``. The marking rule
    is removed before this returns. :class:`TraceUnavailable` where it cannot be done
    (iptables-legacy: :data:`LEGACY_TRACE_WHY`)."""
    if datapath == "iptables-legacy":
        try:
            value = open(NF_LOG_ALL_NETNS).read().strip()
        except OSError:
            value = "not readable"
        raise TraceUnavailable(LEGACY_TRACE_WHY.format(value=value))
    ctx = lab.backend.node_context(lab.spec, node, lab.plan)
    if datapath == "iptables-nft":
        match = ["-d", f"{sp.cluster_ip}/32", "-p", "tcp", "--syn", "-j", "TRACE"]
        mark = (["iptables-nft", "-w", "-t", "raw", "-I", "PREROUTING", "1", *match], None)
        unmark = ["iptables-nft", "-w", "-t", "raw", "-D", "PREROUTING", *match]
        monitor, parse = ["xtables-monitor", "--trace"], _parse_xtables
    elif datapath.startswith("nftables"):
        rule = f"ip daddr {sp.cluster_ip} tcp dport {sp.port} tcp flags syn meta nftrace set 1"
        table = (f"table ip {TRACE_TABLE} {{\n chain prerouting {{\n"
                 f"  type filter hook prerouting priority raw; policy accept;\n  {rule}\n }}\n}}\n")
        mark = (["nft", "-f", "-"], table)
        unmark = ["nft", "delete", "table", "ip", TRACE_TABLE]
        monitor, parse = ["nft", "-a", "monitor", "trace"], _parse_nft
    else:
        raise TraceUnavailable(f"datapath {datapath} writes no netfilter rules to trace")
    text, lines_of = _monitored(lab, ctx, pod, sp, monitor, mark, unmark, settle)
    trace = Trace(sp.key, [])
    for ln in text.splitlines():
        step = parse(ln)
        if step is not None:
            trace.lines.append(ln.rstrip())
            if step:
                step["line"] = lines_of.get((step["table"], step["chain"]), {}).get(step["handle"])
                trace.steps.append(step)
    if not trace.steps:
        raise TraceUnavailable(f"no trace event arrived ({monitor[0]} said: {text.strip()[-300:]!r})")
    return trace


def _monitored(lab, ctx, pod, sp, monitor, mark, unmark, settle) -> tuple[str, dict]:
    """Mark (``mark``: argv and its stdin), listen, connect once, read the handles' lines, stop
    listening, unmark (``unmark``: argv): the monitor's output and :func:`_handle_lines` (read
    while the marking rule is still there)."""
    from . import nsexec

    ctx.run(mark[0], input=mark[1])
    try:
        mon = nsexec.spawn(["stdbuf", "-oL", *monitor], ctx.netns, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        try:
            time.sleep(settle)  # subscribed to the trace events before the packet comes
            if mon.poll() is not None:
                raise TraceUnavailable(f"{monitor[0]} stopped at once: {mon.stdout.read().strip()}")
            connect_from(lab, pod, sp.cluster_ip, sp.port)
            time.sleep(settle)
            lines_of = _handle_lines(ctx)
        finally:
            mon.terminate()
            text = mon.communicate(timeout=10)[0]
    finally:
        ctx.run(unmark, check=False)
    return text, lines_of


def _parse_xtables(line: str) -> dict | None:
    """A step of ``xtables-monitor --trace`` ({} for a PACKET line, None for anything else)."""
    if line.strip().startswith("PACKET:"):
        return {}
    m = _XT_TRACE.search(line)
    if not m:
        return None
    _, table, chain, kind, handle, verdict, rule = m.groups()
    return {"table": table, "chain": chain, "kind": kind, "handle": int(handle, 16) if handle else None,
            "verdict": verdict, "rule": rule.strip()}


def _parse_nft(line: str) -> dict | None:
    """A step of ``nft -a monitor trace`` ({} for a packet line, None for anything else)."""
    if not line.startswith("trace id "):
        return None
    m = _NFT_TRACE.match(line.rstrip())
    if not m or " packet: " in line:
        return {}
    _, table, chain, kind, rule, handle, verdict = m.groups()
    return {"table": table, "chain": chain, "kind": kind, "handle": int(handle) if handle else None,
            "verdict": verdict or rule, "rule": rule if kind == "rule" else ""}


def vmap_elements(ctx, table: str = "kube-proxy", name: str = "service-ips") -> int:
    """Elements of an nftables map of the node (kube-proxy's ``service-ips``: one per service port)."""
    listing = json.loads(ctx.run(["nft", "-j", "list", "map", "ip", table, name]).stdout)
    return next(len(item["map"].get("elem", [])) for item in listing["nftables"] if "map" in item)


def _handle_lines(ctx) -> dict[tuple[str, str], dict[int, int]]:
    """(table, chain) -> nftables rule handle -> 1-based line, for the ip family's tables."""
    listing = json.loads(ctx.run(["nft", "-j", "list", "ruleset", "ip"]).stdout or '{"nftables": []}')
    out: dict[tuple[str, str], dict[int, int]] = {}
    for item in listing["nftables"]:
        rule = item.get("rule")
        if rule:
            chain = out.setdefault((rule["table"], rule["chain"]), {})
            chain[rule["handle"]] = len(chain) + 1
    return out


# ---------------------------------------------------------------- eBPF socket-LB

@contextmanager
def bpf_run_stats():
    """The kernel counts run time and runs of every BPF program while this is open
    (``BPF_ENABLE_STATS``; machine-wide, two clock reads per program run, off again on exit)."""
    from .ebpf.libbpf import lib, syscall_error

    fd = lib().bpf_enable_stats(ctypes.c_int(BPF_STATS_RUN_TIME))
    if fd < 0:
        raise syscall_error("bpf_enable_stats")
    try:
        yield
    finally:
        os.close(fd)


def prog_stats(prog_id: int) -> dict:
    """run_cnt, run_time_ns, xlated size and map ids of a program (``bpftool prog show``)."""
    info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog_id)], capture_output=True,
                                     text=True, check=True).stdout)
    return {"name": info["name"], "id": prog_id, "run_cnt": info.get("run_cnt", 0),
            "run_time_ns": info.get("run_time_ns", 0), "instructions": info["bytes_xlated"] // 8,
            "maps": len(info.get("map_ids", []))}


def connect_program(ctx) -> int:
    """Id of the socket-LB connect4 program on the node's pod cgroup."""
    from .ebpf.libbpf import ATTACH_CGROUP_INET4_CONNECT, KERNEL_NAME_LEN, cgroup_programs

    fd = os.open(ctx.cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        progs = cgroup_programs(fd, ATTACH_CGROUP_INET4_CONNECT)
    finally:
        os.close(fd)
    found = [pid for pid, name in progs if name == "lk_sock4_connect"[:KERNEL_NAME_LEN]]
    if not found:
        raise RuntimeError(f"no lk_sock4_connect on {ctx.cgroup}: {progs}")
    return found[0]


@dataclass
class Lookup:
    """One new connection under socket-LB, and the map lookup behind it."""

    service: str
    cluster_ip: str
    connection: dict  # connect_once's answer: peer is the backend
    key: str  # the packed lb4_key, hex
    found: bool
    rev_nat_index: int  # the service's id in the maps
    backends: list[str]  # lk_be_v4 slots of the service, ip:port
    map_entries: int  # lk_svc_v4 entries (one per service port)
    backend_entries: int  # lk_be_v4 entries
    max_entries: int  # lk_svc_v4's capacity
    runs: int  # lk_sock4_connect runs during the connection
    run_ns: int  # and their run time
    instructions: int  # the program's size: the same for any number of services

    def as_dict(self) -> dict:
        return asdict(self)


def socket_lb_connect(lab, node: str, pod: str, sp) -> Lookup:
    """Open one new connection from ``pod`` to ``sp`` under the ``ebpf`` datapath, counting the
    connect() program's runs, and look the service's key up in the pinned service map."""
    from .datapath import ebpf_structs as S
    from .datapath.ebpf import ServiceMaps, service_key

    dp = lab.datapath(node, "ebpf")
    ctx = dp.ctx
    prog = connect_program(ctx)
    with bpf_run_stats():
        before = prog_stats(prog)
        conn = connect_from(lab, pod, sp.cluster_ip, sp.port)
        after = prog_stats(prog)
    maps = ServiceMaps(dp.fs.maps)
    try:
        key = service_key(sp)
        raw = maps.svc.get(key)
        sid, count, _ = S.LB4_SERVICE.unpack(raw) if raw else (0, 0, 0)
        backends = []
        for slot in range(count):
            ip, port, _, _ = S.LB4_BACKEND.unpack(maps.be.get(S.LB4_BACKEND_KEY.pack(sid, slot)))
            backends.append(f"{socket.inet_ntoa(ip)}:{port}")
        return Lookup(sp.key, sp.cluster_ip, conn, key.hex(), raw is not None, sid, backends, len(maps.svc),
                      len(maps.be), maps.svc.spec.max_entries, after["run_cnt"] - before["run_cnt"],
                      after["run_time_ns"] - before["run_time_ns"], after["instructions"])
    finally:
        maps.close()


# ---------------------------------------------------------------- the path, drawn

# the first and last boxes of the netfilter datapaths' diagrams (iptables and nftables alike)
CLIENT_STEP = ("client pod", "connect(ClusterIP:port):<br>the SYN leaves the pod<br>to the ClusterIP", False)
BACKEND_STEP = ("backend pod", "the rest of the<br>connection: conntrack,<br>no rule walk", False)


def path_diagram(datapath: str, observed: dict | None = None, services: int | None = None):
    """A new connection's path through one datapath as boxes and arrows (plotly shapes), marking
    where it is translated; ``observed`` (a :class:`Walk` or :class:`Lookup` as a dict) writes
    what the kernel counted into the boxes."""
    import plotly.graph_objects as go

    from .plots import COLORS, TEMPLATE

    n = services if services is not None else "N"
    color = COLORS.get(datapath, "#444")
    if datapath.startswith("iptables"):
        pos = observed["position"] if observed else "k"
        svc = observed["service"] if observed else "the service"
        steps = [CLIENT_STEP,
                 ("nat PREROUTING", "in the node:<br>rule 1 jumps to<br>KUBE-SERVICES", False),
                 ("KUBE-SERVICES", f"{n} rules, one per<br>service, compared<br>in order, then<br>"
                                   f"<b>match at rule {pos}</b><br>({svc})", True),
                 ("KUBE-SVC-…", "pick an endpoint<br>(-m statistic random)", False),
                 ("KUBE-SEP-…", "<b>DNAT</b> to pod:8080<br>(conntrack remembers it)", True),
                 BACKEND_STEP]
        title = (f"{datapath}: where a new connection is translated — first packet only, "
                 f"in the node's nat table (walk: linear in the number of services)")
    elif datapath.startswith("nftables"):
        entries = observed["elements"] if observed else n
        line = observed["line"] if observed else 1
        steps = [CLIENT_STEP,
                 ("nat-prerouting", "in the node:<br>rule 1 jumps to<br>services", False),
                 ("services", f"<b>rule {line}</b>: one lookup<br>of (ClusterIP, proto,<br>port) in the "
                              f"vmap<br>service-ips<br>({entries} elements)", True),
                 ("service-…", "pick an endpoint<br>(numgen random)", False),
                 ("endpoint-…", "<b>DNAT</b> to pod:8080<br>(conntrack remembers it)", True),
                 BACKEND_STEP]
        title = (f"{datapath}: where a new connection is translated — first packet only, in the node's "
                 "kube-proxy table (one verdict-map lookup, whatever N)")
    else:
        runs = f"{observed['runs']} run, {observed['run_ns']} ns" if observed else "one run"
        entries = observed["map_entries"] if observed else n
        peer = observed["connection"]["peer"] if observed else "backend"
        steps = [("client pod", "connect(ClusterIP:port)", False),
                 ("connect4 hook", f"lk_sock4_connect<br>on the pods' cgroup<br>({runs})", False),
                 ("lk_svc_v4 (hash)", f"<b>one lookup</b> of<br>(ClusterIP, port, proto)<br>among {entries} entries",
                  True),
                 ("lk_be_v4", "backend slot<br>(random)", False),
                 ("socket rewritten", f"<b>destination =<br>{peer}</b><br>before any packet", True),
                 ("backend pod", "packets go straight<br>to the pod: no NAT,<br>no rules on the node", False)]
        title = f"{datapath}: where a new connection is translated — at connect(), one hash lookup whatever N"
    fig = go.Figure()
    w, gap = 1.2, 0.25
    for i, (head, body, key) in enumerate(steps):
        x0 = i * (w + gap)
        fig.add_shape(type="rect", x0=x0, x1=x0 + w, y0=0, y1=1, line={"color": color, "width": 3 if key else 1},
                      fillcolor=color if key else "#f2f2f2", opacity=0.25 if key else 1, layer="below")
        fig.add_annotation(x=x0 + w / 2, y=0.82, text=f"<b>{head}</b>", showarrow=False, font={"size": 12})
        fig.add_annotation(x=x0 + w / 2, y=0.42, text=body, showarrow=False, font={"size": 10.5})
        if i:
            fig.add_annotation(x=x0, y=0.5, ax=x0 - gap, ay=0.5, xref="x", yref="y", axref="x", ayref="y",
                               showarrow=True, arrowhead=3, arrowsize=1.2, arrowcolor="#444", text="")
    total = len(steps) * (w + gap) - gap
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", marker={"symbol": "square", "color": color},
                             name=f"{datapath}: translation"))
    fig.update_layout(title={"text": title, "font": {"size": 14}}, template=TEMPLATE, height=300, showlegend=False,
                      margin={"l": 10, "r": 10, "t": 60, "b": 10},
                      xaxis={"visible": False, "range": [-0.1, total + 0.1]},
                      yaxis={"visible": False, "range": [-0.1, 1.1]})
    return fig


def lookups_figure(series: list[tuple[str, str, dict[str, int], dict[str, str]]], services: int):
    """Per place of the service (first, middle, last), what each datapath did to find it, as the
    kernel reported it: ``series`` holds (datapath, what was counted, {place: count}, {place: hover
    text}), e.g. the KUBE-SERVICES rules compared (the matched rule's line, from the counters),
    the lines of nftables' services chain evaluated (from a trace), socket-LB's connect() runs (one
    hash lookup each, from the kernel's BPF statistics)."""
    import plotly.graph_objects as go

    from .plots import COLORS, TEMPLATE

    fig = go.Figure([go.Bar(name=f"{dp}: {what}", x=list(counts), y=list(counts.values()),
                            marker_color=COLORS.get(dp), text=list(counts.values()), textposition="outside",
                            hovertext=[hover.get(p, "") for p in counts], hoverinfo="text")
                     for dp, what, counts, hover in series])
    fig.update_layout(title=f"One new connection to the first, middle and last of {services} services: "
                            "the work done to find it (read from the kernel)",
                      template=TEMPLATE, barmode="group", height=420, xaxis_title="the service's place in the table",
                      yaxis_title="rules compared / lookups", legend={"orientation": "h", "y": -0.2})
    return fig


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    json.dump(connect_once(host, port), sys.stdout)


if __name__ == "__main__":
    main()
