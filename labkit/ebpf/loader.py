"""Compile, load and pin: from a C entry file under ``bpf/`` to programs and maps pinned in a
private bpf filesystem, and the state file recording where a client attached them.

One job: get a client's objects into its pin folder, once. A client (the ``ebpf``/``ebpf-tc``
Service datapaths, the ``ebpf`` policy engine) names a folder and gets, in the node's state folder::

    <state_dir>/bpffs/                   mount -t bpf, on demand, shared by every client of the node
        <folder>/maps/<map name>         maps (bcc BPF_TABLE_PINNED: reused when present)
        <folder>/progs/<program name>    programs (reattached from here without compiling)
        <folder>/links/<hook>            links on netkit devices (:mod:`labkit.ebpf.tc`)
    <state_dir>/<folder>.json            the client's state file (what it attached where)

Sources are compiled with bcc after :func:`flatten_source` inlines their local headers; the C
names its maps' pin folder ``LK_PIN_DIR``. Never /sys/fs/bpf: cleanup unmounts the private
filesystem once the last folder is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import nsexec
from ..errors import DatapathError
from .libbpf import obj_get, obj_pin


@dataclass(frozen=True)
class Program:
    """One entry program of a C file and how it is loaded."""

    name: str  # function in the C file; also its pin name
    prog_type: int  # libbpf.PROG_*
    attach_type: int = -1  # libbpf.ATTACH_*: expected attach type (cgroup programs), -1 for tc


def bpf_source_dir() -> Path:
    """The ``bpf/`` folder: shipped as ``labkit/_bpf`` in a wheel, next to ``labkit/`` in a checkout."""
    here = Path(__file__).resolve()
    for cand in (here.parents[1] / "_bpf", here.parents[2] / "bpf"):
        if (cand / "lib" / "common.h").is_file():
            return cand
    raise DatapathError("the eBPF sources (bpf/lib/common.h) are not installed with labkit")


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def flatten_source(path: Path, _seen: set[Path] | None = None) -> str:
    """``path`` with its local ``#include "…"`` files inlined (once each), ``#line`` kept exact.

    bcc rewrites map accesses (``map.lookup(&k)``) only in the main file it compiles, so the
    helpers of ``bpf/lib/*.h`` must reach it as part of that file."""
    path = path.resolve()
    seen = set() if _seen is None else _seen
    if path in seen:
        return ""
    seen.add(path)
    out = [f'#line 1 "{path}"']
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        m = _INCLUDE.match(line)
        if m:
            out.append(flatten_source(path.parent / m.group(1), seen))
            out.append(f'#line {lineno + 1} "{path}"')
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def mountinfo() -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount in this mount namespace."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            mnt = left.split()[4].encode().decode("unicode_escape")
            out.append((mnt, right.split()[0]))
    return out


class StateFile:
    """A client's JSON record of what it attached where, so that a later process can detach it.
    Replaced whole and atomically (rename), so a reader sees the old record or the new one."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class Bpffs:
    """A client's pinned objects: its folder ``<folder>/{maps,progs}`` in the lab's private bpf
    filesystem ``<state_dir>/bpffs``, and its state file ``<state_dir>/<folder>.json``. Compiling
    with bcc pins the maps (the C names ``LK_PIN_DIR``) and the programs, so that a new process
    reuses them without recompiling."""

    def __init__(self, state_dir: Path, folder: str):
        self.root = Path(state_dir) / "bpffs"
        self.dir = self.root / folder
        self.maps = self.dir / "maps"
        self.progs = self.dir / "progs"
        self.links = self.dir / "links"
        self.state_file = Path(state_dir) / f"{folder}.json"
        self.state = StateFile(self.state_file)

    def mounted(self) -> bool:
        target = str(self.root.resolve()) if self.root.exists() else str(self.root)
        return any(m == target and fs == "bpf" for m, fs in mountinfo())

    def ensure(self) -> None:
        if not self.mounted():
            self.root.mkdir(parents=True, exist_ok=True)
            nsexec.run(["mount", "-t", "bpf", "-o", "mode=0700", "lk-bpffs", str(self.root)])
        self.maps.mkdir(parents=True, exist_ok=True)
        self.progs.mkdir(parents=True, exist_ok=True)
        self.links.mkdir(parents=True, exist_ok=True)

    def has(self, maps: Iterable[str], progs: Iterable[str]) -> bool:
        """Whether these maps and programs are all pinned."""
        return (all((self.maps / m).exists() for m in maps)
                and all((self.progs / p).exists() for p in progs))

    def compile_and_pin(self, source: str, programs: Iterable[Program], where: str) -> float:
        """Compile ``bpf/<source>`` with bcc (its maps pinned by bcc), load every program and pin
        it; returns the seconds it took."""
        try:
            from bcc import BPF
        except ImportError as exc:
            raise DatapathError(f"{where}: bcc is not importable ({exc}); run setup.sh / `labkit doctor`") from exc
        if '"' in str(self.maps) or "\\" in str(self.maps):
            raise DatapathError(f"{where}: state folder {self.root.parent} has quotes or backslashes")
        for pin in self.progs.iterdir():  # half-made earlier attempt
            pin.unlink()
        t0 = time.perf_counter()
        text = flatten_source(bpf_source_dir() / source)
        try:
            bpf = BPF(text=text.encode(), cflags=[f'-DLK_PIN_DIR="{self.maps}"', "-Wno-macro-redefined"])
        except Exception as exc:  # bcc raises bare Exception on compile errors
            raise DatapathError(f"{where}: compiling {source} failed: {exc}") from exc
        try:
            for prog in programs:
                try:
                    kw = {} if prog.attach_type < 0 else {"attach_type": prog.attach_type}
                    fn = bpf.load_func(prog.name.encode(), prog.prog_type, **kw)
                except Exception as exc:
                    raise DatapathError(f"{where}: loading {prog.name} failed: {exc}") from exc
                obj_pin(fn.fd, self.progs / prog.name)
        finally:
            bpf.cleanup()  # closes fds: the pins (and later the hooks) keep everything alive
        return time.perf_counter() - t0

    def load(self, source: str, programs: Sequence[Program], maps: Iterable[str], where: str) -> float | None:
        """Mount, then compile ``bpf/<source>`` and pin unless its ``maps`` and ``programs`` are all
        pinned already. The seconds compiling took; None when nothing was compiled."""
        self.ensure()
        if self.has(maps, (p.name for p in programs)):
            return None
        return self.compile_and_pin(source, programs, where)

    @contextlib.contextmanager
    def opened_programs(self, names: Iterable[str]) -> Iterator[dict[str, int]]:
        """fds of pinned programs by name, closed again on leaving (attached programs stay)."""
        fds: dict[str, int] = {}
        try:
            for name in names:
                fds[name] = obj_get(self.progs / name)
            yield fds
        finally:
            for fd in fds.values():
                os.close(fd)

    def remove(self) -> None:
        """Unpin everything of this folder and drop the state file; unmount when no other folder
        is left."""
        if self.mounted():
            for sub in (self.maps, self.progs, self.links):
                if sub.is_dir():
                    for pin in sub.iterdir():
                        pin.unlink()
                    sub.rmdir()
            if self.dir.is_dir():
                self.dir.rmdir()
            # a fresh bpffs holds the kernel's preloaded iterators (maps.debug, progs.debug)
            if all(p.name.endswith(".debug") for p in self.root.iterdir()):
                nsexec.run(["umount", str(self.root)])
        if self.root.is_dir() and not self.mounted() and not any(self.root.iterdir()):
            self.root.rmdir()
        self.state.remove()
