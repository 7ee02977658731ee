"""Performance facts of the machine this runs on: what makes latency numbers slow or noisy, each with its fix.

This module runs ON the machine examined: in-process for ``labkit doctor --host localhost``, and on a
remote host as ``python3 -m labkit.hostfacts [--nics eth0,ens6] [--json]`` or with its source fed to
``python3 -`` over ssh (:func:`labkit.doctor.host_cli`). So it uses only Python's standard library
(3.9+) and imports nothing else of labkit. It only reads — /sys, /proc, the kernel's config,
``ethtool -k``/``-l`` when installed — and changes nothing.

Each fact is one row ``{"name", "status", "detail", "fix", "value"}``. ``status`` is ``ok``, ``warn``
(runs work, but their numbers suffer: a frequency governor that ramps, SMT siblings, irqbalance moving
interrupts, a hypervisor stealing time), ``missing`` (a kernel feature labkit builds with is absent) or
``unknown`` (this machine does not expose it: no cpufreq in a VM, no ethtool). ``fix`` is one line;
``value`` is what was measured, as JSON, for a run's manifest. Row names: the CPU and clock facts by
their own names (``cpu_governor``, ``smt``, ``isolated_cpus``, ``irqbalance``, ``clocksource``,
``steal``), then ``nic:DEV``, ``queues:DEV`` and ``offloads:DEV`` per NIC asked for, then ``kernel``
and the kernel features (``ipvlan``, ``ip_vs``, ``netkit``, ``vxlan``, ``macvlan``, ``btf``).

Kernel features are read, not tried (doctor's probes try them, but they need root and pyroute2): the
running kernel's config (/proc/config.gz, else /boot/config-RELEASE) says built-in, module or absent;
without a readable config, /sys/module and /lib/modules/RELEASE/modules.{builtin,dep} decide.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

OK, WARN, MISSING, UNKNOWN = "ok", "warn", "missing", "unknown"
SYS_CPU = Path("/sys/devices/system/cpu")
SYS_NET = Path("/sys/class/net")
CLOCKSOURCE = Path("/sys/devices/system/clocksource/clocksource0")
STEAL_LIMIT_PCT = 1.0
STEAL_SAMPLE_S = 0.5
VM_BACKEND = "or run it on labkit's VM backend (`backend: vagrant`)"

# name, kernel config symbol, module file name, what a kernel lacking it needs
KERNEL_FEATURES = (
    ("ipvlan", "IPVLAN", "ipvlan",
     "a kernel with CONFIG_IPVLAN=m or y (Debian's stock kernels have it), " + VM_BACKEND),
    ("ip_vs", "IP_VS", "ip_vs",
     "a kernel with CONFIG_IP_VS=m or y (Debian's stock kernels have it), " + VM_BACKEND),
    ("netkit", "NETKIT", "netkit", "a 6.7+ kernel with CONFIG_NETKIT=y (Debian 13's 6.12 has it), "
     "or labkit's VM backend with `release: trixie`"),
    ("vxlan", "VXLAN", "vxlan", "a kernel with CONFIG_VXLAN=m or y (Debian's stock kernels have it)"),
    ("macvlan", "MACVLAN", "macvlan", "a kernel with CONFIG_MACVLAN=m or y (Debian's stock kernels have it)"),
)

# ethtool -k's names for the offloads that change per-packet cost, and the short names ethtool -K takes
OFFLOADS = (
    ("tso", "tcp-segmentation-offload"),
    ("gso", "generic-segmentation-offload"),
    ("gro", "generic-receive-offload"),
    ("lro", "large-receive-offload"),
    ("rx", "rx-checksumming"),
    ("tx", "tx-checksumming"),
)
# LRO is reported, not asked for: it is off on most NICs and must be off on a forwarding host.
WANTED_ON = ("tso", "gso", "gro", "rx", "tx")


def _row(name: str, status: str, detail: str, fix: str = "", value=None) -> dict:
    return {"name": name, "status": status, "detail": detail, "fix": fix, "value": value}


def _read(path) -> str | None:
    """A sysfs/procfs file's text, stripped; None if it cannot be read (absent, EINVAL from a driver)."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def parse_cpu_list(text: str | None) -> list[int]:
    """The kernel's CPU list format (``0-3,8,10-11``; empty or ``(null)`` for none) as CPU numbers."""
    cpus: list[int] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part or part == "(null)":
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def cpu_ranges(cpus) -> str:
    """CPU numbers back in the kernel's list format: [0, 1, 2, 5] -> ``0-2,5``."""
    out, run = [], []
    for cpu in sorted(set(cpus)):
        if run and cpu != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(cpu)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _which(tool: str) -> str | None:
    """Path of ``tool``, also looking in the sbin folders a non-login shell over ssh may lack."""
    path = os.environ.get("PATH", os.defpath) + ":/usr/local/sbin:/usr/sbin:/sbin"
    return shutil.which(tool, path=path)


