"""The labkit daemon (``labkit serve``) with real unprivileged clients: processes running as other
uids (setpriv) that talk to a daemon serving on a socket of this test, and hostile requests, each
refused or bounded, nothing created, the daemon still serving."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from labkit import lab as labmod
from labkit import nsexec
from labkit.serve import protocol
from labkit.serve.daemon import Daemon, Quota, machine_name, owner_of, uid_tag

pytestmark = pytest.mark.needs("root")

ALICE, BOB, TEACHER = 64999, 64997, 64995  # no accounts: the kernel's uids are all the daemon trusts
TEACHERS = "nogroup"  # gid 65534: TEACHER's group in these tests
GID = {ALICE: ALICE, BOB: BOB, TEACHER: 65534}
PY = sys.executable

SPEC = {"name": "demo", "datapath": "iptables-nft", "nodes": [{"name": "n1", "pods": [
    {"name": "a", "labels": {"app": "web"}}, {"name": "b", "labels": {"app": "web"}}]}],
    "services": [{"name": "web", "port": 80, "target_port": 8080, "selector": {"app": "web"}}]}


@pytest.fixture
def daemon():
    """A daemon on a socket of this test (1 s to send a request, at most 8 clients at once); every
    lab of the test users removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="lktest-serve-", dir="/tmp"))  # pytest's tmp_path is root's alone
    folder.chmod(0o755)
    d = Daemon(folder / "labkit.sock", TEACHERS, Quota(labs=2, pods=6), max_clients=8, request_seconds=1.0,
               log=lambda text: None, results=folder / "results")
    d.bind()
    t = threading.Thread(target=d.serve_forever, daemon=True)
    t.start()
    yield d
    d.stop()
    t.join(5)
    for r in labmod.labs():
        if owner_of(r["name"]) in (ALICE, BOB, TEACHER):
            labmod.down(r["name"])
    shutil.rmtree(folder, ignore_errors=True)


