"""A participant's labs, through the labkit daemon: what :func:`labkit.lab.up`, :func:`~labkit.lab.open_lab`,
:func:`~labkit.lab.down` and :func:`~labkit.lab.labs` give a process that is not root while a daemon
serves (a classroom's notebooks run this way).

A :class:`ParticipantLab` answers what a :class:`labkit.lab.Lab` answers about its own lab — the spec
and address plan (computed here, as the daemon computes them), ``check``, ``services``, ``inspect``,
``exec``, ``down`` — with names as the participant wrote them (the daemon keeps alice's and bob's
"demo" apart). What needs root in the lab's namespaces (``spawn``, ``datapath``, ``run_client``)
raises :class:`labkit.errors.Refused` naming what a participant can use instead.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from .. import addressing, errors
from ..services import ServiceTable, table_from_spec
from ..spec import Spec, load_spec, parse_spec, validate
from ..spec.serialize import to_plain
from .client import Client, DaemonError

ROOT_ONLY = ("spawn", "datapath", "run_client", "client_session", "kernels", "pod_netns", "backend")


def _raise(exc: DaemonError) -> None:
    """The daemon's error as the library's own class (same exit status), so notebooks catch one kind."""
    cls = {c.exit_code: c for c in (errors.UsageError, errors.NoSuchLab, errors.MeasurementError,
                                    errors.ResultsStoreError, errors.Refused)}.get(exc.exit_code)
    if cls is None:
        raise exc
    raise cls(str(exc)) from None


class ParticipantLab:
    """A lab of this user's, built and used through the labkit daemon."""

    def __init__(self, spec: Spec, client: Client | None = None):
        self.spec = spec
        self.plan = addressing.plan(spec)
        self.client = client or Client()

    @property
    def name(self) -> str:
        return self.spec.name

    def services(self) -> ServiceTable:
        return table_from_spec(self.spec, self.plan)

    def check(self, services: bool = True, seed: int = 0) -> list:
        """Real connections between the lab's pods and to its Services, made by the daemon (as
        :meth:`labkit.lab.Lab.check`); ``seed`` is the daemon's."""
        from ..lab import CheckResult

        try:
            res = self.client.check(self.name, no_services=not services)
        except DaemonError as exc:
            _raise(exc)
        return [CheckResult(**r) for r in res["results"]]

    def inspect(self) -> dict:
        try:
            return self.client.inspect(self.name)
        except DaemonError as exc:
            _raise(exc)

    def exec(self, pod: str, argv: Sequence[str], capture_output: bool = True, text: bool = True,
             input: str | bytes | None = None, check: bool = False) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``pod`` as this user (only CAP_NET_RAW and CAP_NET_ADMIN kept) and wait for
        it. ``capture_output``: its stdout and stderr come back in the result, as subprocess.run's."""
        def reader(fd: int, into: list[bytes]) -> threading.Thread:
            def read() -> None:
                with os.fdopen(fd, "rb") as f:
                    into.append(f.read())
            t = threading.Thread(target=read, daemon=True)
            t.start()
            return t

        out: list[bytes] = []
        err: list[bytes] = []
        to_close, threads = [], []
        stdin_r, stdin_w = os.pipe()
        to_close.append(stdin_r)
        if capture_output:
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            to_close += [out_w, err_w]
            threads = [reader(out_r, out), reader(err_r, err)]
            fds = (stdin_r, out_w, err_w)
        else:
            fds = (stdin_r, 1, 2)
        feeder = None
        if input is not None:
            data = input.encode() if isinstance(input, str) else input
            def feed() -> None:
                with os.fdopen(stdin_w, "wb") as f:
                    try:
                        f.write(data)
                    except BrokenPipeError:
                        pass
            feeder = threading.Thread(target=feed, daemon=True)
            feeder.start()
        else:
            os.close(stdin_w)
        try:
            code = self.client.exec(self.name, pod, list(argv), *fds)
        except DaemonError as exc:
            _raise(exc)
        finally:
            for fd in to_close:  # the daemon's copies went with its process: our readers see EOF
                os.close(fd)
        for t in threads:
            t.join(10)
        if feeder:
            feeder.join(1)
        decode = (lambda b: b.decode(errors="replace")) if text else (lambda b: b)
        result = subprocess.CompletedProcess(list(argv), code, decode(b"".join(out)) if capture_output else None,
                                             decode(b"".join(err)) if capture_output else None)
        if check:
            result.check_returncode()
        return result

    def down(self) -> dict:
        return down(self.name, client=self.client)

    def __getattr__(self, attr: str):
        if attr in ROOT_ONLY:
            raise errors.Refused(
                f"Lab.{attr} needs root in the lab's namespaces; through the labkit daemon you have check(), "
                "services(), inspect(), exec(pod, argv) and down(), and measurements with `labkit run` "
                "(labkit.serve.participant.run)")
        raise AttributeError(attr)

    def __repr__(self) -> str:
        return f"<ParticipantLab {self.name}: {len(self.spec.nodes)} nodes, {len(self.spec.pods())} pods, " \
               f"datapath {self.spec.datapath}>"


