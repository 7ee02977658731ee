"""A host's state before a lab, and its restoration: what makes a machine labkit did not create safe
to build a node on (the ``hosts`` backend; run by the agent on the host, as root).

Before the agent changes anything on a host, :func:`begin` writes ``/run/labkit-host/<lab>.json``
(atomically; a second lab on the same host is refused): the lab NICs' names, MTUs and states (by MAC),
the IPv4 routes and rules, the ``net.*`` sysctls labkit may touch (machine-wide and the lab NICs'
own), the loaded kernel modules, the iptables rules (legacy and nft) and nftables tables, and which
lab NICs had a clsact qdisc. :func:`restore` (``agent host-down``, run by ``labkit down``) brings the
host back to that record, also after ``labkit up`` was SIGKILLed or its ssh connection lost midway:

1. stop labkit's processes there (a detached build still running, in-pod servers, load clients);
2. take the lab NICs back from pod namespaces (an exclusive ENI), remove the pods' namespaces,
   bpffs mounts and cgroups;
3. undo netfilter: kube-proxy's IPVS services, then every iptables rule and chain that was not in
   the record (a diff of ``*-save`` outputs: only what was added is removed, in both iptables
   flavours), the ipsets, then nftables tables that did not exist, and empty chains that did not
   (iptables-nft makes base chains on first use);
4. remove the links labkit made (pod-facing devices, bridges, vxlan, ``kube-ipvs0``), the routes on
   the lab NICs and in their ENI tables and the rules that were not in the record;
5. give each lab NIC back its addresses, qdiscs, name, MTU and state, then every recorded sysctl its
   value, then unload the modules labkit loaded.

It never touches an interface that is not a lab NIC or a link labkit made (the management interface
is refused before this runs: :mod:`labkit.backends.hosts`), and what it cannot restore it reports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

JOURNAL_DIR = Path("/run/labkit-host")
SYSCTL_ROOT = Path("/proc/sys")
# machine-wide sysctl folders labkit's node runtime and datapaths write (a folder absent here, such
# as net/ipv4/vs before ip_vs is loaded, appears with its module and goes with it)
SYSCTL_TREES = ("net/ipv4", "net/ipv4/conf/all", "net/ipv4/conf/default", "net/ipv4/neigh/default",
                "net/ipv6/conf/all", "net/ipv6/conf/default", "net/core", "net/bridge", "net/netfilter",
                "net/ipv4/vs")
NIC_SYSCTL_TREES = ("net/ipv4/conf/{}", "net/ipv4/neigh/{}", "net/ipv6/conf/{}")
ENI_TABLES = range(100, 100 + 16)  # labkit.modes.base.ENI_TABLE_BASE + k
# node-level links labkit's pod modes and datapaths make besides pod-facing ones (lx-<pod>)
LAB_LINKS = ("vxlan0", "cni0", "cbr0", "kube-ipvs0")
LAB_LINK_PREFIXES = ("lx-", "lktmp")
# modules the lab's tools load on demand (iptables' tables, nftables, IPVS schedulers, tunnels, tc):
# unloaded at restore when they were not loaded before; any other module loaded meanwhile is left
NET_MODULES = ("ip_vs", "nf_", "nft_", "nfnetlink", "xt_", "x_tables", "ip_tables", "ip6_tables", "iptable_",
               "ip6table_", "ipt_", "ip6t_", "ebt", "ip_set", "ipvlan", "macvlan", "veth", "vxlan", "netkit",
               "bridge", "stp", "llc", "br_netfilter", "dummy", "udp_tunnel", "ip6_udp_tunnel", "libcrc32c",
               "cls_", "act_", "sch_")
SAVE_TOOLS = {"legacy": ("iptables-legacy-save", "iptables-legacy-restore"),
              "nft": ("iptables-nft-save", "iptables-nft-restore")}


# ------------------------------------------------------------------ reading the host

def _ipr():
    from pyroute2 import IPRoute

    return IPRoute()


def _sysctls(nic_names) -> dict[str, str]:
    out: dict[str, str] = {}
    trees = list(SYSCTL_TREES) + [t.format(n) for n in nic_names for t in NIC_SYSCTL_TREES]
    for tree in trees:
        folder = SYSCTL_ROOT / tree
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            try:  # settings only: read-only counters (nf_conntrack_count) change by themselves
                if not f.is_file() or not f.stat().st_mode & 0o200 or not f.stat().st_mode & 0o444:
                    continue
            except OSError:
                continue
            try:
                out[str(f.relative_to(SYSCTL_ROOT))] = f.read_text().strip()
            except OSError:
                continue  # write-only (route/flush) or refused
    return out


def _modules() -> list[str]:
    try:
        return sorted(line.split()[0] for line in Path("/proc/modules").read_text().splitlines())
    except OSError:
        return []


def _route_key(msg) -> tuple:
    return (msg.get_attr("RTA_TABLE") or msg["table"], msg.get_attr("RTA_DST") or "", msg["dst_len"],
            msg.get_attr("RTA_GATEWAY") or "", msg.get_attr("RTA_OIF") or 0, msg["type"], msg["scope"],
            msg.get_attr("RTA_PRIORITY") or 0)


def _routes(ipr) -> list[tuple]:
    """IPv4 routes of every table but ``local`` and the kernel's own (they come and go with addresses)."""
    return [_route_key(m) for m in ipr.get_routes(family=socket.AF_INET)
            if (m.get_attr("RTA_TABLE") or m["table"]) != 255 and m["proto"] != 2]