def as_user(d: Daemon, uid: int, code: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Python ``code`` run as ``uid`` with ``c``, a client of daemon ``d`` (``sys.argv[2:]``: ``argv``)."""
    script = "import json, sys\nfrom labkit.serve.client import Client\nc = Client(sys.argv[1])\n" + textwrap.dedent(code)
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={GID[uid]}", "--clear-groups", PY, "-c", script,
                           str(d.path), *argv], capture_output=True, text=True, timeout=timeout, cwd="/")


def call(d: Daemon, uid: int, op: str, **args) -> dict:
    """One request as ``uid``: the daemon's final reply (exit status, result or error)."""
    proc = as_user(d, uid, "print(json.dumps(c.request(sys.argv[2], **json.loads(sys.argv[3]))))", op, json.dumps(args))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def raw(d: Daemon, data: bytes, fds=(), read=True, timeout=5.0) -> dict | None:
    """Bytes sent as they are (root's connection: the daemon trusts nothing it is sent either way)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(d.path))
    try:
        try:
            if fds:
                socket.send_fds(s, [data], list(fds))
            elif data:
                s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it was all read: the answer is waiting
        if not read:
            return None
        s.settimeout(timeout)
        reply, _ = protocol.recv(s, protocol.MAX_REPLY)
        return reply
    finally:
        s.close()


def frame(obj) -> bytes:
    data = json.dumps(obj).encode()
    return struct.pack("!I", len(data)) + data


def machine_labs() -> set[str]:
    return {r["name"] for r in labmod.labs()}


# ---------------------------------------------------------------- names

def test_names_carry_their_owner_and_fit():
    assert uid_tag(1000) == "urs" and uid_tag(0) == "u0" and owner_of(machine_name("demo", 1000)) == 1000
    assert owner_of(machine_name("a-u1", 64999)) == 64999  # a name that looks like a tag stays apart
    assert owner_of("demo") is None and owner_of("vmdemo") is None
    assert len(machine_name("a" * 11, 2**32 - 1)) == 20 and len(machine_name("a" * 16, 1000)) == 20
    from labkit.errors import UsageError

    for bad in ("a" * 12, "Demo", "../x", "a/b", "a\0b", "", "-a", 5, None):
        with pytest.raises(UsageError, match="not valid here"):
            machine_name(bad, 2**32 - 1 if bad == "a" * 12 else 1000)


# ---------------------------------------------------------------- two participants

def test_two_participants_each_have_demo_and_cannot_touch_the_others(daemon):
    for uid in (ALICE, BOB):
        reply = call(daemon, uid, "up", spec=SPEC)
        assert reply["exit"] == 0 and reply["result"]["machine_name"] == machine_name("demo", uid), reply
    assert {machine_name("demo", ALICE), machine_name("demo", BOB)} <= machine_labs()
    for me, other in ((ALICE, BOB), (BOB, ALICE)):
        mine = call(daemon, me, "ls")["result"]["labs"]
        assert [(r["name"], r["machine_name"]) for r in mine] == [("demo", machine_name("demo", me))]
        check = call(daemon, me, "check", name="demo")
        assert check["exit"] == 0 and check["result"]["ok"] and len(check["result"]["results"]) > 0
        for op in ("check", "services", "inspect", "down"):  # the other's lab, by its machine name
            reply = call(daemon, me, op, name=machine_name("demo", other))
            assert reply["exit"] == 4 and "no lab named" in reply["error"] and "of yours" in reply["error"], reply
    assert {machine_name("demo", ALICE), machine_name("demo", BOB)} <= machine_labs()  # nothing removed
    teacher = call(daemon, TEACHER, "ls")["result"]["labs"]
    assert {machine_name("demo", ALICE), machine_name("demo", BOB)} <= {r["machine_name"] for r in teacher}
    assert call(daemon, TEACHER, "down", name=machine_name("demo", BOB))["exit"] == 0
    assert machine_name("demo", BOB) not in machine_labs()
    assert call(daemon, ALICE, "down", name="demo")["exit"] == 0
    assert machine_name("demo", ALICE) not in machine_labs()
    assert call(daemon, ALICE, "down", name="demo")["exit"] == 4


def test_exec_runs_as_the_caller_with_only_net_raw_and_net_admin(daemon):
    assert call(daemon, ALICE, "up", spec=SPEC)["exit"] == 0
    proc = as_user(daemon, ALICE, """
        import os
        r, w = os.pipe()
        code = c.exec("demo", "a", ["sh", "-c", "id -u; grep CapEff /proc/self/status; env | sort | tr '\\\\n' ' '; "
                                    "echo; ip -o addr show eth0; cat /etc/shadow || exit 3"],
                      stdin=0, stdout=w, stderr=w)
        os.close(w)
        print(json.dumps({"exit": code, "out": os.read(r, 65536).decode()}))
        """)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    lines = res["out"].splitlines()
    assert res["exit"] == 3 and lines[0] == str(ALICE), res  # a non-zero uid, which cannot read /etc/shadow
    assert lines[1].split() == ["CapEff:", "0000000000003000"]  # CAP_NET_ADMIN and CAP_NET_RAW only
    assert "LABKIT_SOCKET" not in lines[2] and "PATH=" in lines[2]  # a clean environment
    ip = str(labmod.open_lab(machine_name("demo", ALICE)).plan.pods["a"].ip)
    assert f"inet {ip}/" in lines[3] and "Permission denied" in res["out"]  # inside the pod's namespace
    reply = call(daemon, BOB, "exec", name="demo", pod="a", argv=["true"])  # no descriptors, not bob's lab
    assert reply["exit"] == 2 and "stdin, stdout and stderr" in reply["error"]
    proc = as_user(daemon, BOB, 'print(c.exec("demo", "a", ["true"]))')
    assert "no lab named 'demo' of yours" in proc.stderr


def test_quotas_and_root_only_things_are_refused_before_anything_exists(daemon):
    before = machine_labs()
    too_many = {**SPEC, "nodes": [{"name": "n1", "pods": [{"name": f"p{i}"} for i in range(7)]}]}
    cases = [
        (too_many, "pods: 7 asked for; the quota is 6 per lab"),
        ({**SPEC, "backend": "vagrant"}, "backend: vagrant (VMs) is not allowed"),
        ({**SPEC, "server": {"command": "sh -c 'id > /tmp/pwned'", "port": 9000}}, "would run as root"),
        ({**SPEC, "services": [{"name": "bulk", "port": 80, "count": 5000}]}, "services: 5000 asked for"),
    ]
    for spec, message in cases:
        reply = call(daemon, ALICE, "up", spec=spec)
        assert reply["exit"] == 7 and message in reply["error"], reply
    assert call(daemon, ALICE, "up", spec={**SPEC, "nodes": "x"})["exit"] == 2  # the spec's own errors: exit 2
    assert machine_labs() == before and not Path("/tmp/pwned").exists()
    for name in ("one", "two"):
        assert call(daemon, ALICE, "up", spec={**SPEC, "name": name})["exit"] == 0
    reply = call(daemon, ALICE, "up", spec={**SPEC, "name": "three"})
    assert reply["exit"] == 7 and "at most 2 lab(s) per participant" in reply["error"]
    assert machine_name("three", ALICE) not in machine_labs()


def test_a_restarted_daemon_finds_every_lab_and_a_gone_client_loses_only_its_reply(daemon):
    proc = subprocess.Popen(["setpriv", f"--reuid={BOB}", f"--regid={BOB}", "--clear-groups", PY, "-c",
                             "import sys, socket\nfrom labkit.serve import protocol\n"
                             "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                             "protocol.send(s, {'op': 'up', 'args': {'spec': " + repr(SPEC) + "}})\n",
                             str(daemon.path)], cwd="/")
    assert proc.wait(30) == 0  # sent, and gone before the answer
    deadline = time.monotonic() + 60
    while machine_name("demo", BOB) not in {r["name"] for r in labmod.labs() if r["status"] == "ready"}:
        assert time.monotonic() < deadline, "the lab of a client that went away was not built"
        time.sleep(0.2)
    daemon.stop()  # a new daemon on the same socket: the lab is found, and still bob's alone
    again = Daemon(daemon.path, TEACHERS, daemon.quota, log=lambda text: None)
    again.bind()
    t = threading.Thread(target=again.serve_forever, daemon=True)
    t.start()
    try:
        assert [r["name"] for r in call(again, BOB, "ls")["result"]["labs"]] == ["demo"]
        assert call(again, ALICE, "ls")["result"]["labs"] == []
        assert call(again, BOB, "down", name="demo")["exit"] == 0
    finally:
        again.stop()
        t.join(5)


# ---------------------------------------------------------------- hostile requests

HOSTILE = [
    ("a name with /", frame({"op": "check", "args": {"name": "../../etc"}}), 2, "not valid"),
    ("a name with ..", frame({"op": "down", "args": {"name": ".."}}), 2, "not valid"),
    ("a name with NUL", frame({"op": "check", "args": {"name": "a\0b"}}), 2, "not valid"),
    ("a very long name", frame({"op": "down", "args": {"name": "a" * 100_000}}), 2, "not valid"),
    ("a name that is not a string", frame({"op": "check", "args": {"name": {"x": 1}}}), 2, "not valid"),
    ("an up with a path in the name", frame({"op": "up", "args": {"spec": {**SPEC, "name": "../../x"}}}), 2, "not valid"),
    ("an up with no spec", frame({"op": "up", "args": {}}), 2, "as a mapping"),
    ("an up with a spec that is a string", frame({"op": "up", "args": {"spec": "/etc/shadow"}}), 2, "as a mapping"),
    ("10^6 pods", None, 7, "pods: 30000 asked for; the quota is 6 per lab"),
    ("an unknown request", frame({"op": "shell", "args": {}}), 2, "unknown request"),
    ("args that are not an object", frame({"op": "ls", "args": [1, 2]}), 2, "must be an object"),
    ("a frame that is not JSON", struct.pack("!I", 8) + b"\xff\xfegarb!!", 2, "not JSON"),
    ("a frame of JSON that is not an object", frame([1, 2, 3]), 2, "JSON object"),
    ("JSON nested 200,000 deep", struct.pack("!I", 400_000) + b"[" * 200_000 + b"]" * 200_000, 2, "not JSON"),
    ("a 2 GiB frame announced", struct.pack("!I", 2**31) + b"{}", 2, "at most 1048576"),
    ("half a request, then silence", struct.pack("!I", 100) + b'{"op": "ls"', 2, "did not arrive in time"),
    ("descriptors with a request that takes none", "fds", 2, "only exec takes file descriptors"),
    ("four descriptors", "4fds", 2, "more than 3 file descriptors"),
    ("exec with a NUL in an argument", "exec-nul", 2, "without NUL"),
    ("exec with 10,000 arguments", "exec-many", 2, "1 to 256 arguments"),
]


@pytest.mark.parametrize("what,data,exit_code,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_are_refused_nothing_is_created_and_the_daemon_serves_on(daemon, what, data, exit_code,
                                                                                    message):
    before, netns = machine_labs(), set(nsexec.list_netns("lk-"))
    if what == "10^6 pods":
        spec = {**SPEC, "nodes": [{"name": "n1", "pods": [{"name": f"p{i}"} for i in range(10**6)]}]}
        reply = raw(daemon, frame({"op": "up", "args": {"spec": spec}}))  # 17 MB: refused before it is read
        assert reply["exit"] == 2 and "at most 1048576" in reply["error"], reply
        spec["nodes"][0]["pods"] = [{"name": f"p{i}"} for i in range(30_000)]  # under 1 MiB: the quota
        data = frame({"op": "up", "args": {"spec": spec}})
        assert len(data) < protocol.MAX_REQUEST
        reply = call_raw_as(daemon, ALICE, data)
    elif data == "fds":
        reply = raw(daemon, frame({"op": "ls", "args": {}}), fds=(0, 1, 2))
    elif data == "4fds":
        reply = raw(daemon, frame({"op": "exec", "args": {}}), fds=(0, 1, 2, 2))
    elif data in ("exec-nul", "exec-many"):
        argv = ["echo", "a\0b"] if data == "exec-nul" else ["true"] * 10_000
        reply = raw(daemon, frame({"op": "exec", "args": {"name": "demo", "pod": "a", "argv": argv}}), fds=(0, 1, 2))
    else:
        reply = raw(daemon, data)
    assert reply["done"] and reply["exit"] == exit_code and message in reply["error"], reply
    assert machine_labs() == before and set(nsexec.list_netns("lk-")) == netns
    assert raw(daemon, frame({"op": "whoami", "args": {}}))["exit"] == 0  # still serving


def call_raw_as(d: Daemon, uid: int, data: bytes) -> dict:
    """Bytes sent as ``uid`` (the quota applies to participants)."""
    proc = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={GID[uid]}", "--clear-groups", PY, "-c",
                           "import sys, socket, json\nfrom labkit.serve import protocol\n"
                           "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                           "s.sendall(sys.stdin.buffer.read())\n"
                           "print(json.dumps(protocol.recv(s, protocol.MAX_REPLY)[0]))\n", str(d.path)],
                          input=data, capture_output=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_flood_of_connections_is_bounded_and_the_daemon_serves_after_it(daemon):
    """200 connections that send nothing: at most 8 are held (each for its 1 s to send a request),
    the rest are told the daemon is busy at once; once they are gone it serves again."""
    conns, busy = [], 0
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(daemon.path))
        conns.append(s)
    time.sleep(0.5)
    for s in conns:
        s.settimeout(3)
        try:
            reply, _ = protocol.recv(s, protocol.MAX_REPLY)
        except (protocol.ProtocolError, OSError):
            reply = None
        if reply and "busy" in reply.get("error", ""):
            busy += 1
        s.close()
    assert busy >= 150, busy
    assert threading.active_count() < 40
    time.sleep(1.5)
    assert raw(daemon, frame({"op": "whoami", "args": {}}))["exit"] == 0


def test_the_cli_goes_through_the_daemon_when_it_is_not_root(daemon):
    """`labkit up / ls / check / exec / services / down` as a participant, exactly as typed: the same
    commands and exit statuses as for root, the lab built by the daemon."""
    spec = daemon.path.parent / "demo.yaml"
    spec.write_text(json.dumps(SPEC))  # JSON is YAML
    spec.chmod(0o644)

    def labkit(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["setpriv", f"--reuid={ALICE}", f"--regid={ALICE}", "--clear-groups", PY, "-m",
                               "labkit.cli", *argv], capture_output=True, text=True, timeout=120, cwd="/",
                              env={"PATH": os.environ["PATH"], "LABKIT_SOCKET": str(daemon.path), "HOME": "/"})

    up = labkit("up", str(spec))
    assert up.returncode == 0 and "lab demo is up" in up.stdout and machine_name("demo", ALICE) in up.stdout, up
    ls = labkit("ls", "--json")
    assert [r["name"] for r in json.loads(ls.stdout)] == ["demo"]
    check = labkit("check", "demo")
    assert check.returncode == 0 and "connections as expected" in check.stdout, check
    assert "10.96." in labkit("services", "demo").stdout
    ex = labkit("exec", "demo", "b", "--", "sh", "-c", "id -u; exit 7")
    assert ex.returncode == 7 and ex.stdout.strip() == str(ALICE), ex
    missing = labkit("down", "nosuch")
    assert missing.returncode == 4 and "no lab named 'nosuch' of yours" in missing.stderr, missing
    assert labkit("down", "nosuch", "--missing-ok").returncode == 0
    down = labkit("down", "--all")
    assert down.returncode == 0 and "lab demo removed" in down.stdout, down
    assert machine_name("demo", ALICE) not in machine_labs()


TINY_RUN = ["-q", "--no-report", "--datapaths", "ebpf", "--services", "1", "--positions", "last", "--samples", "300",
            "--repeats", "1", "--updates", "0"]


def test_measurement_runs_take_the_cpus_in_turn_and_write_only_to_the_daemons_folders(daemon):
    """A participant asks for a run while another's measures: the second waits its turn (told so), the two
    never measure at once, each run's results are in the caller's folder of the daemon's store (root's
    folders, readable by the participant); a params file, a resume and VM runs are refused."""
    code = """
        import time
        events = []
        c.progress = events.append
        t0 = time.time()
        code = c.run("service-scale", json.loads(sys.argv[2]))
        print(json.dumps({"exit": code, "events": events, "t0": t0, "t1": time.time()}))
        """
    def start(uid: int) -> subprocess.Popen:
        return subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={GID[uid]}", "--clear-groups", PY, "-c",
                                 "import json, sys\nfrom labkit.serve.client import Client\nc = Client(sys.argv[1])\n"
                                 + textwrap.dedent(code), str(daemon.path), json.dumps(TINY_RUN)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")

    procs = {ALICE: start(ALICE)}
    deadline = time.monotonic() + 30
    while not daemon._queue:  # alice's run has its seat: bob asks while it measures
        assert time.monotonic() < deadline and procs[ALICE].poll() is None, procs[ALICE].stderr.read()
        time.sleep(0.05)
    procs[BOB] = start(BOB)
    out = {}
    for uid, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        out[uid] = json.loads(stdout.splitlines()[-1])
        assert out[uid]["exit"] == 0, out[uid]
    waited = [uid for uid in out if any("1 run(s) ahead of yours" in e for e in out[uid]["events"])]
    assert waited == [BOB], out
    from labkit.results import Run

    spans = []
    for uid in (ALICE, BOB):
        folder = daemon.results / str(uid)
        st = folder.stat()
        assert st.st_uid == 0 and oct(st.st_mode & 0o777) == "0o755"
        (run_dir,) = [p for p in folder.iterdir() if p.is_dir()]
        points = Run(run_dir).points()
        assert (points[points.metric == "crr"].samples == 300).all()
        m = json.loads((run_dir / "manifest.json").read_text())
        spans.append((m["started"], m["ended"]))
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0, spans  # one after the other, never together
    for argv, message in ((["--params", "/etc/shadow"], "no --params file"), (["--par=/etc/shadow"], "no --params"),
                          (["--resume", "../../x"], "no --resume"), (["--backend", "vagrant"], "VM runs")):
        reply = call(daemon, ALICE, "run", experiment="service-scale", argv=argv)
        assert reply["exit"] == 7 and message in reply["error"], reply
    assert call(daemon, ALICE, "run", experiment="rm -rf", argv=[])["exit"] == 2


def test_an_exec_ends_when_its_caller_goes_away(daemon):
    assert call(daemon, ALICE, "up", spec=SPEC)["exit"] == 0
    lb = labmod.open_lab(machine_name("demo", ALICE))
    cgroup = lb.backend.pod_cgroup(lb.spec, "a")

    def sleepers() -> list[int]:
        pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
        return [p for p in pids if Path(f"/proc/{p}/comm").exists() and Path(f"/proc/{p}/comm").read_text().strip() == "sleep"]

    proc = subprocess.Popen(["setpriv", f"--reuid={ALICE}", f"--regid={ALICE}", "--clear-groups", PY, "-c",
                             "import sys\nfrom labkit.serve.client import Client\n"
                             "Client(sys.argv[1]).exec('demo', 'a', ['sleep', '300'])", str(daemon.path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    deadline = time.monotonic() + 20
    while not sleepers():
        assert time.monotonic() < deadline and proc.poll() is None, "the command never started in the pod"
        time.sleep(0.1)
    (pid,) = sleepers()
    assert os.stat(f"/proc/{pid}").st_uid == ALICE
    proc.kill()  # the caller goes away (its descriptors too)
    proc.wait()
    deadline = time.monotonic() + 5
    while sleepers():
        assert time.monotonic() < deadline, "the command outlived its caller"
        time.sleep(0.1)


@pytest.mark.parametrize("argv, params, exit_code, message", [
    (["--services", ",".join(str(60000 + k) for k in range(200))], None, 7, "quota: this run would measure for"),
    (["--samples", "1000000000"], None, 7, "quota: this run would measure for"),
    (["--repeats", "100", "--samples", "200000"], None, 7, "quota: this run would measure for"),
    (["--dry-run"], None, 7, "--dry-run: not through the labkit daemon"),
    (["--services", "lots"], None, 2, "--services"),
    (["--no-such-flag"], None, 2, "unrecognized arguments"),
    ([], {"services": [1] * 5, "datapaths": ["nope"]}, 2, "unknown 'nope'"),
    ([], {"rm": "-rf /"}, 2, "unknown parameter 'rm'"),
    ([], ["not", "a", "mapping"], 2, "params must be a mapping"),
    ([], {"samples": "x" * 70000}, 2, "at most 65536 bytes"),
    ([], {"backend": "vagrant"}, 7, "VM runs are not allowed"),
])
def test_a_run_is_checked_and_bounded_before_it_waits_or_measures(daemon, argv, params, exit_code, message):
    """Every run request is parsed as `labkit run` parses it, validated, and its estimated time held to
    the quota's run_minutes: nothing is queued, measured or written when it is refused, and no
    parameters file of the daemon's is left behind."""
    args = {"experiment": "service-scale", "argv": argv} | ({"params": params} if params is not None else {})
    reply = call(daemon, ALICE, "run", **args)
    assert reply["exit"] == exit_code and message in reply["error"], reply
    assert not (daemon.results / str(ALICE)).exists()
    assert not list(daemon.path.parent.glob("labkit-params-*"))
    assert call(daemon, ALICE, "whoami")["exit"] == 0  # and it serves on
