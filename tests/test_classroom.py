"""``labkit classroom``: a room on this machine, driven as a room would drive it.

``labkit classroom up`` makes two seat accounts and an instructor's, starts the labkit daemon and
JupyterHub; two participants log in through JupyterHub in real Chromium (Playwright), each runs
notebook 06 from their home, which builds a lab named "demo" through the daemon and checks it. Then,
as those users, the ``labkit`` CLI: neither lists, checks, enters or removes the other's lab; an exec
runs as the participant and cannot read /etc/shadow; the instructor sees both. ``labkit classroom
down`` must leave the machine as it found it: accounts, homes, processes, folders, kernel objects.
Bad ``up`` arguments are refused before anything is made.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit import lab as labmod
from labkit import nsexec
from labkit.classroom import MARKER, STATE
from labkit.serve.daemon import SOCKET, machine_name, uid_tag

pytestmark = pytest.mark.needs("root")

LABKIT = str(Path(sys.executable).parent / "labkit")
PREFIX = "lkc"
ALICE, BOB, TEACHER = f"{PREFIX}01", f"{PREFIX}02", f"{PREFIX}-instructor"
NOTEBOOK = "06-your-own-lab.ipynb"
SYSTEM_FILES = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow", "/etc/subuid", "/etc/subgid")
ROOM_PROGRAMS = ("jupyterhub", "configurable-http-proxy", "labkit serve", "ipykernel")


def _tree(path: Path) -> list[str]:
    return sorted(str(p) for p in path.rglob("*")) if path.exists() else ["(absent)"]


def _room_processes() -> set[int]:
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(word in cmd for word in ROOM_PROGRAMS):
                out.add(int(p.name))
    return out


def fingerprint() -> dict:
    """What a classroom may touch: accounts, homes, its folders, its processes, kernel objects."""
    return {"files": {f: Path(f).read_text() for f in SYSTEM_FILES if Path(f).exists()},
            "home": sorted(os.listdir("/home")), "var": _tree(Path("/var/lib/labkit")),
            "run": _tree(SOCKET.parent), "processes": _room_processes(),
            "netns": sorted(nsexec.list_netns("lk-")), "labs": sorted(r["name"] for r in labmod.labs())}


def _free_port() -> int:
    for port in range(8731, 8900, 3):
        ok = True
        for p in (port, port + 1, port + 2):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no three free ports from 8731")


def classroom(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([LABKIT, "classroom", *args], capture_output=True, text=True, timeout=timeout)


def as_user(user: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The labkit CLI run by ``user`` as a login would run it (runuser: their groups, no root)."""
    return subprocess.run(["runuser", "-u", user, "--", "env", f"HOME={pwd.getpwnam(user).pw_dir}",
                           f"TMPDIR={pwd.getpwnam(user).pw_dir}/.tmp", LABKIT, *argv],
                          capture_output=True, text=True, timeout=timeout, cwd="/")


@pytest.fixture(scope="module")
def room():
    if (STATE / "journal.jsonl").exists():
        pytest.fail(f"a classroom is up on this machine already ({STATE}): `labkit classroom down` first")
    before = fingerprint()
    port = _free_port()
    t0 = time.monotonic()
    proc = classroom("up", "--seats", "2", "--prefix", PREFIX, "--port", str(port), "--bind", "127.0.0.1", "--json")
    info = {"before": before, "up_seconds": time.monotonic() - t0, "down": None}
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        info |= json.loads(proc.stdout)
        yield info
    finally:
        if (STATE / "journal.jsonl").exists():
            classroom("down")


def _outputs(nb_path: Path) -> tuple[str, list[str]]:
    """A saved notebook's printed text, and its errors."""
    nb = json.loads(nb_path.read_text())
    text, errors = [], []
    for cell in nb["cells"]:
        for o in cell.get("outputs", []):
            if o.get("output_type") == "stream":
                text.append("".join(o["text"]))
            elif o.get("output_type") == "error":
                errors.append(f"{o['ename']}: {o['evalue']}")
    return "".join(text), errors


def _where(page) -> str:
    """Where a notebook that did not finish stands: its kernel's state, its cells' execution counts,
    its last output, and the ends of the daemon's and the hub's logs."""
    status = page.locator(".jp-Notebook-ExecutionIndicator").first.get_attribute("data-status")
    prompts = page.locator(".jp-InputArea-prompt").all_inner_texts()
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    logs = {name: (STATE / name).read_text(errors="replace")[-1500:] if (STATE / name).exists() else "(none)"
            for name in ("daemon.log", "hub.log")}
    return (f"kernel {status}; prompts {prompts}; last output:\n{(outputs or [''])[-1][-1500:]}\n"
            + "\n".join(f"--- {name} ends:\n{tail}" for name, tail in logs.items()))


