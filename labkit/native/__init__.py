"""Small C programs labkit runs inside pods, compiled on first use: ``binary("lkclient")``.

The sources live next to this file (``lkserver.c``: the in-pod TCP/UDP server; ``lkclient.c``: the
latency client). They are built with the machine's gcc rather than shipped as binaries, so they
match the kernel and libc they run against. Each build lands in a cache folder under a name keyed
by a hash of the source and the compiler flags (``<name>-<hash16>``): editing a source rebuilds it,
and old builds are simply never looked up again. A build is written to a temporary file and renamed
into place, so concurrent callers (parallel tests, several labs) at worst compile twice and never
see a half-written binary.

Cache folder: ``$LABKIT_CACHE/bin`` if ``LABKIT_CACHE`` is set, else ``~/.cache/labkit/bin``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from labkit.errors import MeasurementError, MissingFeature

SOURCE_DIR = Path(__file__).resolve().parent
CFLAGS = ("-O2", "-Wall", "-Werror", "-std=gnu11")
PROGRAMS = ("lkserver", "lkclient", "lkexec")


def cache_dir() -> Path:
    """Where built binaries are kept (created on demand)."""
    root = os.environ.get("LABKIT_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "labkit"
    return base / "bin"


def binary(name: str) -> Path:
    """Path to the built program ``name`` (one of :data:`PROGRAMS`), compiling it if needed."""
    if name not in PROGRAMS:
        raise ValueError(f"unknown native program {name!r}; known: {', '.join(PROGRAMS)}")
    return build(SOURCE_DIR / f"{name}.c", cache_dir())


def build(source: Path, dest_dir: Path) -> Path:
    """Compile ``source`` into ``dest_dir`` unless a build of this exact source is already there."""
    code = source.read_bytes()
    key = hashlib.sha256(code + "\0".join(CFLAGS).encode()).hexdigest()[:16]
    target = dest_dir / f"{source.stem}-{key}"
    if os.access(target, os.X_OK):
        return target
    gcc = shutil.which("gcc")
    if gcc is None:
        raise MissingFeature("gcc", f"building {source.name}", "apt-get install gcc libc6-dev")
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=dest_dir)
    os.close(fd)
    try:
        _compile(gcc, source, Path(tmp))
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)  # atomic: readers see the old name absent or the whole binary
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _compile(gcc: str, source: Path, out: Path) -> None:
    proc = subprocess.run([gcc, *CFLAGS, "-o", str(out), str(source)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MeasurementError(f"gcc could not build {source.name}:\n{proc.stderr.strip()[-4000:]}")