# ------------------------------------------------------------------ CPUs and clocks

def cpu_governor() -> dict:
    """The cpufreq governor of every CPU: anything but ``performance`` ramps the clock with load, so the
    first requests of a run are slower than the rest and short runs read slow."""
    fix = "cpupower frequency-set -g performance"
    governors = {}
    for path in SYS_CPU.glob("cpu[0-9]*/cpufreq/scaling_governor"):
        governor = _read(path)
        if governor:
            governors[int(path.parent.parent.name[3:])] = governor
    if not governors:
        return _row("cpu_governor", UNKNOWN, "no cpufreq (a VM?): the hypervisor host sets the frequency",
                    f"nothing to do here; on the host itself: {fix}")
    by_governor: dict[str, list[int]] = {}
    for cpu, governor in sorted(governors.items()):
        by_governor.setdefault(governor, []).append(cpu)
    detail = ", ".join(f"{g} on CPU {cpu_ranges(cpus)}" for g, cpus in sorted(by_governor.items()))
    value = {f"cpu{cpu}": g for cpu, g in sorted(governors.items())}
    if set(by_governor) == {"performance"}:
        return _row("cpu_governor", OK, detail, value=value)
    return _row("cpu_governor", WARN, detail, fix, value)


def smt() -> dict:
    """Simultaneous multithreading: two hardware threads of one core share its caches and pipeline,
    so a client and a server (or two pods) on siblings slow each other down."""
    fix = "echo off > /sys/devices/system/cpu/smt/control (or pin each process to one thread per core)"
    control, active = _read(SYS_CPU / "smt/control"), _read(SYS_CPU / "smt/active")
    value = {"control": control, "active": active == "1"}
    if control is None:
        siblings = parse_cpu_list(_read(SYS_CPU / "cpu0/topology/thread_siblings_list"))
        if not siblings:
            return _row("smt", UNKNOWN, "no /sys/devices/system/cpu/smt and no CPU topology", fix, value)
        value["active"] = len(siblings) > 1
        if len(siblings) > 1:
            return _row("smt", WARN, f"on: CPU 0 shares its core with CPU {cpu_ranges(siblings)}", fix, value)
        return _row("smt", OK, "one thread per core (CPU 0 has no sibling)", value=value)
    if control in ("off", "forceoff", "notsupported", "notimplemented"):
        return _row("smt", OK, f"{control}: one thread per core", value=value)
    if active == "1":
        return _row("smt", WARN, f"control {control}, active: sibling threads share a core", fix, value)
    return _row("smt", OK, f"control {control}, but no core runs two threads", value=value)


