"""Tests of the performance preflight (:mod:`labkit.hostfacts`, ``labkit doctor --host``) on this machine.

The facts are checked against what this kernel really has: its ipvlan and netkit rows must agree with
the doctor's probes, which try to create those links rather than read the config as hostfacts does.
The ssh path runs through a fake ``ssh`` on PATH that records its command line and runs the remote
command locally (no sshd here), so the command line, the source fed on stdin and the JSON parsing are
the real ones. Hostile ``--host`` values must be refused before ssh is ever started. NICs used: ``lo``
and ``eth0`` as they are (nothing is created on the host, which a CI run's leak check may be watching).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labkit import doctor, hostfacts
from labkit.errors import UsageError

pytestmark = pytest.mark.timeout(60)

KEYS = {"name", "status", "detail", "fix", "value"}
STATUSES = {"ok", "warn", "missing", "unknown"}
LABKIT = Path(sys.executable).parent / "labkit"
NIC = "eth0" if os.path.exists("/sys/class/net/eth0") else "lo"


@pytest.fixture(scope="module")
def facts():
    return hostfacts.collect(["lo", NIC])


def rows_by_name(facts: dict) -> dict[str, dict]:
    return {r["name"]: r for r in facts["rows"]}


# ------------------------------------------------------------------ the module itself, no root needed

def test_stands_alone_on_python_3_9():
    """It is shipped to other hosts as one file: only standard-library imports, and 3.9 syntax."""
    source = Path(hostfacts.__file__).read_text()
    tree = ast.parse(source, feature_version=(3, 9))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported - set(sys.stdlib_module_names)


def test_cpu_lists_round_trip():
    assert hostfacts.parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert hostfacts.parse_cpu_list("") == hostfacts.parse_cpu_list("(null)") == []
    assert hostfacts.cpu_ranges([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"


# ------------------------------------------------------------------ facts of this machine

def test_every_row_has_the_five_keys_and_a_known_status(facts):
    assert set(facts) == {"kernel", "hostname", "cpus", "rows"}
    assert facts["kernel"] == os.uname().release and facts["cpus"] == os.cpu_count()
    for row in facts["rows"]:
        assert set(row) == KEYS, row
        assert row["status"] in STATUSES, row
        if row["status"] != "ok":
            assert row["fix"], f"{row['name']} is {row['status']} without a fix"
    json.dumps(facts)  # the manifest stores it as JSON
    names = [r["name"] for r in facts["rows"]]
    assert names[:6] == ["cpu_governor", "smt", "isolated_cpus", "irqbalance", "clocksource", "steal"]
    assert names[-7:] == ["kernel", "ipvlan", "ip_vs", "netkit", "vxlan", "macvlan", "btf"]


def test_cpu_and_clock_rows_match_sysfs(facts):
    rows = rows_by_name(facts)
    cpu = Path("/sys/devices/system/cpu")
    if not list(cpu.glob("cpu*/cpufreq/scaling_governor")):
        assert rows["cpu_governor"]["status"] == "unknown" and "no cpufreq" in rows["cpu_governor"]["detail"]
    isolated = (cpu / "isolated").read_text().strip()
    assert (rows["isolated_cpus"]["status"] == "warn") == (isolated == "")
    current = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource").read_text().strip()
    assert rows["clocksource"]["value"]["current"] == current
    assert (rows["clocksource"]["status"] == "ok") == (current == "tsc")
    steal = rows["steal"]["value"]
    assert 0 <= steal["now_pct"] <= 100 and 0 <= steal["since_boot_pct"] <= 100
    assert (rows["steal"]["status"] == "warn") == (max(steal["now_pct"], steal["since_boot_pct"]) > 1)
    assert (rows["irqbalance"]["status"] == "ok") == (rows["irqbalance"]["value"] == [])


def test_nic_rows_match_sysfs(facts):
    rows = rows_by_name(facts)
    for dev in ("lo", NIC):
        link = rows[f"nic:{dev}"]
        assert link["status"] == "ok" and link["value"]["mtu"] == int(Path(f"/sys/class/net/{dev}/mtu").read_text())
        driver = Path(f"/sys/class/net/{dev}/device/driver")
        assert link["value"]["driver"] == (os.path.basename(os.readlink(driver)) if driver.is_symlink() else None)
        queues = rows[f"queues:{dev}"]["value"]
        if queues["source"] != "ethtool -l":
            on_disk = os.listdir(f"/sys/class/net/{dev}/queues")
            assert queues["current"]["rx"] == sum(q.startswith("rx-") for q in on_disk) >= 1
        offloads = rows[f"offloads:{dev}"]
        if hostfacts._which("ethtool") is None:
            assert offloads["status"] == "unknown" and offloads["fix"] == "apt install ethtool"


def test_an_absent_nic_is_missing_with_its_fix():
    rows = hostfacts.nic_rows("lkhf-none0")
    assert [r["status"] for r in rows] == ["missing"] and "ip -br link" in rows[0]["fix"]


@pytest.mark.needs("root")
@pytest.mark.parametrize("feature", ["ipvlan", "netkit"])
def test_kernel_features_agree_with_the_doctors_probes(facts, feature):
    """hostfacts reads the config; doctor tries to create the link: both must say the same."""
    row, probed = rows_by_name(facts)[feature], doctor.check(feature)
    assert (row["status"] == "ok") == (probed.status == "ok"), (row, probed)
    if row["status"] == "missing":
        assert "VM backend" in row["fix"]


def test_btf_row_matches_sysfs(facts):
    assert rows_by_name(facts)["btf"]["value"] == os.path.exists("/sys/kernel/btf/vmlinux")


ETHTOOL_K = """Features for lkhf0:
rx-checksumming: on
tx-checksumming: on
\ttx-checksum-ipv4: off [fixed]
tcp-segmentation-offload: on
\ttx-tcp-segmentation: on
generic-segmentation-offload: on
generic-receive-offload: off
large-receive-offload: off [fixed]
"""
ETHTOOL_L = """Channel parameters for lkhf0:
Pre-set maximums:
RX:\t\tn/a
TX:\t\tn/a
Other:\t\tn/a
Combined:\t4
Current hardware settings:
RX:\t\tn/a
TX:\t\tn/a
Other:\t\tn/a
Combined:\t1
"""


def test_ethtool_output_is_read_when_ethtool_is_there(tmp_path, monkeypatch):
    """ethtool is not installed here: a stand-in printing ethtool 6.1's format for a 4-queue NIC."""
    (tmp_path / "k.txt").write_text(ETHTOOL_K)
    (tmp_path / "l.txt").write_text(ETHTOOL_L)
    fake = tmp_path / "ethtool"
    fake.write_text(f'#!/bin/sh\ncase "$1" in -k) cat {tmp_path}/k.txt;; -l) cat {tmp_path}/l.txt;; esac\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    offloads = hostfacts.nic_offloads(NIC)
    assert offloads["status"] == "warn" and offloads["fix"] == f"ethtool -K {NIC} gro on"
    assert offloads["value"] == {"tso": "on", "gso": "on", "gro": "off", "lro": "off [fixed]", "rx": "on", "tx": "on"}
    queues = hostfacts.nic_queues(NIC)
    assert queues["value"]["current"]["combined"] == 1 and queues["value"]["max"]["combined"] == 4
    assert "combined 1 (max 4)" in queues["detail"]
    if os.path.exists(f"/sys/class/net/{NIC}/device") and (os.cpu_count() or 1) > 1:
        assert queues["status"] == "warn" and queues["fix"] == f"ethtool -L {NIC} combined {min(4, os.cpu_count())}"


# ------------------------------------------------------------------ doctor --host: local, ssh, refusals

def test_host_cli_localhost_runs_in_process(capsys):
    code = doctor.host_cli("localhost", ["lo"], as_json=False)
    out = capsys.readouterr().out
    assert "-- host localhost" in out and "offloads:lo" in out
    summary = out.splitlines()[-1]
    assert summary.startswith("localhost: ") and code == (0 if summary.startswith("localhost: 0 missing") else 1)


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    """An ``ssh`` that writes its argv (one per line) to argv.txt and runs its last argument with sh,
    here, with its stdin: what ssh does with a remote command, minus the network."""
    script = tmp_path / "ssh"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv.txt\n'
                      'for last; do :; done\nexec sh -c "$last"\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    return tmp_path / "argv.txt"


def test_host_cli_over_ssh_feeds_the_source_and_parses_the_json(fake_ssh, capsys):
    code = doctor.host_cli("root@lab-host.example:2222", ["lo"], as_json=True, ssh_options=["-i", "/k"])
    data = json.loads(capsys.readouterr().out)
    argv = fake_ssh.read_text().splitlines()
    assert argv[:3] == ["-T", "-i", "/k"] and "BatchMode=yes" in argv
    assert argv[-4:] == ["2222", "--", "root@lab-host.example", "python3 - --json --nics lo"]
    assert argv[argv.index("-p") + 1] == "2222"
    assert data["target"] == "root@lab-host.example:2222" and data["kernel"] == os.uname().release
    assert "offloads:lo" in {r["name"] for r in data["rows"]} and all(set(r) == KEYS for r in data["rows"])
    assert code == (1 if any(r["status"] == "missing" for r in data["rows"]) else 0)


def test_host_cli_reports_a_failed_ssh_with_its_fix(tmp_path, monkeypatch, capsys):
    script = tmp_path / "ssh"
    script.write_text("#!/bin/sh\necho 'ssh: connect to host h port 22: Connection refused' >&2\nexit 255\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert doctor.host_cli("h", [], as_json=False) == 1
    err = capsys.readouterr().err
    assert "Connection refused" in err and "Fix: make `ssh h true` work" in err


@pytest.mark.parametrize("target", ["-oProxyCommand=x", "a b", "x;rm", "host:99999", "host:0", "$(id)", "",
                                    "user@", "h\nx", "`id`", "a|b"])
def test_hostile_targets_are_refused_before_ssh_runs(fake_ssh, target):
    with pytest.raises(UsageError, match="--host"):
        doctor.host_cli(target, [], as_json=True)
    assert not fake_ssh.exists()


@pytest.mark.parametrize("nic", ["-x", "eth0;id", "a b", "$(id)", "waytoolongnicname0"])
def test_hostile_nics_are_refused_before_ssh_runs(fake_ssh, nic):
    with pytest.raises(UsageError, match="--nics"):
        doctor.host_cli("somehost", [nic], as_json=True)
    assert not fake_ssh.exists()


# ------------------------------------------------------------------ the command line

def test_cli_host_localhost_json():
    proc = subprocess.run([str(LABKIT), "doctor", "--host", "localhost", "--nics", "lo", "--json"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    data = json.loads(proc.stdout)
    assert data["target"] == "localhost" and {r["name"] for r in data["rows"]} >= {"steal", "nic:lo", "btf"}
    assert proc.returncode == (1 if any(r["status"] == "missing" for r in data["rows"]) else 0), proc.stderr


def test_cli_nics_without_host_is_a_usage_error():
    proc = subprocess.run([str(LABKIT), "doctor", "--nics", "lo"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "--host" in proc.stderr and "Fix:" in proc.stderr


def test_module_command_line_table():
    proc = subprocess.run([sys.executable, "-m", "labkit.hostfacts", "--nics", "lo"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=Path(hostfacts.__file__).parents[1])
    assert proc.stdout.startswith(f"host {os.uname().nodename}: kernel {os.uname().release}")
    assert "FACT" in proc.stdout and "queues:lo" in proc.stdout
    statuses = {line.split()[1] for line in proc.stdout.splitlines()[2:] if not line.startswith(" ")}
    assert statuses <= STATUSES and proc.returncode == (1 if "missing" in statuses else 0)
