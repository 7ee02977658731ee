"""The CLI contract: wrong invocations get one clear line naming the flag or name at fault and the
fix, exit status 2, and create nothing; the exit-status table; --dry-run, --params, completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LABKIT = [sys.executable, "-m", "labkit.cli"]

# (argv, what the one line must name)
WRONG = [
    ([], "COMMAND"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["run"], "EXPERIMENT"),
    (["run", "nosuch"], "invalid choice: 'nosuch'"),
    (["run", "service-scale", "--services", "abc"], "--services"),
    (["run", "service-scale", "--services", ","], "services: name at least one"),
    (["run", "service-scale", "--services", "0"], "services: 0 is outside 1..65536"),
    (["run", "service-scale", "--repeats", "0"], "repeats: 0 is outside"),
    (["run", "service-scale", "--repeats", "x"], "--repeats: invalid int value"),
    (["run", "service-scale", "--samples", "5"], "samples: 5 is outside"),
    (["run", "service-scale", "--burst", "0"], "burst: 0 is outside"),
    (["run", "service-scale", "--datapaths", ","], "datapaths: name at least one"),
    (["run", "service-scale", "--datapaths", "iptables"], "did you mean 'iptables-nft'"),
    (["run", "service-scale", "--positions", "middlee"], "did you mean 'middle'"),
    (["run", "service-scale", "--metrics", "crr_rate"], "did you mean 'crr-rate'"),
    (["run", "service-scale", "--concurrency", "0"], "concurrency: 0 is outside 1..1024"),
    (["run", "service-scale", "--concurrency", "5000"], "concurrency: 5000 is outside 1..1024"),
    (["run", "service-scale", "--rate-seconds", "0"], "rate-seconds: 0.0 is outside"),
    (["run", "service-scale", "--window-ms", "5"], "window-ms: 5 is outside"),
    (["run", "service-scale", "--workload", "nginx"], "workload: unknown 'nginx'"),
    (["run", "service-scale", "--kube-proxy", "1.17"], "kube-proxy: unknown '1.17' (did you mean '1.18'?)"),
    (["run", "service-scale", "--backend", "vm"], "backend: unknown 'vm'"),
    (["run", "service-scale", "--mode", "ipvlan"], "did you mean 'eni-ipvlan'"),
    (["run", "service-scale", "--together", "--backend", "vagrant"], "together: on the vagrant backend"),
    (["run", "service-scale", "--burst", "100", "--samples", "50"], "burst: must be at most samples"),
    (["run", "service-scale", "--resume"], "--resume: expected one argument"),
    (["run", "service-scale", "--resume", "x", "--repeats", "2"], "give no others"),
    (["run", "service-scale", "--params", "/nonexistent/p.yaml"], "--params /nonexistent/p.yaml: no such file"),
    (["run", "pod-modes", "--modes", "tunnel"], "modes: unknown 'tunnel'"),
    (["run", "pod-modes", "--bandwidth-seconds", "0"], "bandwidth-seconds: 0.0 is outside"),
    (["run", "pod-modes", "--modes", "overlay+bpf-hr"], "modes: overlay+bpf-hr: eBPF host routing serves routed-veth "
                                                        "pods only; use one of eni-policy-route+bpf-hr, veth+bpf-hr"),
    (["run", "pod-modes", "--backend", "vagrant", "--modes", "host-network,veth"],
     "modes: host-network runs on the netns backend only"),
    (["run", "pod-modes", "--release", "trixie"], "release: the netns backend runs on this machine's kernel"),
    (["run", "pod-modes", "--backend", "hosts"], "inventory: give an inventory file with --backend hosts"),
    (["run", "pod-modes", "--inventory", "inv.yaml"], "inventory: give an inventory file with --backend hosts, and "
                                                      "only then"),
    (["run", "pod-modes", "--backend", "hosts", "--inventory", "/nonexistent/inv.yaml"],
     "inventory: inventory file /nonexistent/inv.yaml does not exist"),
    (["run", "policy-scale", "--rules", "0"], "rules: 0 is outside"),
    (["run", "policy-scale", "--engines", "bogus"], "engines: unknown 'bogus'"),
    (["up", "/nonexistent/lab.yaml"], "spec file /nonexistent/lab.yaml does not exist"),
    (["check", "a/b"], "lab name 'a/b' is not valid"),
    (["down", "../etc"], "lab name '../etc' is not valid"),
    (["exec", "demo"], "the following arguments are required: pod"),
    (["graph", "demo", "-o", "/nonexistent/dir/f.html"], "folder /nonexistent/dir does not exist"),
    (["graph", "demo", "-o", "f.txt"], "give a .html, .svg or .png file"),
    (["down", "--everyone"], "--everyone goes with --all"),
    (["down", "--all", "x"], "not both"),
    (["sweep", "/nonexistent.ipynb"], "no such file"),
    (["sweep", "notebooks/03-service-scale.ipynb", "-p", "repeats"], "expected NAME=VALUE"),
    (["report"], "the following arguments are required: run"),
    (["box", "build", "--bogus"], "unrecognized arguments: --bogus"),
    (["completion", "fish"], "invalid choice: 'fish'"),
]


@pytest.fixture
def sandbox(tmp_path):
    env = {**os.environ, "LABKIT_RESULTS": str(tmp_path / "results"), "LABKIT_STATE_DIR": str(tmp_path / "state")}
    return tmp_path, env


@pytest.mark.parametrize("argv,names", WRONG, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_wrong_invocation_gets_one_clear_line_exit_2_and_creates_nothing(sandbox, argv, names):
    tmp, env = sandbox
    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    proc = subprocess.run(LABKIT + argv, capture_output=True, text=True, env=env, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "is deprecated" not in ln]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert names in lines[0], lines[0]
    assert not (tmp / "results").exists() and not (tmp / "state").exists()  # nothing created
    after = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    assert not {n for n in after - netns_before if n.startswith("lk-")}


def test_help_lists_the_exit_statuses_and_environment():
    out = subprocess.run(LABKIT + ["--help"], capture_output=True, text=True).stdout
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "5 "):
        assert f"\n  {code}" in out
    for var in ("LABKIT_STATE_DIR", "LABKIT_RESULTS", "LABKIT_LOAD_CPUS"):
        assert var in out


def test_results_store_not_writable_is_a_usage_error(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere: a read-only mount is what stops it
        target = "/proc/labkit-results"
    else:
        target = str(tmp_path / "ro" / "results")
        (tmp_path / "ro").mkdir(mode=0o500)
    proc = subprocess.run(LABKIT + ["run", "service-scale", "--quick"], capture_output=True, text=True,
                          env={**os.environ, "LABKIT_RESULTS": target}, timeout=60)
    assert proc.returncode == 2 and "is not a writable folder" in proc.stderr, proc.stderr


def test_missing_lab_and_run_exit_4(tmp_path):
    env = {**os.environ, "LABKIT_RESULTS": str(tmp_path / "r"), "LABKIT_STATE_DIR": str(tmp_path / "s")}
    for argv in (["check", "nosuchlab"], ["down", "nosuchlab"], ["inspect", "nosuchlab"], ["results", "nosuchrun"]):
        proc = subprocess.run(LABKIT + argv, capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 4, (argv, proc.stderr)
    proc = subprocess.run(LABKIT + ["down", "nosuchlab", "--missing-ok"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "nothing to remove" in proc.stdout


def test_dry_run_and_params_file(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("datapaths: [ebpf, iptables-nft]\nservices: [1, 100]\nrepeats: 2\nmetrics: [crr, crr-rate]\n")
    proc = subprocess.run(LABKIT + ["run", "service-scale", "--params", str(params), "--repeats", "1", "--dry-run",
                                    "--json"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "LABKIT_RESULTS": str(tmp_path / "r")})
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["params"]["repeats"] == 1 and plan["params"]["datapaths"] == ["ebpf", "iptables-nft"]  # flag wins
    assert plan["points"] == {"crr": 2 * 2 * 5, "crr-rate": 2 * 2 * 5} and plan["estimated_seconds"] > 0
    assert len(plan["labs"]) == 2 and not (tmp_path / "r").exists()  # a dry run measures nothing


def test_old_flag_spellings_still_work_and_say_the_new_one(tmp_path):
    proc = subprocess.run(LABKIT + ["run", "policy-scale", "--datapaths", "iptables", "--services", "0,10",
                                    "--dry-run", "--json"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--datapaths is deprecated" in proc.stderr and "use --engines" in proc.stderr
    assert json.loads(proc.stdout)["params"]["services"] == [0, 10]


def test_completion_scripts_come_from_the_parser(tmp_path):
    script = subprocess.run(LABKIT + ["completion", "bash"], capture_output=True, text=True).stdout
    (tmp_path / "c.bash").write_text(script)
    out = subprocess.run(["bash", "-c", f"source {tmp_path}/c.bash; COMP_WORDS=(labkit run service-scale --conc); "
                                        "COMP_CWORD=3; _labkit; echo ${COMPREPLY[@]}"], capture_output=True, text=True)
    assert out.stdout.split() == ["--concurrency"]
    zsh = subprocess.run(LABKIT + ["completion", "zsh"], capture_output=True, text=True).stdout
    assert zsh.startswith("#compdef labkit") and "complete -o default -F _labkit labkit" in zsh


@pytest.mark.needs("root")
def test_run_json_is_the_summary_as_data_and_results_reads_it_back(tmp_path):
    """A small real run with ``--json``: stdout is one JSON document (progress and notes on stderr)
    with the medians per datapath and N that points.csv holds; ``results RUN --json`` gives the same
    run back."""
    import pandas as pd

    env = {**os.environ, "LABKIT_RESULTS": str(tmp_path / "r")}
    proc = subprocess.run(LABKIT + ["run", "service-scale", "-q", "--no-report", "--json", "--datapaths", "ebpf,nftables",
                                    "--services", "1,50", "--positions", "last", "--samples", "300", "--repeats", "1",
                                    "--metrics", "crr", "--updates", "0"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(proc.stdout)
    assert data["status"] == "complete" and data["experiment"] == "service-scale"
    crr = data["metrics"]["crr"]
    assert crr["stat"] == "p50_us" and crr["position"] == "last" and set(crr["median"]) == {"ebpf", "nftables"}
    points = pd.read_csv(Path(data["path"]) / "points.csv")
    row = points[(points.metric == "crr") & (points.datapath == "ebpf") & (points.services == 50)].iloc[0]
    assert crr["median"]["ebpf"]["50"] == pytest.approx(row.p50_us)
    shown = subprocess.run(LABKIT + ["results", data["run_id"], "--json"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["run_id"] == data["run_id"]