# ---------------------------------------------------------------- module functions (labkit.lab's, for participants)

def up(spec: Spec | str | dict, progress: bool = True, client: Client | None = None) -> ParticipantLab:
    """Build a lab through the daemon: the spec is validated here first (the same errors as root
    gets), then sent as plain data; the daemon checks it again, with the classroom's quotas."""
    if isinstance(spec, Spec):
        spec = validate(spec)
    elif isinstance(spec, dict):
        spec = parse_spec(spec)
    else:
        spec = load_spec(spec)
    client = client or Client(progress=(lambda text: print(text, flush=True)) if progress else None)
    try:
        client.up(to_plain(spec))
    except DaemonError as exc:
        _raise(exc)
    return ParticipantLab(spec, client)


def open_lab(name: str, client: Client | None = None) -> ParticipantLab:
    """A lab of yours the daemon built (in this or another process): its spec comes back from
    ``inspect``, which the daemon answers only for your own labs."""
    client = client or Client()
    try:
        spec = client.call("spec", name=name)["spec"]
    except DaemonError as exc:
        _raise(exc)
    return ParticipantLab(parse_spec({**spec, "name": name}), client)


def down(name: str, missing_ok: bool = True, client: Client | None = None) -> dict:
    client = client or Client()
    try:
        return client.down(name)["removed"]
    except DaemonError as exc:
        if exc.exit_code == errors.NoSuchLab.exit_code and missing_ok:
            return {}
        _raise(exc)


def labs(client: Client | None = None) -> list[dict]:
    return (client or Client()).ls()


def exists(name: str, client: Client | None = None) -> bool:
    return any(r["name"] == name for r in labs(client))


def run(experiment: str, argv: Sequence[str] = (), client: Client | None = None) -> int:
    """``labkit run EXPERIMENT ARGV`` by the daemon when the measurement CPUs are free (the queue's
    position printed while waiting; the run's output as it comes); its exit status. Results go to
    your folder of the daemon's results store (``labkit results`` shows where)."""
    client = client or Client(progress=lambda text: print(text, flush=True))
    try:
        return client.run(experiment, list(argv))
    except DaemonError as exc:
        _raise(exc)


def run_experiment(experiment: str, params, resume: str | None = None, progress: bool = True):
    """An experiment's run (``service_scale.run(params)`` and the others, for a participant): sent to
    the daemon with its parameters, measured when the measurement CPUs are free, then copied from
    your folder of the daemon's store into your own results store (``LABKIT_RESULTS``) and returned
    as a :class:`labkit.results.Run` there."""
    import dataclasses
    import shutil

    from ..experiments import EXPERIMENTS
    from ..results import Run, results_root

    if resume:
        raise errors.Refused("resume: through the labkit daemon a run starts afresh (no --resume)")
    cls, _ = EXPERIMENTS[experiment]
    default = cls()
    sendable = {f.name for f, *_ in cls.fields()}
    chosen = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
              if getattr(params, f.name) != getattr(default, f.name)}
    odd = sorted(set(chosen) - sendable)
    if odd:
        raise errors.UsageError(f"{experiment}: {', '.join(odd)} cannot be set through the labkit daemon "
                                "(not parameters of `labkit run`)")
    lines: list[str] = []

    def output(text: str) -> None:
        lines.append(text)
        if progress:
            print(text, end="", flush=True)

    client = Client(progress=(lambda text: print(text, flush=True)) if progress else None, output=output)
    try:
        res = client.call("run", experiment=experiment, argv=[] if progress else ["--quiet"],
                          params=to_plain(chosen))
    except DaemonError as exc:
        _raise(exc)
    if res["exit"] or not res.get("run_ids"):
        raise errors.MeasurementError(f"{experiment}: the run through the labkit daemon ended with exit "
                                      f"{res['exit']}; its output ends:\n" + "".join(lines)[-1500:])
    source = Path(res["results"]) / res["run_ids"][-1]
    target = results_root() / source.name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, target, dirs_exist_ok=True)
    except OSError:  # no results store of your own here: the daemon's copy is readable
        return Run(source)
    return Run(target)


__all__ = ["ParticipantLab", "down", "exists", "labs", "open_lab", "run", "run_experiment", "up"]
