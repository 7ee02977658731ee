"""One machine reached over SSH: commands, streams and file copies.

A :class:`Machine` runs shell commands on the machine (``run``), starts long-lived ones whose stdio
stays connected here (``popen``: an agent serving requests, a load client), and copies files back
(``fetch``, ``fetch_append``). ``ssh`` multiplexes every call over one master connection
(``ControlPersist``) when the config says so, so that a call costs one channel, not a handshake.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
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


__all__ = ["SshTarget", "Machine"]
