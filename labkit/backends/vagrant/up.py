"""Driving ``vagrant up`` while labkit builds each node as soon as its VM answers.

:class:`VagrantUp` runs ``vagrant up --parallel`` in the background, logs its output with the seconds
since start on every line (``vagrant.log``) and reads each VM's milestones from it; :func:`join` waits
for it and for every node's pipeline, raising the first failure of either at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from ...errors import BackendError


class VagrantUp:
    """``vagrant up --parallel`` running in the background; its output goes to ``vagrant.log`` with
    the seconds since start on every line, and :meth:`steps` reads each VM's milestones from it."""

    MILESTONES = {"Creating image": "image", "Creating domain with": "define", "Starting domain": "start",
                  "Waiting for domain to get an IP": "wait_ip", "Waiting for machine to boot": "wait_ssh",
                  "Machine booted and ready": "ready"}

    def __init__(self, vdir: Path, env: dict):
        self.log_path = vdir / "vagrant.log"
        self.lines: list[tuple[float, str]] = []
        self.t0 = time.monotonic()
        self.seconds = 0.0
        self.proc = subprocess.Popen(["vagrant", "up", "--provider", "libvirt", "--parallel"], cwd=vdir, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.exit_seconds: float | None = None
        threading.Thread(target=self._wait_exit, daemon=True).start()

    def _wait_exit(self) -> None:
        self.proc.wait()
        self.exit_seconds = round(time.monotonic() - self.t0, 1)

    def _read(self) -> None:
        with open(self.log_path, "a") as log:
            log.write("\n$ vagrant up --provider libvirt --parallel\n")
            for line in self.proc.stdout:
                t = time.monotonic() - self.t0
                self.lines.append((t, line.rstrip()))
                log.write(f"[{t:6.1f}] {line}")
                log.flush()
        self.seconds = time.monotonic() - self.t0  # its output ends when it does

    @property
    def failed(self) -> bool:
        return self.proc.poll() not in (None, 0)

    def wait(self, timeout: float) -> None:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BackendError(f"vagrant up did not finish within {timeout:.0f} s (log: {self.log_path})") from None
        self.reader.join(timeout=10)
        if rc != 0:
            raise BackendError(f"vagrant up exited {rc} (log: {self.log_path})")

    def stop(self) -> None:
        """End a running ``vagrant up`` (after a node failed): SIGINT lets it stop cleanly, then SIGKILL."""
        if self.proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGINT, 60), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def steps(self) -> dict[str, dict[str, float]]:
        """Per VM, the seconds since start at which Vagrant reported each milestone."""
        return self.parse_steps(self.lines)

    @classmethod
    def parse_steps(cls, lines: list[tuple[float, str]]) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for t, line in lines:
            if not line.startswith("==> ") or ": " not in line:
                continue
            node, _, msg = line[4:].partition(": ")
            for text, key in cls.MILESTONES.items():
                if msg.startswith(text):
                    out.setdefault(node, {}).setdefault(key, round(t, 1))
        return out


def join(up: VagrantUp, nodes: list, deadline: float) -> list[dict]:
    """Wait for ``vagrant up`` and every node's pipeline; the first failure of either is raised at once."""
    from concurrent.futures import FIRST_EXCEPTION
    from concurrent.futures import wait as wait_futures

    while True:
        done, pending = wait_futures(nodes, timeout=0.5, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                raise f.exception()
        if up.proc.poll() is not None:
            up.wait(timeout=60)  # raises if it failed
            if not pending:
                return [f.result() for f in nodes]
        if time.monotonic() > deadline:
            raise BackendError(f"the VMs were not up within 30 min (log: {up.log_path})")


def wait_for_sshd(ip: str, up: VagrantUp, node: str, timeout: float = 600) -> None:
    """Until something listens on ``ip``:22 (the VM's sshd); fails early if ``vagrant up`` failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up.failed:
            raise BackendError(f"vagrant up failed before {node} answered (log: {up.log_path})")
        try:
            with socket.create_connection((ip, 22), timeout=2) as sock:
                sock.settimeout(5)
                if sock.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(1)
    raise BackendError(f"{node} ({ip}) did not answer on port 22 within {timeout:.0f} s "
                       f"(serial console: {up.log_path.parent / (node + '.serial')})")


def kill_processes_in(folder: Path) -> int:
    """SIGKILL every Vagrant process working in ``folder`` (a lab's own Vagrant folder)."""
    killed = 0
    if not folder.exists():
        return 0
    target = str(folder.resolve())
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if os.readlink(proc / "cwd") == target and b"vagrant" in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
        except OSError:
            continue
    return killed


def count_vagrant_machines(vdir: Path) -> int:
    machines = vdir / ".vagrant" / "machines"
    return sum(1 for m in machines.glob("*/libvirt/id")) if machines.exists() else 0