def _menu(page, top: str, command: str, seconds: float = 60) -> None:
    """Click a menu's command once JupyterLab enables it. Until the notebook's session is ready its
    commands are disabled, and a click on a disabled item does nothing: the menu is opened again until
    the item is enabled."""
    end = time.monotonic() + seconds
    while True:
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
        item = page.locator(f"li.lm-Menu-item[data-command='{command}']")
        item.wait_for(state="visible", timeout=10_000)
        if "lm-mod-disabled" not in (item.get_attribute("class") or ""):
            item.click()
            return
        page.keyboard.press("Escape")
        if time.monotonic() > end:
            raise AssertionError(f"{top} > {command} still disabled after {seconds:.0f} s")
        time.sleep(0.5)


def _run_all(page, tries: int = 3, seconds: float = 20) -> None:
    """Run > Run All Cells, and see the first cell start (its prompt leaves '[ ]:'). The notebook is
    brought to the front and its first cell clicked first: Run All runs JupyterLab's current notebook."""
    ran = page.locator(".jp-InputArea-prompt", has_text=re.compile(r"\[(\*|\d+)\]"))
    for attempt in range(1, tries + 1):
        page.bring_to_front()
        page.locator(".jp-Notebook .jp-Cell").first.click()
        _menu(page, "Run", "runmenu:run-all")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if ran.count():
                return
            time.sleep(0.25)
        print(f"Run All Cells, try {attempt}, started no cell in {seconds:.0f} s")  # JupyterLab still connecting
    raise AssertionError(f"Run All Cells did not start a cell in {tries} tries\n{_where(page)}")


def test_two_participants_build_and_check_demo_from_jupyterhub(room):
    from playwright.sync_api import sync_playwright

    seats = {s["user"]: s["password"] for s in room["seats"]}
    assert set(seats) == {ALICE, BOB, TEACHER}
    url = room["local_url"]
    pages = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        try:
            for user in (ALICE, BOB):  # two participants, two browser profiles (own cookies)
                page = browser.new_context().new_page()
                page.goto(url + "hub/login")
                page.fill("#username_input", user)
                page.fill("#password_input", seats[user])
                page.click("#login_submit")
                page.wait_for_url(re.compile(rf".*/user/{user}/lab/tree/{re.escape(NOTEBOOK)}"), timeout=120_000)
                page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
                pages[user] = page
            for user, page in pages.items():  # both kernels ready, then both run at once
                page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
            for page in pages.values():
                _run_all(page)
            t0 = time.monotonic()
            end = t0 + 240
            for user, page in pages.items():
                done = page.locator(".jp-OutputArea-output", has_text="stays up")
                failed = page.locator(".jp-OutputArea-output", has_text="Traceback")
                while time.monotonic() < end and not done.count() and not failed.count():
                    time.sleep(0.5)
                assert not failed.count(), f"{user}'s notebook failed:\n{failed.first.inner_text()[-2000:]}"
                assert done.count(), f"{user}'s notebook did not finish in 240 s\n{_where(page)}"
                print(f"{user}'s notebook done after {time.monotonic() - t0:.0f} s")
                _menu(page, "File", "docmanager:save")
            time.sleep(1.5)  # the save's PUT
        finally:
            browser.close()

    for user in (ALICE, BOB):
        acct = pwd.getpwnam(user)
        text, errors = _outputs(Path(acct.pw_dir) / "labkit" / NOTEBOOK)
        assert not errors, errors
        assert f"you are uid {acct.pw_uid}; labs are built through the labkit daemon" in text
        m = re.search(r"check: (\d+) of (\d+) connections ok", text)
        assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 12, text
        assert f"uid in the pod: {acct.pw_uid}" in text and acct.pw_uid != 0
        assert "cat /etc/shadow: denied: cat: /etc/shadow: Permission denied" in text
        assert "refused: quota: pods: 100 asked for; the quota is 12 per lab" in text, text
    # both labs are the participants', under their own names on the machine
    machine = {u: machine_name("demo", pwd.getpwnam(u).pw_uid) for u in (ALICE, BOB)}
    assert all(labmod.exists(m) for m in machine.values())


