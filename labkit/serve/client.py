"""The labkit daemon's client: what the ``labkit`` CLI (and a participant's Python) use when they do
not run as root. Errors come back as the same :mod:`labkit.errors` the library raises, with the same
exit statuses.

>>> from labkit.serve.client import Client
>>> c = Client()
>>> c.up({"name": "demo", "nodes": [{"name": "n1", "pods": [{"name": "a"}, {"name": "b"}]}]})
>>> [r["ok"] for r in c.check("demo")["results"]]
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import errors
from . import protocol
from .daemon import SOCKET

_BY_EXIT = {1: errors.MeasurementError, 2: errors.UsageError, 3: errors.LabkitError, 4: errors.NoSuchLab,
            6: errors.ResultsStoreError, 7: errors.Refused}


def socket_path() -> Path:
    return Path(os.environ.get("LABKIT_SOCKET", str(SOCKET)))


def use_daemon() -> bool:
    """Whether this process goes through the daemon: not root, and a daemon's socket is there."""
    return os.geteuid() != 0 and socket_path().exists()


def _to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class DaemonError(errors.LabkitError):
    """The daemon answered with an error; ``exit_code`` is the one it gave."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Client:
    def __init__(self, path: Path | str | None = None, progress: Callable[[str], None] | None = None,
                 output: Callable[[str], None] | None = None):
        self.path = Path(path) if path else socket_path()
        self.progress = progress
        self.output = output or _to_stdout  # a run's own output, as it prints it

    def call(self, op: str, fds: tuple[int, ...] = (), **args: Any) -> dict:
        """One request; its result, or the daemon's error raised (exit status kept)."""
        reply = self.request(op, fds, **args)
        if "error" in reply:
            raise DaemonError(reply["error"], int(reply.get("exit", 5)))
        return reply.get("result", {}) | {"exit": reply.get("exit", 0)}

    def request(self, op: str, fds: tuple[int, ...] = (), **args: Any) -> dict:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.connect(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise errors.UsageError(f"no labkit daemon answers on {self.path} ({exc.strerror}): labs need root, "
                                        "or the daemon (`sudo labkit serve`, or `labkit classroom up`)") from None
            protocol.send(sock, {"op": op, "args": args}, fds)
            while True:
                reply, _ = protocol.recv(sock, protocol.MAX_REPLY)
                if reply is None:
                    raise errors.LabkitError("the labkit daemon closed the connection without an answer")
                if reply.get("event") == "progress":
                    if self.progress:
                        self.progress(str(reply.get("text", "")))
                    continue
                if reply.get("event") == "output":
                    self.output(str(reply.get("text", "")))
                    continue
                return reply
        finally:
            sock.close()

    # ------------------------------------------------------------ the requests
    def run(self, experiment: str, argv: list[str]) -> int:
        """``labkit run EXPERIMENT ARGV`` by the daemon, when the measurement CPUs are free (its output
        on this process's stdout, the queue's progress to ``progress``); its exit status."""
        return int(self.call("run", experiment=experiment, argv=list(argv))["exit"])

    def whoami(self) -> dict:
        return self.call("whoami")

    def up(self, spec: dict) -> dict:
        return self.call("up", spec=spec)

    def ls(self) -> list[dict]:
        return self.call("ls")["labs"]

    def check(self, name: str, no_services: bool = False) -> dict:
        return self.call("check", name=name, no_services=no_services)

    def services(self, name: str) -> list[dict]:
        return self.call("services", name=name)["services"]

    def inspect(self, name: str) -> dict:
        return self.call("inspect", name=name)["inspect"]

    def down(self, name: str) -> dict:
        return self.call("down", name=name)

    def exec(self, name: str, pod: str, argv: list[str], stdin: int | None = None, stdout: int | None = None,
             stderr: int | None = None) -> int:
        """Run ``argv`` in a pod of yours with this process's stdio (or the descriptors given); its
        exit status."""
        fds = (sys.stdin.fileno() if stdin is None else stdin, sys.stdout.fileno() if stdout is None else stdout,
               sys.stderr.fileno() if stderr is None else stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        return int(self.call("exec", fds, name=name, pod=pod, argv=list(argv))["exit"])


__all__ = ["Client", "DaemonError", "socket_path", "use_daemon"]