def isolated_cpus() -> dict:
    """CPUs the scheduler leaves alone (isolcpus=) and without a periodic tick (nohz_full=): load
    generators pinned there are not preempted by the rest of the machine."""
    isolated = parse_cpu_list(_read(SYS_CPU / "isolated"))
    nohz = parse_cpu_list(_read(SYS_CPU / "nohz_full"))
    value = {"isolated": isolated, "nohz_full": nohz}
    ncpu = os.cpu_count() or 1
    if isolated:
        tick = f", nohz_full {cpu_ranges(nohz)}" if nohz else ", no nohz_full (the tick still interrupts them)"
        return _row("isolated_cpus", OK, f"isolated {cpu_ranges(isolated)}{tick}", value=value)
    if ncpu < 2:
        return _row("isolated_cpus", WARN, "none, and one CPU only: nothing can be isolated",
                    "a machine (or VM) with 2 CPUs or more", value)
    spare = cpu_ranges(range(max(1, ncpu // 2), ncpu))
    return _row("isolated_cpus", WARN, "none: every task and interrupt may run on the CPUs measured",
                f"boot with isolcpus={spare} nohz_full={spare} on the kernel command line, then pin the "
                "load generators and servers there", value)


def irqbalance() -> dict:
    """irqbalance moves interrupts between CPUs every few seconds: a NIC queue's interrupt changing CPU
    mid-run changes the run's latency."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        if _read(comm) == "irqbalance":
            pids.append(int(comm.parent.name))
    if pids:
        return _row("irqbalance", WARN, f"running (pid {', '.join(map(str, sorted(pids)))})",
                    "systemctl stop irqbalance during runs (start it again after)", sorted(pids))
    return _row("irqbalance", OK, "not running", value=[])


def clocksource() -> dict:
    """The kernel's clock source: every timestamp of a run reads it. ``tsc`` is read in user space for
    a few ns; hpet or acpi_pm take a slow device read, and a VM's kvm-clock is slower than the TSC."""
    current = _read(CLOCKSOURCE / "current_clocksource")
    available = (_read(CLOCKSOURCE / "available_clocksource") or "").split()
    value = {"current": current, "available": available}
    if current is None:
        return _row("clocksource", UNKNOWN, f"no {CLOCKSOURCE}/current_clocksource", "", value)
    if current == "tsc":
        return _row("clocksource", OK, f"tsc (available: {' '.join(available)})", value=value)
    if "tsc" in available:
        fix = f"echo tsc > {CLOCKSOURCE}/current_clocksource"
    else:
        fix = "the kernel found the TSC unstable: a CPU with an invariant TSC (a VM: pass it through), " \
              "or boot with tsc=reliable if it is invariant"
    return _row("clocksource", WARN, f"{current} (available: {' '.join(available) or 'none listed'})", fix, value)


def _cpu_times() -> list[int] | None:
    """The aggregate ``cpu`` line of /proc/stat: user nice system idle iowait irq softirq steal (jiffies).
    guest time is left out: the kernel counts it in user already."""
    for line in (_read("/proc/stat") or "").splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu" and len(fields) >= 9:
            return [int(x) for x in fields[1:9]]
    return None


def steal(sample_s: float = STEAL_SAMPLE_S) -> dict:
    """Time the hypervisor gave this VM's CPUs to someone else, now (over ``sample_s``) and since boot:
    stolen time is latency no setting inside the VM can remove."""
    fix = "run on dedicated vCPUs (pinned, not overcommitted) or on bare metal"
    first = _cpu_times()
    if first is None:
        return _row("steal", UNKNOWN, "no steal column in /proc/stat", fix)
    time.sleep(sample_s)
    second = _cpu_times() or first
    delta = [b - a for a, b in zip(first, second)]
    now = 100.0 * delta[7] / sum(delta) if sum(delta) > 0 else 0.0
    boot = 100.0 * second[7] / sum(second) if sum(second) > 0 else 0.0
    value = {"now_pct": round(now, 2), "since_boot_pct": round(boot, 2), "sample_s": sample_s}
    detail = f"{now:.2f} % over the last {sample_s:g} s, {boot:.2f} % since boot"
    if max(now, boot) > STEAL_LIMIT_PCT:
        return _row("steal", WARN, f"{detail} (over {STEAL_LIMIT_PCT:g} %)", fix, value)
    return _row("steal", OK, detail, value=value)


# ------------------------------------------------------------------ NICs

def _ethtool(flag: str, dev: str) -> tuple[str | None, str]:
    """``ethtool FLAG DEV``'s output; (None, why) when ethtool is absent or the driver refuses."""
    path = _which("ethtool")
    if path is None:
        return None, "no ethtool"
    try:
        proc = subprocess.run([path, flag, dev], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"ethtool {flag} failed: {exc}"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return None, f"ethtool {flag}: {lines[-1] if lines else f'exit {proc.returncode}'}"
    return proc.stdout, ""


def parse_ethtool_features(text: str) -> dict[str, str]:
    """``ethtool -k`` output as {short name: ``on``/``off``, plus `` [fixed]`` when the driver pins it}."""
    states = {}
    for line in text.splitlines():
        key, _, state = line.strip().partition(": ")
        states[key] = state.strip()
    return {short: states[long] for short, long in OFFLOADS if long in states}


def parse_ethtool_channels(text: str) -> dict[str, dict[str, int]]:
    """``ethtool -l`` output as {"max": {rx, tx, other, combined}, "current": {...}} (n/a as 0)."""
    out: dict[str, dict[str, int]] = {}
    section = None
    for line in text.splitlines():
        low = line.strip().lower()
        if low.startswith("pre-set maximums"):
            section = out.setdefault("max", {})
        elif low.startswith("current hardware settings"):
            section = out.setdefault("current", {})
        elif section is not None and ":" in low:
            key, _, number = low.partition(":")
            number = number.strip()
            section[key.strip()] = int(number) if number.isdigit() else 0
    return out


def nic_link(dev: str) -> dict:
    """Driver, speed, MTU and state of ``dev``: what the numbers of a run over it were measured on."""
    base = SYS_NET / dev
    driver_link = base / "device" / "driver"
    driver = os.path.basename(os.readlink(driver_link)) if driver_link.is_symlink() else None
    speed, mtu, state = (_read(base / name) for name in ("speed", "mtu", "operstate"))
    # speed: EINVAL for lo, -1 for virtio and a NIC without link: unknown either way
    mbps = int(speed) if speed and speed.isdigit() and int(speed) > 0 else None
    value = {"driver": driver, "speed_mbps": mbps, "mtu": int(mtu) if mtu and mtu.isdigit() else None,
             "operstate": state}
    speed_text = f"{mbps} Mb/s" if mbps else "speed unknown"
    detail = f"driver {driver or 'none (virtual device)'}, {speed_text}, MTU {mtu}, {state}"
    return _row(f"nic:{dev}", OK, detail, value=value)


def nic_queues(dev: str) -> dict:
    """Receive/transmit queue counts: with one queue, every packet's receive work lands on one CPU."""
    name, base = f"queues:{dev}", SYS_NET / dev
    text, why = _ethtool("-l", dev)
    channels = parse_ethtool_channels(text) if text else {}
    current = channels.get("current")
    if current:
        maxima = channels.get("max", {})
        value = {"source": "ethtool -l", "current": current, "max": maxima}
        counts = {k: current.get(k, 0) for k in ("rx", "tx", "combined")}
        detail = ", ".join(f"{k} {n} (max {maxima.get(k, 0)})" for k, n in counts.items() if n or maxima.get(k))
        receive, most = counts["rx"] + counts["combined"], maxima.get("rx", 0) + maxima.get("combined", 0)
    else:
        queues = [q.name for q in (base / "queues").iterdir()] if (base / "queues").is_dir() else []
        counts = {"rx": sum(q.startswith("rx-") for q in queues), "tx": sum(q.startswith("tx-") for q in queues)}
        value = {"source": f"{base}/queues", "current": counts, "max": None}
        detail = f"rx {counts['rx']}, tx {counts['tx']} (from {base}/queues; maximum unknown: {why})"
        receive, most = counts["rx"], 0
    ncpu = os.cpu_count() or 1
    if receive > 1 or ncpu < 2 or not (base / "device").exists():  # a virtual device has no IRQs to spread
        return _row(name, OK, detail, value=value)
    if most > receive:
        fix = f"ethtool -L {dev} combined {min(most, ncpu)}"
    else:
        fix = f"spread its receive work with RPS: echo {(1 << ncpu) - 1:x} > {base}/queues/rx-0/rps_cpus " \
              "(in a VM: give its NIC more queues on the hypervisor)"
    return _row(name, WARN, f"{detail}: one receive queue for {ncpu} CPUs", fix, value)


def nic_offloads(dev: str) -> dict:
    """Segmentation, receive-coalescing and checksum offloads: each off multiplies the per-packet cost the
    CPU pays, so runs on two hosts whose offloads differ are not comparable."""
    name = f"offloads:{dev}"
    text, why = _ethtool("-k", dev)
    if text is None:
        fix = "apt install ethtool" if why == "no ethtool" else f"none: the driver of {dev} does not report them"
        return _row(name, UNKNOWN, f"offloads unknown: {why}", fix)
    states = parse_ethtool_features(text)
    if not states:
        return _row(name, UNKNOWN, "ethtool -k listed none of tso/gso/gro/lro/rx/tx", "")
    detail = " ".join(f"{k} {v}" for k, v in states.items())
    can_turn_on = [k for k in WANTED_ON if states.get(k, "").startswith("off") and "[fixed]" not in states[k]]
    if can_turn_on:
        return _row(name, WARN, f"{detail} ({', '.join(can_turn_on)} off)",
                    f"ethtool -K {dev} {' '.join(f'{k} on' for k in can_turn_on)}", states)
    return _row(name, OK, detail, value=states)


def nic_rows(dev: str) -> list[dict]:
    if not (SYS_NET / dev).exists():
        return [_row(f"nic:{dev}", MISSING, f"no network device {dev} here",
                     "name a device of this host in --nics (ip -br link lists them)")]
    return [nic_link(dev), nic_queues(dev), nic_offloads(dev)]


# ------------------------------------------------------------------ kernel

def kernel_config() -> tuple[str | None, dict[str, str]]:
    """The running kernel's config as (where it was read, {CONFIG_X: value}); (None, {}) if unreadable."""
    release = os.uname().release
    for path in ("/proc/config.gz", f"/boot/config-{release}"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                text = f.read()
        except OSError:
            continue
        return path, dict(re.findall(r"^(CONFIG_\w+)=(.*)$", text, re.M))
    return None, {}


def _module_lists() -> tuple[str | None, str | None]:
    """modules.builtin and modules.dep of the running kernel (None where unreadable)."""
    mod = Path("/lib/modules") / os.uname().release
    return _read(mod / "modules.builtin"), _read(mod / "modules.dep")


def _has_ko(listing: str | None, module: str) -> bool:
    """Whether a modules.builtin/.dep text lists ``module``.ko (compressed or not) at the start of a line."""
    pattern = rf"(^|/){re.escape(module)}\.ko(\.(xz|zst|gz))?(:|$)"
    return bool(listing) and re.search(pattern, listing, re.M) is not None


def kernel_feature(name: str, symbol: str, module: str, fix: str, config: tuple, modules: tuple) -> dict:
    """Whether the running kernel has ``name``: built-in, a module (installed or not) or absent."""
    source, options = config
    builtin, dep = modules
    loaded = Path("/sys/module", module).is_dir()
    installed = _has_ko(dep, module)
    if source is not None:
        setting = options.get(f"CONFIG_{symbol}")
        if setting == "y":
            return _row(name, OK, f"built in (CONFIG_{symbol}=y in {source})", value="built-in")
        if setting == "m" and (installed or loaded):
            state = "loaded" if loaded else "loads on first use"
            return _row(name, OK, f"module, {state} (CONFIG_{symbol}=m in {source})", value="module")
        if setting == "m":
            return _row(name, MISSING, f"CONFIG_{symbol}=m in {source}, but no {module}.ko under /lib/modules",
                        f"install the modules of kernel {os.uname().release} (linux-image package), or {fix}",
                        "absent")
        return _row(name, MISSING, f"absent (CONFIG_{symbol} not set in {source})", fix, "absent")
    if _has_ko(builtin, module):
        return _row(name, OK, "built in (modules.builtin)", value="built-in")
    if installed:
        return _row(name, OK, f"module ({'loaded' if loaded else 'in modules.dep'})", value="module")
    if loaded:
        return _row(name, OK, f"present (/sys/module/{module})", value="built-in")
    if builtin is None and dep is None:
        return _row(name, UNKNOWN, "no kernel config, /sys/module entry or modules.builtin/.dep to read",
                    "expose the config: modprobe configs (for /proc/config.gz)")
    return _row(name, MISSING, "absent (not in modules.builtin, modules.dep or /sys/module)", fix, "absent")


def btf() -> dict:
    """BTF type information of the kernel, which CO-RE eBPF programs (libbpf, Cilium) need."""
    vmlinux = Path("/sys/kernel/btf/vmlinux")
    if vmlinux.exists():
        return _row("btf", OK, f"{vmlinux} ({vmlinux.stat().st_size // 1024} KiB)", value=True)
    return _row("btf", MISSING, "no /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF off)",
                "a kernel with CONFIG_DEBUG_INFO_BTF=y (Debian's stock kernels have it); bcc works without",
                False)


def kernel_rows() -> list[dict]:
    uname = os.uname()
    config, modules = kernel_config(), _module_lists()
    rows = [_row("kernel", OK, f"{uname.release} {uname.machine} (config: {config[0] or 'not readable'})",
                 value={"release": uname.release, "version": uname.version, "machine": uname.machine,
                        "config": config[0]})]
    rows += [kernel_feature(*feature, config=config, modules=modules) for feature in KERNEL_FEATURES]
    return rows + [btf()]


# ------------------------------------------------------------------ API and command line

def collect(nics=()) -> dict:
    """Every fact of this machine: {"kernel", "hostname", "cpus", "rows": [...]}, NICs ``nics`` included."""
    rows = [cpu_governor(), smt(), isolated_cpus(), irqbalance(), clocksource(), steal()]
    for dev in nics:
        rows += nic_rows(dev)
    rows += kernel_rows()
    return {"kernel": os.uname().release, "hostname": socket.gethostname(), "cpus": os.cpu_count(), "rows": rows}


def format_table(facts: dict) -> str:
    """A plain aligned table, each fix on the line under its row (the layout of ``labkit doctor``)."""
    rows = facts["rows"]
    width = max(len(r["name"]) for r in rows) + 2
    lines = [f"host {facts['hostname']}: kernel {facts['kernel']}, {facts['cpus']} CPUs",
             f"{'FACT':<{width}}{'STATUS':<9}DETAIL"]
    for r in rows:
        lines.append(f"{r['name']:<{width}}{r['status']:<9}{r['detail']}")
        if r["fix"] and r["status"] != OK:
            lines.append(f"{'':<{width + 9}}fix: {r['fix']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Print the facts; exit 1 when a row is ``missing``, else 0."""
    parser = argparse.ArgumentParser(prog="python3 -m labkit.hostfacts", description=__doc__.split("\n")[0])
    parser.add_argument("--nics", default="", metavar="NIC[,NIC...]", help="also report these network devices")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    facts = collect([n for n in args.nics.split(",") if n])
    print(json.dumps(facts, indent=2) if args.json else format_table(facts))
    return 1 if any(r["status"] == MISSING for r in facts["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