def test_participants_cannot_reach_each_others_lab(room):
    uid = {u: pwd.getpwnam(u).pw_uid for u in (ALICE, BOB)}
    bob_machine = machine_name("demo", uid[BOB])
    for user in (ALICE, BOB):
        ls = as_user(user, "ls", "--json")
        assert ls.returncode == 0, ls.stderr
        rows = json.loads(ls.stdout)
        assert [(r["name"], r["machine_name"]) for r in rows] == [("demo", machine_name("demo", uid[user]))]
    # alice names bob's lab every way she can: it is not hers, so it is not there for her
    for argv in (["check", bob_machine], ["exec", bob_machine, "cli-0", "id"], ["down", bob_machine],
                 ["services", bob_machine], ["inspect", bob_machine]):
        res = as_user(ALICE, *argv)
        assert res.returncode == 4, (argv, res.returncode, res.stdout, res.stderr)
        assert "no lab named" in res.stderr
    assert labmod.exists(bob_machine)
    # an exec is the participant: their uid, no /etc/shadow
    res = as_user(ALICE, "exec", "demo", "cli-0", "sh", "-c", "id -u; cat /etc/shadow")
    assert res.stdout.split()[0] == str(uid[ALICE])
    assert res.returncode != 0 and "Permission denied" in res.stderr
    res = as_user(ALICE, "check", "demo")
    assert res.returncode == 0, res.stdout + res.stderr
    # the instructor sees both labs (by their machine names)
    ls = as_user(TEACHER, "ls", "--json")
    assert ls.returncode == 0, ls.stderr
    assert {machine_name("demo", uid[u]) for u in (ALICE, BOB)} <= {r["machine_name"] for r in json.loads(ls.stdout)}


def test_status_and_a_second_up_is_refused(room):
    st = classroom("status", "--json")
    assert st.returncode == 0
    info = json.loads(st.stdout)
    assert info["up"] and info["seats"] == 2 and set(info["accounts"]) == {ALICE, BOB, TEACHER}
    assert all(info["processes"].values()), info["processes"]
    again = classroom("up", "--seats", "1", "--prefix", "lkd", "--port", "8990")
    assert again.returncode == 2 and "a classroom is up already" in again.stderr


def test_down_leaves_the_machine_as_before(room):
    uids = [pwd.getpwnam(u).pw_uid for u in (ALICE, BOB, TEACHER)]
    t0 = time.monotonic()
    proc = classroom("down", "--json")
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = json.loads(proc.stdout)
    assert counts["accounts"] == 3 and counts["labs"] == 2, counts
    after = fingerprint()
    before = room["before"]
    assert after["files"] == before["files"]
    for key in ("home", "var", "run", "netns", "labs"):
        assert after[key] == before[key], key
    assert not (after["processes"] - before["processes"]), "room processes left"
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and p.stat().st_uid in uids]
    print(f"classroom up {room['up_seconds']:.1f} s, down {took:.1f} s")


@pytest.mark.parametrize("argv, says", [
    (["--seats", "0"], "--seats 0: from 1 to 200"),
    (["--seats", "201"], "--seats 201: from 1 to 200"),
    (["--seats", "2", "--prefix", "../x"], "--prefix '../x': 1 to 12 lowercase"),
    (["--seats", "2", "--prefix", "Root"], "--prefix 'Root'"),
    (["--seats", "2", "--port", "80"], "--port 80: from 1024"),
    (["--seats", "2", "--quota", "pods=lots"], "quota"),
])
def test_bad_up_arguments_are_refused_and_nothing_is_made(argv, says):
    before = fingerprint()
    res = classroom("up", *argv)
    assert res.returncode == 2, res.stdout + res.stderr
    assert says in res.stderr, res.stderr
    assert fingerprint() == before
    assert not (STATE / "journal.jsonl").exists()


def test_a_seat_name_that_is_taken_is_refused():
    subprocess.run(["useradd", "--no-create-home", "--comment", "not labkit's", "lkx01"], check=True)
    try:
        before = fingerprint()
        res = classroom("up", "--seats", "1", "--prefix", "lkx")
        assert res.returncode == 2 and "lkx01 exist already: choose another --prefix" in res.stderr, res.stderr
        assert fingerprint() == before
    finally:
        subprocess.run(["userdel", "lkx01"], capture_output=True)


def test_a_seat_home_that_exists_is_refused_and_kept():
    home = Path("/home/lkz01")
    home.mkdir()
    (home / "keep").write_text("someone's")
    try:
        before = fingerprint()
        res = classroom("up", "--seats", "1", "--prefix", "lkz")
        assert res.returncode == 2 and "home folder /home/lkz01 exists already" in res.stderr, res.stderr
        assert fingerprint() == before and (home / "keep").read_text() == "someone's"
    finally:
        subprocess.run(["rm", "-rf", str(home)])