def _rule_key(msg) -> tuple:
    return (msg.get_attr("FRA_PRIORITY") or 0, msg.get_attr("FRA_TABLE") or msg["table"], msg["action"],
            msg.get_attr("FRA_SRC") or "", msg["src_len"], msg.get_attr("FRA_DST") or "", msg["dst_len"],
            msg.get_attr("FRA_IIFNAME") or "", msg.get_attr("FRA_OIFNAME") or "", msg.get_attr("FRA_FWMARK") or 0)


def _rules(ipr) -> list[tuple]:
    return [_rule_key(m) for m in ipr.get_rules(family=socket.AF_INET)]


def _output(*argv: str) -> str | None:
    """``argv``'s stdout, or None when the tool is missing or fails (labkit could not have used it)."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _nft() -> tuple[list[str], dict[str, int]] | None:
    """From one ``nft -j list ruleset``: the tables (``family name``) and each chain (``family table
    chain``) with its number of rules (iptables-nft makes base chains on first use, and deleting its
    rules leaves them: they are chains the record must name). None without nft."""
    out = _output("nft", "-j", "list", "ruleset")
    if out is None:
        return None
    tables, chains = [], {}
    for item in json.loads(out or "{}").get("nftables", []):
        if "table" in item:
            tables.append(f"{item['table']['family']} {item['table']['name']}")
        elif "chain" in item:
            c = item["chain"]
            chains.setdefault(f"{c['family']} {c['table']} {c['name']}", 0)
        elif "rule" in item:
            r = item["rule"]
            key = f"{r['family']} {r['table']} {r['chain']}"
            chains[key] = chains.get(key, 0) + 1
    return sorted(tables), chains


def _ipsets() -> list[str] | None:
    """The names of the host's ipsets (kube-proxy's IPVS mode and labkit's iptables policy engine
    make some), or None without the tool."""
    out = _output("ipset", "list", "-n")
    return None if out is None else sorted(out.split())


def _has_clsact(ipr, index: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=index))


def _nics_by_mac(ipr) -> dict[str, dict]:
    out = {}
    for link in ipr.get_links():
        mac = (link.get_attr("IFLA_ADDRESS") or "").lower()
        out.setdefault(mac, {"name": link.get_attr("IFLA_IFNAME"), "index": link["index"],
                             "mtu": link.get_attr("IFLA_MTU"), "up": bool(link["flags"] & 1),
                             "addrs": [], "kind": _kind(link)})
    for a in ipr.get_addr(family=socket.AF_INET):
        for nic in out.values():
            if nic["index"] == a["index"]:
                nic["addrs"].append(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
    return out


def _kind(link) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    return (info.get_attr("IFLA_INFO_KIND") if info else "") or ""


def _where() -> dict:
    """Which kernel and network namespace a record describes: restoring it anywhere else would undo
    another namespace's rules and sysctls by this one's record."""
    return {"boot_id": (Path("/proc/sys/kernel/random/boot_id").read_text().strip()
                        if Path("/proc/sys/kernel/random/boot_id").exists() else ""),
            "netns": os.stat("/proc/self/ns/net").st_ino}


def journal_path(lab: str) -> Path:
    return JOURNAL_DIR / f"{lab}.json"


def begin(lab: str, nics: dict[str, str], spec_yaml: str) -> dict:
    """Record the host before lab ``lab`` changes it; ``nics``: lab NIC name -> MAC. Refuses when
    another lab's record is here (one lab per host), and keeps this lab's first record (a build
    repeated after a failure must restore to the state before the first one)."""
    JOURNAL_DIR.mkdir(mode=0o700, exist_ok=True)
    others = [p.stem for p in JOURNAL_DIR.glob("*.json") if p.stem != lab]
    if others:
        raise RuntimeError(f"this host holds lab {others[0]} already: `labkit down {others[0]}` first")
    path = journal_path(lab)
    if path.exists():
        return json.loads(path.read_text())
    ipr = _ipr()
    try:
        by_mac = _nics_by_mac(ipr)
        missing = [f"{n} ({m})" for n, m in nics.items() if m.lower() not in by_mac]
        if missing:
            raise RuntimeError(f"no interface with the MAC of {', '.join(missing)}")
        lab_nics = {}
        for name, mac in nics.items():
            nic = by_mac[mac.lower()]
            lab_nics[name] = {"mac": mac.lower(), "name": nic["name"], "mtu": nic["mtu"], "up": nic["up"],
                              "addrs": nic["addrs"], "clsact": _has_clsact(ipr, nic["index"])}
        nft = _nft()
        record = {"lab": lab, "time": time.time(), "where": _where(), "nics": lab_nics,
                  "links": sorted(n["name"] for n in by_mac.values()),
                  "routes": _routes(ipr), "rules": _rules(ipr),
                  "sysctls": _sysctls([n["name"] for n in lab_nics.values()]), "modules": _modules(),
                  "iptables": {k: _output(tools[0]) for k, tools in SAVE_TOOLS.items()},
                  "nft_tables": nft and nft[0], "nft_chains": nft and nft[1], "ipsets": _ipsets(),
                  "spec": spec_yaml}
    finally:
        ipr.close()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return record


# ------------------------------------------------------------------ restoring it

def _kill_labkit_processes(lab: str) -> int:
    """SIGKILL labkit's agents (other than this one and its parents) and everything in the lab's cgroup
    and pod namespaces."""
    from .. import naming, nsexec

    mine = {os.getpid(), os.getppid()}
    here = os.stat("/proc/self/ns/net").st_ino  # the host's namespace: agents of this host are in it
    killed = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in mine:
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            same_host = os.stat(proc / "ns" / "net").st_ino == here
        except OSError:
            continue
        if same_host and (b"labkit.remote.agent" in cmd or b"/opt/labkit/cache/bin/" in cmd):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    root = nsexec.cgroup2_root()
    cg = root / naming.lab_prefix(lab) if root else None
    if cg is not None and cg.exists():
        nsexec.kill_cgroup(cg)
    return killed + nsexec.kill_in_netns(nsexec.list_netns(naming.netns_name(lab, "")), spare=mine)


def _take_nics_back(lab: str, record: dict) -> None:
    """Move lab NICs that sit in a pod's namespace (exclusive ENIs) back here (this process's
    namespace: the host's), under a temporary name."""
    from .. import naming, nsexec

    macs = {n["mac"] for n in record["nics"].values()}
    ipr = _ipr()
    try:
        here = {(link.get_attr("IFLA_ADDRESS") or "").lower() for link in ipr.get_links()}
    finally:
        ipr.close()
    away = macs - here
    if not away:
        return
    for k, ns in enumerate(nsexec.list_netns(naming.netns_name(lab, ""))):
        pipr = nsexec.iproute(ns)
        try:
            for link in pipr.get_links():
                if (link.get_attr("IFLA_ADDRESS") or "").lower() in away:
                    pipr.link("set", index=link["index"], state="down")
                    pipr.link("set", index=link["index"], ifname=f"lktmp{k}")
                    pipr.link("set", index=link["index"], net_ns_pid=os.getpid())
        finally:
            pipr.close()


