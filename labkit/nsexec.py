"""Network-namespace and cgroup primitives: create, enter, run in, remove.

Named network namespaces live where iproute2 keeps them (``/run/netns/<name>``), so ``ip netns``,
``nsenter`` and ``labkit exec`` all see the same objects. A namespace is created by a short-lived
thread that unshares its own network namespace and bind-mounts it; the calling thread never changes
namespace, so the orchestrator keeps the host's view. The same trick opens pyroute2 sockets and
writes sysctls inside a namespace (a netlink socket stays bound to the namespace it was created in;
``/proc/sys/net`` resolves to the writing thread's namespace).

Processes started in a namespace can also be put into a cgroup v2 folder and pinned to CPUs before
they exec, so that nothing they do (a connect() hooked by eBPF, a timed sample) runs outside them.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import os
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def _check(rc: int, what: str, target: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {target}: {os.strerror(err)}")


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def list_netns(prefix: str = "") -> list[str]:
    """Names of the named network namespaces, optionally only those starting with ``prefix``."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _setns(name: str) -> None:
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), "setns", name)
    finally:
        os.close(fd)


def in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn()`` in a helper thread that has entered namespace ``name`` (None: this namespace)."""
    if name is None:
        return fn()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            _setns(name)
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=work, name=f"netns:{name}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def create_netns(name: str, on_socket: Callable[[], T] | None = None) -> T | None:
    """Create the named namespace ``name`` (EEXIST if it is there); optionally run ``on_socket()``
    inside it right away and return its result.

    ``on_socket=IPRoute`` (pyroute2's class) returns :func:`iproute` of the new namespace: pyroute2
    0.9 opens its netlink socket lazily in whichever thread first uses the object, so an ``IPRoute()``
    merely constructed inside the namespace thread would act on the *host's* namespace."""
    NETNS_DIR.mkdir(parents=True, exist_ok=True)
    share_netns_dir()
    path = netns_path(name)
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare", name)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDONLY, 0)
            os.close(fd)
            src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
            if _libc.mount(src, str(path).encode(), b"none", MS_BIND, None) != 0:
                err = ctypes.get_errno()
                os.unlink(path)
                raise OSError(err, f"bind-mount netns {name}: {os.strerror(err)}")
            if on_socket is not None and _is_iproute_class(on_socket):
                box["value"] = _netlink_socket()
            else:
                box["value"] = on_socket() if on_socket else None
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=work, name=f"mknetns:{name}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    if on_socket is not None and _is_iproute_class(on_socket):
        return on_socket(use_socket=box["value"])
    return box["value"]


def share_netns_dir() -> bool:
    """Make :data:`NETNS_DIR` a shared mount point of its own before namespaces are bound in it, as
    ``ip netns add`` does on first use. Otherwise a later ``ip netns add`` (any tool's) binds the folder
    over itself while labkit's namespaces are mounted in it, hiding their mounts under the new one:
    their names then cannot be removed (``unlink``: EBUSY), which left a CI run's namespaces behind.
    Nothing is done when the folder is a mount point already, or when namespaces are mounted in it
    already (binding it then would cause exactly that). True when it is a mount point afterwards."""
    try:  # (os.path.ismount cannot tell a bind mount of the same file system)
        points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    except OSError:
        return False
    if str(NETNS_DIR) in points:
        return True
    if any(p.startswith(str(NETNS_DIR) + "/") for p in points):
        return False
    if _libc.mount(str(NETNS_DIR).encode(), str(NETNS_DIR).encode(), b"none", MS_BIND | MS_REC, None) != 0:
        return False
    _libc.mount(b"", str(NETNS_DIR).encode(), b"none", MS_SHARED | MS_REC, None)
    return True


def _is_iproute_class(obj: Any) -> bool:
    return isinstance(obj, type) and obj.__module__.startswith("pyroute2") and obj.__name__ == "IPRoute"


def _netlink_socket():
    import socket

    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 0)  # NETLINK_ROUTE


