"""One machine reached over SSH: commands, streams and file copies.

A :class:`Machine` runs shell commands on the machine (``run``), starts long-lived ones whose stdio
stays connected here (``popen``: an agent serving requests, a load client), and copies files back
(``fetch``, ``fetch_append``). ``ssh`` multiplexes every call over one master connection
(``ControlPersist``) when the config says so, so that a call costs one channel, not a handshake.
"""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError, LabStateError


@dataclass(frozen=True)
class SshTarget:
    """How to reach a machine: ``host`` is an alias of the ssh ``config`` file labkit wrote (VM labs),
    or an address with ``user``, ``port`` and ``key``."""

    host: str
    config: Path | None = None
    user: str | None = None
    port: int | None = None
    key: Path | None = None

    def argv(self, command: str, tty: bool = False) -> list[str]:
        out = ["ssh"]
        if self.config is not None:
            if not Path(self.config).exists():
                raise LabStateError(f"no ssh config {self.config} (is the lab up? `labkit ls`)")
            out += ["-F", str(self.config)]
        if self.user:
            out += ["-l", self.user]
        if self.port:
            out += ["-p", str(self.port)]
        if self.key:
            out += ["-i", str(self.key), "-o", "IdentitiesOnly=yes"]
        return [*out, "-t" if tty else "-T", self.host, command]


class Machine:
    """A machine commands run on. ``label`` names it in errors (a node's name)."""

    def __init__(self, target: SshTarget, label: str | None = None):
        self.target = target
        self.label = label or target.host

    def argv(self, command: str, tty: bool = False) -> list[str]:
        return self.target.argv(command, tty)

    def run(self, command: str, input: str | bytes | None = None, check: bool = True, timeout: float | None = 600,
            text: bool = True) -> subprocess.CompletedProcess:
        """``command`` (a shell command line) to completion, output captured."""
        proc = subprocess.run(self.argv(command), input=input, capture_output=True, text=text, timeout=timeout,
                              stdin=subprocess.DEVNULL if input is None else None)
        if check and proc.returncode != 0:
            err = proc.stderr if text else proc.stderr.decode(errors="replace")
            out = proc.stdout if text else proc.stdout.decode(errors="replace")
            raise BackendError(f"on {self.label}: `{command[:120]}` exited {proc.returncode}: "
                               f"{(err or out).strip()[-1500:]}")
        return proc

    def run_detached(self, start: str, folder: str, stdin: Path | None = None,
                     timeout: float = 900) -> subprocess.CompletedProcess:
        """Run ``start`` (whose last step is a :func:`detached` command writing to ``folder``), then
        wait for that command's report, opening the connection again while it drops (ssh's exit 255:
        a TCG guest too busy to answer keepalives, a network hiccup): the command goes on without it.
        Returns its stdout and stderr; ``returncode`` 0 once it ended (whatever its own status),
        3 if it did not end within ``timeout``, 255 if the machine stayed unreachable, another code if
        ``start`` failed. ``drops``: what each dropped connection said."""
        deadline = time.monotonic() + timeout
        drops: list[str] = []

        def done(proc, stdout: str = "", stderr: str = "") -> subprocess.CompletedProcess:
            out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr or proc.stderr)
            out.drops = drops  # type: ignore[attr-defined]
            return out

        for attempt in (1, 2):
            with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
                proc = self._bounded(start, deadline, stdin=f)
            if proc.returncode == 0:
                break
            if proc.returncode != 255:
                return done(proc)
            drops.append(f"start: {proc.stderr.strip()[-200:]}")
            if self._bounded(f"test -e {folder}/started", deadline).returncode == 0:
                break  # it started before the connection went
            if attempt == 2:
                return done(proc)
        while True:
            proc = self._bounded(_wait_report(folder, max(1.0, deadline - time.monotonic())), deadline)
            if proc.returncode != 255 or time.monotonic() > deadline:
                break
            drops.append(f"wait: {proc.stderr.strip()[-200:]}")
            time.sleep(2)
        if proc.returncode != 0:
            return done(proc)
        report, _, err = proc.stdout.partition(f"\n{REPORT_END}\n")
        return done(proc, report, err)

    def _bounded(self, command: str, deadline: float, stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
        """``command`` bounded by ``deadline`` (a connection that hangs past it counts as dropped: 255)."""
        try:
            return subprocess.run(self.argv(command), capture_output=True, stdin=stdin, text=True,
                                  timeout=max(5.0, deadline - time.monotonic() + 30))
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, 255, "", "timed out")

    def popen(self, command: str, tty: bool = False, **popen) -> subprocess.Popen:
        """``command`` started on the machine, its stdio connected as ``popen`` says."""
        return subprocess.Popen(self.argv(command, tty), **popen)

    def fetch(self, remote: str, local: Path, timeout: float = 300) -> None:
        """Copy a file here and remove it there; nothing when it does not exist."""
        proc = subprocess.run(self.argv(f"cat {remote} 2>/dev/null; rm -f {remote}"), capture_output=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if proc.stdout:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(proc.stdout)

    def fetch_append(self, remote_dir: str, copies: list[tuple[str, Path]], timeout: float = 300) -> None:
        """Append each file ``remote_dir/<name>`` to its local file (then remove it there): one tar
        stream for all of them; files that do not exist are skipped."""
        names = " ".join(name for name, _ in copies)
        proc = subprocess.run(self.argv(f"cd {remote_dir} && tar --ignore-failed-read -cf - {names} 2>/dev/null; "
                                        f"rm -f {names}"), capture_output=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if not proc.stdout:
            return
        local = dict(copies)
        with tarfile.open(fileobj=io.BytesIO(proc.stdout), mode="r:") as tar:
            for member in tar:
                if member.name in local and member.isfile():
                    with open(local[member.name], "ab") as out:
                        out.write(tar.extractfile(member).read())

    def close(self, timeout: float = 30) -> bool:
        """End the multiplexed master connection, if one runs. True if one did."""
        proc = subprocess.run([*self.argv("")[:-3], "-O", "exit", self.target.host], capture_output=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        return proc.returncode == 0


def detached(command: str, folder: str) -> str:
    """A shell command starting ``command`` detached from the ssh session that runs it (a session of
    its own, stdin from /dev/null), so that a dropped connection does not end it: its stdout goes to
    ``folder/out``, its stderr to ``folder/err``, and ``folder/report`` appears (``out`` renamed) when
    it has ended; ``folder/started`` says it was started. :meth:`Machine.run_detached` waits for it."""
    inner = f"{command} > {folder}/out 2> {folder}/err; mv {folder}/out {folder}/report"
    script = (f"mkdir -p {folder} && rm -f {folder}/started {folder}/out {folder}/err {folder}/report && "
              f": > {folder}/started && setsid sh -c {shlex.quote(inner)} < /dev/null > /dev/null 2>&1 &")
    return f"sh -c {shlex.quote(script)}"


REPORT_END = "@@labkit: stderr follows@@"


def _wait_report(folder: str, seconds: float) -> str:
    """A shell command waiting (at most ``seconds``) for a :func:`detached` command to end, then
    printing its stdout, the line :data:`REPORT_END` and its stderr; exit 3 if it did not end in time."""
    loops = max(1, int(seconds / 0.2))
    return (f"i=0; while [ ! -e {folder}/report ] && [ $i -lt {loops} ]; do sleep 0.2; i=$((i+1)); done; "
            f"[ -e {folder}/report ] || exit 3; cat {folder}/report; echo '{REPORT_END}'; cat {folder}/err")


__all__ = ["SshTarget", "Machine", "detached", "REPORT_END"]