def _remove_pods(lab: str) -> int:
    from .. import naming, nsexec
    from ..state import LabState

    for mnt in nsexec.mounts_under(LabState(lab).dir):
        nsexec.unmount(mnt)
    n = sum(1 for ns in nsexec.list_netns(naming.netns_name(lab, "")) if nsexec.remove_netns(ns))
    root = nsexec.cgroup2_root()
    if root is not None and (root / naming.lab_prefix(lab)).exists():
        nsexec.remove_cgroup(root / naming.lab_prefix(lab))
    return n


def _ipvs_cleanup(record: dict, report: dict) -> None:
    """kube-proxy's IPVS services, when ip_vs stays loaded (it was before the lab): the datapath's own
    cleanup. When labkit loaded ip_vs, unloading it removes them."""
    if "ip_vs" not in record["modules"] or not Path("/proc/net/ip_vs").exists():
        return
    try:
        from ..node import NodeRuntime
        from ..spec import load_spec

        spec = load_spec(record["spec"], validate=False)
        NodeRuntime(spec, spec.nodes[0].name, whole_machine=True).datapath("ipvs").cleanup()
    except Exception as exc:  # noqa: BLE001 - reported, the rest of the restore goes on
        report["left"].append(f"IPVS services: {type(exc).__name__}: {exc}")