def test_down_never_removes_an_account_it_did_not_make(tmp_path):
    """A journal naming an account that is not labkit's (no marker in its comment): down keeps it."""
    from labkit import classroom as room

    subprocess.run(["useradd", "--no-create-home", "--comment", "someone's", "lky01"], check=True)
    try:
        j = room.Journal(tmp_path / "room")
        j.folder.mkdir()
        j.add(kind="folders", existed={}, started=0, seats=1, port=1, bind="x")
        j.add(kind="user", name="lky01")
        said = []
        counts = room.down(j.folder, say=said.append)
        assert counts["accounts"] == 0
        assert pwd.getpwnam("lky01").pw_gecos == "someone's"
        assert any("not one labkit made" in s and MARKER in s for s in said)
    finally:
        subprocess.run(["userdel", "lky01"], capture_output=True)


# ---------------------------------------------------------------- the workshop's notebooks as a participant

PARTICIPANT = 64993  # no account: the daemon trusts the kernel's uid alone


@pytest.fixture
def daemon_socket():
    """A labkit daemon of this test on its own socket and results store; the participant's labs and
    runs are removed afterwards."""
    import shutil
    import tempfile
    import threading

    from labkit.serve.daemon import Daemon, Quota, owner_of

    folder = Path(tempfile.mkdtemp(prefix="lktest-room-", dir="/var/tmp"))
    folder.chmod(0o755)
    home = folder / "home"
    home.mkdir()
    os.chown(home, PARTICIPANT, PARTICIPANT)
    d = Daemon(folder / "labkit.sock", "nogroup", Quota(), log=lambda text: None, results=folder / "results")
    d.bind()
    t = threading.Thread(target=d.serve_forever, daemon=True)
    t.start()
    yield d, home
    d.stop()
    t.join(5)
    for r in labmod.labs():
        if owner_of(r["name"]) == PARTICIPANT:
            labmod.down(r["name"])
    shutil.rmtree(folder, ignore_errors=True)


AS_PARTICIPANT = {  # the notebooks a participant runs, at test size (as tests/test_notebooks.py runs them)
    "00-workshop": {"lab_name": "demo"},
    "02-pod-network-modes": {"modes": ["eni-exclusive", "veth", "overlay"], "repeats": 1, "samples": 200,
                             "warmup": 20},
    "03-service-scale": {"updates": 1, "rate_seconds": 0.4, "window_ms": 100, "concurrency": 8},
    "04-network-policy": {"policies": [0, 20], "samples": 200, "warmup": 20, "repeats": 1, "lab_name": "demo"},
}


@pytest.mark.parametrize("name", list(AS_PARTICIPANT))
def test_workshop_notebooks_run_as_a_participant(daemon_socket, name):
    """A workshop notebook, unprivileged, through the daemon: its labs built by the daemon under the
    participant's name, its runs measured by the daemon (in the participant's folder of the daemon's
    store, copied into their own), every self-check right, nothing of the participant's left."""
    import nbformat
    from test_notebooks import SMALL_SCALE, all_checks_right

    d, home = daemon_socket
    out = home / f"{name}.out.ipynb"
    params = {"solutions": True, "results_dir": str(home / "results"), "progress": False, **AS_PARTICIPANT[name]}
    if name in ("00-workshop", "03-service-scale"):
        params = {**SMALL_SCALE, **params}
    t0 = time.monotonic()
    proc = subprocess.run(
        ["setpriv", f"--reuid={PARTICIPANT}", f"--regid={PARTICIPANT}", "--clear-groups", "env", "-i",
         f"HOME={home}", f"TMPDIR={home}", f"LABKIT_SOCKET={d.path}", f"LABKIT_RESULTS={home}/results",
         f"PATH={Path(sys.executable).parent}:/usr/bin:/bin",
         str(Path(sys.executable).parent / "papermill"), "--cwd", str(Path(__file__).parent.parent / "notebooks"),
         "--no-progress-bar", "-y", json.dumps(params), f"{name}.ipynb", str(out)],
        capture_output=True, text=True, timeout=600,
        cwd=str(Path(__file__).parent.parent / "notebooks"))
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    nb = nbformat.read(out, as_version=4)
    all_checks_right(nb, name)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "Traceback" not in text
    runs = sorted((d.results / str(PARTICIPANT)).iterdir())
    assert runs and all((r / "points.csv").exists() for r in runs)  # measured by the daemon, as root
    for r in runs:
        assert (home / "results" / r.name / "points.csv").read_text() == (r / "points.csv").read_text()
    assert not [r for r in labmod.labs() if r["name"].endswith(f"-u{uid_tag(PARTICIPANT)}")]
    print(f"{name} as a participant: {took:.0f} s")
