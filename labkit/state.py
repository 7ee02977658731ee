"""Where a lab's state lives, and the journal of every kernel object it created.

``/run/labkit/<lab>/`` (tmpfs: it goes away at reboot together with the kernel objects it describes)
holds ``spec.yaml`` (what was asked), ``meta.json`` (backend, times) and ``objects.jsonl``, an
append-only journal written *before* each object is created, one JSON object per line, with an
unbuffered ``write(2)`` so that a SIGKILL right after cannot lose it. ``labkit down`` reads the
journal, adds whatever it finds by the lab's prefix, and removes it all in reverse order.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from . import naming
from .errors import LabStateError, NoSuchLab
from .spec import Spec, load_spec

STATE_ROOT = Path(os.environ.get("LABKIT_STATE_DIR", "/run/labkit"))


class LabState:
    """The state folder of one lab."""

    def __init__(self, name: str, root: Path | None = None):
        self.name = naming.check_lab_name(name)  # a name is a path component: nothing else gets in
        self.dir = (root or STATE_ROOT) / name
        self._fd: int | None = None

    # ------------------------------------------------------------ lifecycle
    @property
    def exists(self) -> bool:
        return (self.dir / "meta.json").exists()

    def create(self, spec: Spec) -> None:
        if self.exists:
            raise LabStateError(f"lab {self.name!r} exists already; `labkit down {self.name}` first")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "spec.yaml").write_text(spec.to_yaml())
        self.write_meta(backend=spec.backend, created=time.time(), pid=os.getpid(), status="building",
                        owner=os.getuid())

    def write_meta(self, **values) -> None:
        meta = self.meta() if (self.dir / "meta.json").exists() else {}
        meta.update(values)
        tmp = self.dir / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        tmp.replace(self.dir / "meta.json")

    def meta(self) -> dict:
        try:
            return json.loads((self.dir / "meta.json").read_text())
        except FileNotFoundError:
            raise NoSuchLab(f"no lab named {self.name!r} (see `labkit ls`)") from None

    def spec(self) -> Spec:
        path = self.dir / "spec.yaml"
        if not path.exists():
            raise NoSuchLab(f"no lab named {self.name!r} (see `labkit ls`)")
        return load_spec(path, validate=False)  # validated before it was written

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ journal
    def record(self, kind: str, **attrs) -> None:
        """Journal an object about to be created (call before creating it)."""
        if self._fd is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.dir / "objects.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._fd, (json.dumps({"kind": kind, **attrs}) + "\n").encode())

    def objects(self) -> Iterator[dict]:
        try:
            with open(self.dir / "objects.jsonl") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError:  # a line cut by a crash mid-write
                            continue
        except FileNotFoundError:
            return

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def list_labs(root: Path | None = None) -> list[str]:
    root = root or STATE_ROOT
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not naming.lab_name_problem(p.name))
    except FileNotFoundError:
        return []