def _parse_save(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """``iptables-save`` text -> table -> (user chain names, rules as ``-A CHAIN …`` lines)."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    table = None
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            out[table] = ([], [])
        elif table and line.startswith(":"):
            name, policy = (line[1:].split() + ["-"])[:2]
            if policy == "-":  # a user chain (a built-in one has a policy and cannot be deleted)
                out[table][0].append(name)
        elif table and line.startswith("-A "):
            out[table][1].append(line)
    return out


def iptables_undo(before: str | None, now: str | None) -> str:
    """The ``iptables-restore --noflush`` input removing what ``now`` has beyond ``before``: rules
    added to chains that existed (deleted by their exact spec), then chains that did not (flushed,
    then deleted). Empty when nothing was added."""
    old, new = _parse_save(before or ""), _parse_save(now or "")
    out = []
    for table, (chains, rules) in new.items():
        o_chains, o_rules = old.get(table, ([], []))
        added_chains = [c for c in chains if c not in o_chains]
        remaining = list(o_rules)
        deletes = []
        for r in rules:
            if r in remaining:
                remaining.remove(r)
            elif r.split()[1] not in added_chains:
                deletes.append("-D " + r[3:])
        if not deletes and not added_chains:
            continue
        out.append(f"*{table}")
        out += deletes
        out += [f"-F {c}" for c in added_chains]
        out += [f"-X {c}" for c in added_chains]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def _undo(argv: list[str], what: str, report: dict, input: str | None = None, undone: int = 1) -> None:
    """Run one undoing command; count ``undone`` objects, or say what was left."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True)
    if proc.returncode == 0:
        report["netfilter"] += undone
    else:
        report["left"].append(f"{what}: {proc.stderr.strip()[-300:]}")


def _netfilter_undo(record: dict, report: dict) -> None:
    for flavour, (save, restore_tool) in SAVE_TOOLS.items():
        before = record["iptables"].get(flavour)
        if before is None:
            continue  # the tool was missing or failed before: labkit could not have used it either
        text = iptables_undo(before, _output(save))
        if text:
            _undo([restore_tool, "--noflush"], f"iptables ({flavour})", report, input=text,
                  undone=text.count("\n-D ") + text.count("\n-X "))
    if record.get("nft_tables") is not None:
        for table in (_nft() or ([], {}))[0]:
            if table not in record["nft_tables"]:
                _undo(["nft", "delete", "table", *table.split(" ", 1)], f"nft table {table}", report)
    if record.get("ipsets") is not None:  # after the rules that match on them
        for name in _ipsets() or []:
            if name not in record["ipsets"]:
                _undo(["ipset", "destroy", name], f"ipset {name}", report)
    if record.get("nft_chains") is not None:  # what is left after the tables went
        for chain, rules in (_nft() or ([], {}))[1].items():
            if chain not in record["nft_chains"] and rules == 0:
                _undo(["nft", "delete", "chain", *chain.split(" ", 2)], f"nft chain {chain}", report)


def _links_routes_rules(record: dict, report: dict) -> None:
    ipr = _ipr()
    try:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name in record["links"] or (link.get_attr("IFLA_ADDRESS") or "").lower() in \
                    {n["mac"] for n in record["nics"].values()}:
                continue
            if name in LAB_LINKS or name.startswith(LAB_LINK_PREFIXES):
                try:
                    ipr.link("del", index=link["index"])
                    report["links"] += 1
                except Exception as exc:  # noqa: BLE001
                    report["left"].append(f"link {name}: {exc}")
        nic_index = {link["index"] for link in ipr.get_links()
                     if (link.get_attr("IFLA_ADDRESS") or "").lower() in {n["mac"] for n in record["nics"].values()}}
        before = {tuple(r) for r in record["routes"]}
        for m in ipr.get_routes(family=socket.AF_INET):
            key = _route_key(m)
            table = key[0]
            if table == 255 or m["proto"] == 2 or key in before:
                continue
            if key[4] in nic_index or table in ENI_TABLES:
                try:
                    ipr.route("del", table=table, dst=f"{key[1] or '0.0.0.0'}/{key[2]}", type=key[5],
                              scope=key[6], **({"gateway": key[3]} if key[3] else {}),
                              **({"oif": key[4]} if key[4] else {}), **({"priority": key[7]} if key[7] else {}))
                    report["routes"] += 1
                except Exception as exc:  # noqa: BLE001
                    report["left"].append(f"route {key}: {exc}")
        rules_before = {tuple(r) for r in record["rules"]}
        for m in ipr.get_rules(family=socket.AF_INET):
            key = _rule_key(m)
            if key in rules_before:
                continue
            args = {"priority": key[0], "table": key[1], "action": key[2]}
            if key[3]:
                args.update(src=key[3], src_len=key[4])
            if key[5]:
                args.update(dst=key[5], dst_len=key[6])
            if key[7]:
                args["iifname"] = key[7]
            if key[8]:
                args["oifname"] = key[8]
            if key[9]:
                args["fwmark"] = key[9]
            try:
                ipr.rule("del", **args)
                report["rules"] += 1
            except Exception as exc:  # noqa: BLE001
                report["left"].append(f"rule {key}: {exc}")
    finally:
        ipr.close()


def _nics_back(record: dict, report: dict) -> None:
    """Each lab NIC: addresses, clsact, name, MTU and state as recorded (by MAC)."""
    ipr = _ipr()
    try:
        by_mac = _nics_by_mac(ipr)
        for lab_name, was in record["nics"].items():
            nic = by_mac.get(was["mac"])
            if nic is None:
                report["left"].append(f"{lab_name} ({was['mac']}, was {was['name']}) is not on the host")
                continue
            idx = nic["index"]
            for addr in nic["addrs"]:
                if addr not in was["addrs"]:
                    ip, _, plen = addr.partition("/")
                    ipr.addr("del", index=idx, address=ip, prefixlen=int(plen))
            if not was["clsact"] and _has_clsact(ipr, idx):
                ipr.tc("del", "clsact", idx)
            ipr.link("set", index=idx, state="down")
            if nic["name"] != was["name"]:
                if ipr.link_lookup(ifname=was["name"]):
                    report["left"].append(f"{was['name']} is taken: {lab_name} ({was['mac']}) stays {nic['name']}")
                else:
                    ipr.link("set", index=idx, ifname=was["name"])
                    report["renamed"] += 1
            if was["mtu"] and nic["mtu"] != was["mtu"]:
                ipr.link("set", index=idx, mtu=was["mtu"])
            for addr in was["addrs"]:
                if addr not in nic["addrs"]:
                    ip, _, plen = addr.partition("/")
                    ipr.addr("add", index=idx, address=ip, prefixlen=int(plen))
            if was["up"]:
                ipr.link("set", index=idx, state="up")
    finally:
        ipr.close()


def _sysctls_back(record: dict, report: dict) -> None:
    for key, value in record["sysctls"].items():
        path = SYSCTL_ROOT / key
        try:
            if path.exists() and path.read_text().strip() != value:
                path.write_text(value + "\n")
                report["sysctls"] += 1
        except OSError as exc:
            report["left"].append(f"sysctl {key.replace('/', '.')}: {exc.strerror}")


def _modules_back(record: dict, report: dict) -> None:
    from .agent import kernel_modules

    added = [m for m in _modules() if m not in record["modules"]]
    ours = [m for m in added if m in kernel_modules() or m.startswith(NET_MODULES)]
    # rmmod, not modprobe -r: that also unloads unused dependencies, which may have been loaded before
    # (ip_vs under ip_vs_rr); users first, so passes until nothing more goes
    for _ in range(len(ours)):
        left = [m for m in ours if m in _modules()]
        for m in left:
            subprocess.run(["rmmod", m], capture_output=True)
        if not left or [m for m in ours if m in _modules()] == left:
            break
    report["modules"] = [m for m in ours if m not in _modules()]


def restore(lab: str) -> dict:
    """Bring the host back to the record of lab ``lab`` and remove the record; counts of what was
    undone, and ``left``: what could not be (an empty list when the host is as it was)."""
    from ..state import LabState

    report = {"lab": lab, "processes": 0, "netns": 0, "netfilter": 0, "links": 0, "routes": 0, "rules": 0,
              "renamed": 0, "sysctls": 0, "modules": [], "left": []}
    path = journal_path(lab)
    record = json.loads(path.read_text()) if path.exists() else None
    if record is not None and record.get("where") != _where():
        raise RuntimeError(f"lab {lab}'s record on this machine was written in another network namespace or "
                           f"before a reboot ({record.get('where')}, here {_where()}): not restoring from it")
    report["processes"] = _kill_labkit_processes(lab)
    if record is None:  # killed before it recorded anything: nothing of the host was changed
        report["netns"] = _remove_pods(lab)
        LabState(lab).remove()
        report["record"] = False
        return report
    _take_nics_back(lab, record)
    report["netns"] = _remove_pods(lab)
    _ipvs_cleanup(record, report)
    _netfilter_undo(record, report)
    _links_routes_rules(record, report)
    _nics_back(record, report)
    _modules_back(record, report)
    _sysctls_back(record, report)  # last: unloading a module may have reset some
    LabState(lab).remove()
    path.unlink()
    try:
        JOURNAL_DIR.rmdir()  # the last record gone: nothing of labkit's is left on the host
    except OSError:
        pass
    report["record"] = True
    return report


__all__ = ["JOURNAL_DIR", "begin", "restore", "iptables_undo", "journal_path"]
