"""The remote layer's ssh session handling, on this machine: a command started detached outlives the
connection that started it, and the wait for its report survives connections that drop.

``LocalMachine`` runs what ssh would run on the machine with ``sh`` here, in a session of its own as
sshd does (sshd hangs up a session's processes when its connection goes); a dropped connection is a
command that exits 255 as ssh does. No VM: the VM tests build nodes over real ssh with this code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from labkit.remote.ssh import Machine, SshTarget, detached


class LocalMachine(Machine):
    def __init__(self, drop_waits: int = 0, unreachable: bool = False):
        super().__init__(SshTarget("localhost"), "local")
        self.drop_waits, self.unreachable = drop_waits, unreachable
        self.commands: list[str] = []

    def argv(self, command: str, tty: bool = False) -> list[str]:
        self.commands.append(command)
        if self.unreachable or ("while [ ! -e" in command and self.drop_waits > 0):
            self.drop_waits -= 1
            return ["sh", "-c", "sleep 0.2; echo 'Connection to node2 closed by remote host.' >&2; exit 255"]
        return ["setsid", "sh", "-c", command]


AGENT = """sh -c 'sleep 1.5; echo building >&2; echo "{\\"cgroup\\": \\"/sys/fs/cgroup/x\\"}"'"""


def test_the_report_arrives_through_dropped_connections(tmp_path):
    folder = str(tmp_path / "build-node2")
    m = LocalMachine(drop_waits=2)
    t0 = time.monotonic()
    proc = m.run_detached(detached(AGENT, folder), folder, timeout=60)
    assert proc.returncode == 0, proc
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"cgroup": "/sys/fs/cgroup/x"}
    assert proc.stderr.strip() == "building"
    assert len(proc.drops) == 2 and all("closed by remote host" in d for d in proc.drops), proc.drops
    assert sum("while [ ! -e" in c for c in m.commands) == 3  # two dropped waits, the third got it
    assert time.monotonic() - t0 < 10


def test_the_command_outlives_the_session_that_started_it(tmp_path):
    """sshd ends a dropped session's processes: the detached command is not one of them."""
    folder = tmp_path / "build-node1"
    start = subprocess.Popen(["sh", "-c", detached(AGENT, str(folder)) + "; sleep 30"], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (folder / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(start.pid, signal.SIGKILL)  # the connection is gone, and its session with it
    start.wait()
    proc = LocalMachine().run_detached("true", str(folder), timeout=30)  # a new connection waits for it
    assert proc.returncode == 0 and '"cgroup"' in proc.stdout, proc


def test_a_command_that_does_not_end_in_time_is_reported_as_such(tmp_path):
    folder = str(tmp_path / "slow")
    proc = LocalMachine().run_detached(detached("sleep 4", folder), folder, timeout=1)
    assert proc.returncode == 3 and proc.stdout == ""
    subprocess.run(["pkill", "-f", f"{folder}/out"], check=False)


def test_an_unreachable_machine_is_tried_again_then_reported(tmp_path):
    folder = str(tmp_path / "never")
    m = LocalMachine(unreachable=True)
    proc = m.run_detached(detached(AGENT, folder), folder, timeout=30)
    assert proc.returncode == 255
    assert [c.startswith("test -e") for c in m.commands] == [False, True, False, True]  # start, probe, twice
    assert not os.path.exists(folder)


def test_a_start_that_fails_on_the_machine_is_not_retried(tmp_path):
    folder = str(tmp_path / "x")
    m = LocalMachine()
    proc = m.run_detached("echo 'tar: unexpected EOF' >&2; exit 2", folder, timeout=30)
    assert proc.returncode == 2 and "unexpected EOF" in proc.stderr and len(m.commands) == 1