def iproute(name: str | None):
    """A pyroute2 ``IPRoute`` whose netlink socket is bound inside namespace ``name`` (None: here).

    The socket is opened by a thread that entered the namespace, so it stays there; pyroute2 refuses
    to use such an object from another thread than the one that made it, which is what we want."""
    from pyroute2 import IPRoute

    if name is None:
        return IPRoute()
    return IPRoute(use_socket=in_netns(name, _netlink_socket))


def remove_netns(name: str) -> bool:
    """Unmount and remove a named namespace. Returns False if it was not there (safe to repeat).

    The kernel frees the namespace, and every link in it, once no process and no mount holds it:
    callers kill the lab's processes first."""
    path = netns_path(name)
    if not path.exists():
        return False
    if _libc.umount2(str(path).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not a mount point (half-made)
            raise OSError(err, f"umount {path}: {os.strerror(err)}")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    return True


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(netns_path(name)).st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(inodes: Iterable[int]) -> list[int]:
    """PIDs of every process whose network namespace is one of ``inodes``."""
    wanted = set(inodes)
    pids = []
    if not wanted:
        return pids
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino in wanted:
                pids.append(int(entry.name))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return pids


def kill_in_netns(names: Iterable[str], spare: Iterable[int] = ()) -> int:
    """SIGKILL every process inside the namespaces ``names`` (but ``spare``: this process, its
    parents), again until none is left (a dying process may have forked); how many were killed."""
    import signal
    import time

    spared = set(spare) | {os.getpid()}
    inodes = [i for i in (netns_inode(n) for n in names) if i]
    killed = 0
    for _ in range(50):
        pids = [p for p in pids_in_netns(inodes) if p not in spared]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    return killed


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first (the order to unmount them in)."""
    base = str(path.resolve()) if path.exists() else str(path)
    with open("/proc/self/mounts") as f:
        mnts = [line.split()[1].replace("\\040", " ") for line in f]
    return sorted((Path(m) for m in mnts if m == base or m.startswith(base + "/")), key=lambda p: len(p.parts),
                  reverse=True)


def unmount(path: Path) -> bool:
    """Detach the mount at ``path`` (lazily: users holding it open keep their view). False when
    nothing was mounted there any more (a cleanup may repeat)."""
    if _libc.umount2(str(path).encode(), MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, f"umount {path}: {os.strerror(err)}")


def write_sysctls(netns: str | None, settings: dict[str, str | int]) -> None:
    """Write ``net.*`` sysctls (dotted names) inside ``netns``. Never used on the host namespace by
    the lab builder; the namespace is required to keep that promise visible at call sites."""

    def work() -> None:
        for key, value in settings.items():
            Path("/proc/sys", *key.split(".")).write_text(f"{value}\n")

    in_netns(netns, work)


def read_sysctl(netns: str | None, key: str) -> str:
    return in_netns(netns, lambda: Path("/proc/sys", *key.split(".")).read_text().strip())


# ---------------------------------------------------------------- processes

def _wrap(argv: Sequence[str], netns: str | None, cgroup: Path | None, cpus: Sequence[int] | None,
          setsid: bool = False) -> list[str]:
    """``argv`` behind ``lkexec`` (labkit/native/lkexec.c), which joins the cgroup, enters the
    namespace and pins the CPUs, then execs: Python then starts it with vfork, not a preexec_fn fork
    of the whole interpreter (~1 ms instead of ~40 ms per process)."""
    if not (netns or cgroup or cpus or setsid):
        return list(argv)
    from .native import binary

    wrapped = [str(binary("lkexec"))]
    if cgroup:
        wrapped += ["--cgroup", str(cgroup)]
    if netns:
        wrapped += ["--netns", str(netns_path(netns))]
    if cpus:
        wrapped += ["--cpus", ",".join(str(c) for c in cpus)]
    if setsid:
        wrapped.append("--setsid")
    return [*wrapped, "--", *argv]


def run(
    argv: Sequence[str],
    netns: str | None = None,
    *,
    input: str | bytes | None = None,
    check: bool = True,
    timeout: float | None = 300,
    cgroup: Path | None = None,
    cpus: Sequence[int] | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``argv`` to completion inside ``netns`` (None: here), capturing output.

    On failure with ``check`` the error carries the command's stderr, which is what a user needs."""
    if netns is not None and not netns_path(netns).exists():
        raise FileNotFoundError(errno.ENOENT, f"no network namespace {netns!r}")
    try:
        proc = subprocess.run(_wrap(argv, netns, cgroup, cpus), input=input, capture_output=True, text=text,
                              timeout=timeout)
    except FileNotFoundError as exc:
        raise FileNotFoundError(exc.errno, f"{argv[0]}: not installed (run `labkit doctor`)") from exc
    if check and proc.returncode != 0:
        where = f" in netns {netns}" if netns else ""
        err = proc.stderr if text else proc.stderr.decode(errors="replace")
        raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, err) from RuntimeError(
            f"{' '.join(argv[:3])}…{where} exited {proc.returncode}: {err.strip()[-2000:]}"
        )
    return proc


