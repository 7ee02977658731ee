"""What labkit copies to a remote machine, and where it lands there.

``payload.tar`` unpacks into :data:`REMOTE_ROOT` (``/opt/labkit``): ``lib/labkit`` (the package, with
the eBPF sources as ``labkit/_bpf``), ``lib/pyroute2``, ``cache/bin/<prog>-<hash>`` (the native
helpers, built here: the machine's Debian libc is this one's or newer) and ``spec.yaml``. The machine
needs only python3 (and bcc for the eBPF datapaths), no pip. :func:`remote_argv` maps a command meant
for this machine onto those copies.

Python bytecode: TCG compiles slowly (what ``build-node`` imports: 6.1-6.6 s from source, 2.3-2.9 s
from bytecode in an idle Debian 13 VM), so the payload carries it when this host's Python is the
machine's (Debian 12's 3.11 here); for another one (Debian 13's 3.13) the machine's Python writes it
beside the sources on first import (``/opt/labkit`` is a tmpfs), and only the first agent command of a
payload pays for it.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import tarfile
from pathlib import Path

from ..spec import Spec

REMOTE_ROOT = "/opt/labkit"
REMOTE_ENV = f"PYTHONPATH={REMOTE_ROOT}/lib LABKIT_CACHE={REMOTE_ROOT}/cache"
AGENT = f"env {REMOTE_ENV} python3 -m labkit.remote.agent"
REMOTE_SPEC = f"{REMOTE_ROOT}/spec.yaml"
RUN_DIR = "/run/labkit-agent"  # outside REMOTE_ROOT (replaced by each install): detached commands' output


def build_payload(spec: Spec, dest: Path, python: tuple[int, int] = (3, 11)) -> Path:
    """``payload.tar`` beside ``dest`` (a scratch folder): labkit, pyroute2, the natives, the spec;
    bytecode too when ``python``, the machine's python3 version, is this one's."""
    import pyroute2

    from .. import native

    pkg = Path(__file__).resolve().parents[1]
    if dest.exists():
        shutil.rmtree(dest)
    lib = dest / "lib"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(pkg, lib / "labkit", ignore=ignore)
    bpf = pkg.parent / "bpf"
    if bpf.is_dir() and not (lib / "labkit" / "_bpf").exists():
        shutil.copytree(bpf, lib / "labkit" / "_bpf", ignore=ignore)
    shutil.copytree(Path(pyroute2.__file__).parent, lib / "pyroute2", ignore=ignore)
    bindir = dest / "cache" / "bin"
    bindir.mkdir(parents=True)
    for prog in native.PROGRAMS:
        shutil.copy2(native.binary(prog), bindir)
    (dest / "spec.yaml").write_text(spec.to_yaml())
    if sys.version_info[:2] == tuple(python):  # ship bytecode: TCG compiles slowly
        import compileall

        compileall.compile_dir(str(lib), quiet=1, workers=1)
    tar_path = dest.parent / "payload.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(dest, arcname=".")
    return tar_path


def install_command(then: str) -> str:
    """A shell command that unpacks the payload from stdin into :data:`REMOTE_ROOT` (replacing what
    was there) and then runs ``then``."""
    return (f"mkdir -p {REMOTE_ROOT} && find {REMOTE_ROOT} -mindepth 1 -maxdepth 1 -exec rm -rf {{}} + && "
            f"tar -C {REMOTE_ROOT} -xf - && exec {then}")


def remote_argv(argv: list[str]) -> list[str]:
    """``argv`` as the machine runs it: labkit's Python is python3 there, and a native helper built
    here (``~/.cache/labkit/bin/<prog>-<hash>``) is the same file under ``/opt/labkit/cache/bin``."""
    from .. import native

    if not argv:
        return argv
    head = str(argv[0])
    if head == sys.executable:
        return ["python3", *argv[1:]]
    if Path(head).parent == native.cache_dir():
        return [f"{REMOTE_ROOT}/cache/bin/{Path(head).name}", *argv[1:]]
    return list(argv)


def agent_command(verb: str, *args: str) -> str:
    """The shell command running the agent's ``verb`` on the machine."""
    return " ".join([AGENT, verb, *(shlex.quote(a) for a in args)])


__all__ = ["REMOTE_ROOT", "REMOTE_ENV", "AGENT", "REMOTE_SPEC", "RUN_DIR", "build_payload", "install_command",
           "remote_argv", "agent_command"]
