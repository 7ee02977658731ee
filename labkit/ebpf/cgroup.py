"""Programs attached to a cgroup v2 folder (``BPF_PROG_ATTACH``), never to a cgroup root.

One job: attach a client's cgroup programs (socket-LB's connect4/sendmsg4/recvmsg4) to the folder
holding a node's pods, tell whether they are there, and detach them, from this process or a later
one. A folder is refused unless it lies below a cgroup v2 mount (:func:`unsafe_cgroup`): at the
root, a program would act on every process of the machine. The client's programs are recognised
by their kernel names (the C function names, cut to 15 characters); the state file records
``{"cgroup": <folder>}`` before anything is attached, so cleanup knows where to look.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import DatapathError
from .libbpf import KERNEL_NAME_LEN, cgroup_programs, lib, syscall_error
from .loader import Program, StateFile, mountinfo


def cgroup2_mounts() -> list[Path]:
    return [Path(m) for m, fs in mountinfo() if fs == "cgroup2"]


def unsafe_cgroup(cgroup: Path | str | None) -> str | None:
    """Why programs must not be attached to ``cgroup`` (None: they may). Only a folder below a
    cgroup v2 root qualifies: the root itself would rewrite every connection of the machine."""
    if cgroup is None:
        return ("the node has no cgroup for its pods (NodeContext.cgroup); socket-LB attaches there "
                "and never to a cgroup root")
    cg = Path(cgroup).resolve()
    roots = [r.resolve() for r in cgroup2_mounts()]
    if cg in roots:
        return f"refusing to attach to the cgroup v2 root {cg}: that would rewrite every connection of this machine"
    if not any(root in cg.parents for root in roots):
        return f"{cg} is not a folder of a cgroup v2 hierarchy"
    if not (cg / "cgroup.procs").exists():
        return f"cgroup {cg} does not exist"
    return None


class CgroupAttachments:
    """One client's ``programs`` (each with its attach type) on a cgroup, journal in ``state``."""

    def __init__(self, state: StateFile, programs: Sequence[Program]):
        self.state, self.programs = state, programs

    def target(self, cgroup: Path | str | None, where: str) -> Path:
        """``cgroup`` resolved, or DatapathError saying why it is not a safe place to attach."""
        problem = unsafe_cgroup(cgroup)
        if problem:
            raise DatapathError(f"{where}: {problem}")
        return Path(cgroup).resolve()

    def attach(self, cgroup: Path | str | None, fds: dict[str, int], where: str) -> None:
        """Attach ``fds[p.name]`` for every program (flags 0: exclusive on this cgroup, and
        attaching again replaces, so this is idempotent)."""
        cg = self.target(cgroup, where)
        self.state.save({"cgroup": str(cg)})  # before attaching: cleanup must know where to look
        cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for prog in self.programs:
                if lib().bpf_prog_attach(fds[prog.name], cg_fd, prog.attach_type, 0) != 0:
                    raise syscall_error(f"attach {prog.name} to {cg}")
        finally:
            os.close(cg_fd)

    def ours(self, cg: Path) -> dict[int, list[int]]:
        """attach type -> ids of this client's programs attached to ``cg``."""
        cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return {p.attach_type: [pid for pid, name in cgroup_programs(cg_fd, p.attach_type)
                                    if name == p.name[:KERNEL_NAME_LEN]]
                    for p in self.programs}
        finally:
            os.close(cg_fd)

    def attached(self, cgroup: Path | str | None, where: str) -> bool:
        """Whether every program is attached to ``cgroup`` (DatapathError if it is not safe)."""
        return all(self.ours(self.target(cgroup, where)).values())

    def detach(self, current: Path | str | None) -> None:
        """Detach this client's programs from the journal's cgroup and from ``current``. Safe to
        repeat; a cgroup gone (its programs with it) or never safe to touch is skipped."""
        targets = {Path(p) for p in (self.state.load().get("cgroup"), current) if p}
        cdll = lib()
        for cg in targets:
            if unsafe_cgroup(cg):
                continue
            cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
            try:
                for attach_type, ids in self.ours(cg).items():
                    for prog_id in ids:
                        fd = cdll.bpf_prog_get_fd_by_id(prog_id)
                        if fd < 0:
                            continue
                        try:
                            if cdll.bpf_prog_detach2(fd, cg_fd, attach_type) != 0 and ct.get_errno() != errno.ENOENT:
                                raise syscall_error(f"detach program {prog_id} from {cg}")
                        finally:
                            os.close(fd)
            finally:
                os.close(cg_fd)