def spawn(
    argv: Sequence[str],
    netns: str | None = None,
    *,
    cgroup: Path | None = None,
    cpus: Sequence[int] | None = None,
    stdout: Any = subprocess.DEVNULL,
    stderr: Any = subprocess.DEVNULL,
    stdin: Any = subprocess.DEVNULL,
    detach: bool = False,
    text: bool = False,
) -> subprocess.Popen:
    """Start ``argv`` in the background inside ``netns``/``cgroup``, pinned to ``cpus``.

    ``detach`` starts a new session so the process outlives the orchestrator (in-pod servers)."""
    if netns is not None and not netns_path(netns).exists():
        raise FileNotFoundError(errno.ENOENT, f"no network namespace {netns!r}")
    return subprocess.Popen(_wrap(argv, netns, cgroup, cpus, setsid=detach), stdin=stdin, stdout=stdout,
                            stderr=stderr, close_fds=True, text=text)


# ---------------------------------------------------------------- cgroup v2

def cgroup2_root() -> Path | None:
    """Mount point of the cgroup v2 hierarchy (``/sys/fs/cgroup/unified`` in hybrid mode)."""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, mnt, fstype, *_ = line.split()
                if fstype == "cgroup2":
                    return Path(mnt)
    except OSError:
        pass
    return None


def kill_cgroup(path: Path) -> None:
    """Kill every process in a cgroup subtree and wait until it is empty."""
    if not path.exists():
        return
    kill = path / "cgroup.kill"
    if kill.exists():
        kill.write_text("1")
    else:  # kernels before 5.14
        for procs in path.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                try:
                    os.kill(int(pid), 9)
                except ProcessLookupError:
                    pass


def remove_cgroup(path: Path, timeout: float = 5.0) -> bool:
    """Remove a cgroup folder and its children (deepest first) once their processes are gone."""
    import time

    if not path.exists():
        return False
    kill_cgroup(path)
    dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    deadline = time.monotonic() + timeout
    for d in [*dirs, path]:
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
    return True


# ---------------------------------------------------------------- event loops (Jupyter)

def off_event_loop(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)``, in a worker thread when this thread runs an asyncio loop (Jupyter).
    Exceptions are re-raised here; an interrupt of the cell waits for the call (a lab half built
    would otherwise be left behind) and is then raised."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args, **kwargs)
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=call, name=f"labkit-{getattr(fn, '__name__', 'call')}", daemon=True)
    worker.start()
    interrupted = None
    while worker.is_alive():
        try:
            worker.join(0.2)
        except KeyboardInterrupt as exc:
            interrupted = exc
    if "error" in box:
        raise box["error"]
    if interrupted is not None:
        raise interrupted
    return box.get("value")


def outside_event_loop(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: run ``fn`` through :func:`off_event_loop`. pyroute2's synchronous API drives its
    own asyncio loop and fails in a thread that already runs one (a Jupyter kernel's main thread)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return off_event_loop(fn, *args, **kwargs)

    return wrapper
