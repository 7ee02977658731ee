"""``labkit serve``: the privileged daemon that lets unprivileged users (a classroom's participants)
build and use labs on one shared machine.

It runs as root and listens on a Unix socket (:data:`SOCKET`, mode 0666: anyone may ask, the kernel
says who asks). Identity is the socket's peer credentials (``SO_PEERCRED``: uid and gid;
``SO_PEERGROUPS``: the supplementary groups), never anything a request says.

- **Labs belong to their creator.** A participant names a lab ``demo``; on the machine it is
  ``demo-u<uid in base 36>`` (:func:`machine_name`), so alice's and bob's ``demo`` coexist and a lab's
  owner is in its name: a restart of the daemon loses nothing (the labs are in the kernel and their
  journals, the owners in the names). ``ls``, ``check``, ``services``, ``inspect``, ``exec`` and
  ``down`` find only the caller's own labs; another's is "no lab named ..." (its existence is not
  told). Members of the instructor group (and root) see every lab and may remove any, by its machine
  name.
- **exec** runs the command inside the pod's namespace and cgroup as the caller's uid and groups,
  with only CAP_NET_RAW and CAP_NET_ADMIN (``setpriv``: inheritable, ambient and bounding sets), a
  clean environment, the caller's own terminal (descriptors passed over the socket). It ends when the
  caller goes away; ``down`` ends anything left in the pod.
- **Quotas** (:class:`Quota`): labs per participant, nodes, pods, services (bulk groups counted in
  full) and policies per lab; VMs only when allowed. In-pod server commands are refused: they would
  run as root.
- **Validation first**: names, sizes, the spec (every problem, with its path) and the quotas are
  checked before anything is created; a refused request changes nothing.
- **Measurement seats**: ``run`` requests measure one at a time, in the order they came (the
  position is sent while waiting): two participants never measure on the same CPUs at once. A run
  writes into the caller's folder of :data:`RESULTS` (root's folders, readable by all: nothing is
  written through a path the caller controls); ``--params`` and ``--resume`` are refused.
- **Robustness**: a request must arrive whole within :data:`REQUEST_SECONDS` and be at most
  :data:`~labkit.serve.protocol.MAX_REQUEST` bytes; at most :data:`MAX_CLIENTS` are served at once
  (the next ones are told the daemon is busy); whatever a handler raises is one error reply, and a
  client that disconnects mid-request only loses its reply.

Known limit: CAP_NET_ADMIN is the machine's (the pod namespaces belong to the initial user
namespace), so an exec'd command can reconfigure its own pod's network, and could move the pod's
interfaces to another namespace it can name; run a classroom on a machine given to it.
"""

from __future__ import annotations

import codecs
import grp
import json
import os
import pwd
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .. import naming
from ..errors import LabkitError, NoSuchLab, Refused, SpecError, UsageError
from . import protocol

SOCKET = Path(os.environ.get("LABKIT_SOCKET", "/run/labkit/labkit.sock"))
RESULTS = Path("/var/lib/labkit/results")  # <uid>/ per participant: root's folders, readable by all
REQUEST_SECONDS = 10.0
MAX_CLIENTS = 32
MAX_ARGS, MAX_ARG_BYTES = 256, 4096
SO_PEERGROUPS = 59
EXEC_CAPS = "-all,+net_raw,+net_admin"
EXEC_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Quota:
    """What one participant may have at once (the instructor group and root are not limited)."""

    labs: int = 2
    nodes: int = 3  # per lab
    pods: int = 12  # per lab
    services: int = 200  # per lab, bulk groups counted in full
    policies: int = 20  # per lab
    vms: bool = False  # labs on the vagrant backend
    run_minutes: int = 10  # a run's estimated measuring time (`labkit run --dry-run`'s estimate)

    @classmethod
    def parse(cls, text: str) -> "Quota":
        """``labs=3,pods=20,vms=yes``: the fields to change."""
        known = {f.name: f.type for f in fields(cls)}
        values: dict = {}
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if key not in known:
                raise UsageError(f"--quota {item!r}: unknown quota {key!r}; known: {', '.join(known)}")
            if key == "vms":
                if value not in ("yes", "no"):
                    raise UsageError(f"--quota {item!r}: vms=yes or vms=no")
                values[key] = value == "yes"
            else:
                try:
                    values[key] = int(value)
                except ValueError:
                    raise UsageError(f"--quota {item!r}: {key} takes a whole number") from None
                if values[key] < 0:
                    raise UsageError(f"--quota {item!r}: {key} cannot be negative")
        return cls(**values)


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int
    groups: tuple[int, ...]
    pid: int
    instructor: bool

    @property
    def user(self) -> str:
        return user_name(self.uid)


# ---------------------------------------------------------------- names and owners

def uid_tag(uid: int) -> str:
    """``u`` and the uid in base 36: 1000 is ``urs``."""
    digits, n = "", uid
    while True:
        n, r = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
        if not n:
            return "u" + digits


def machine_name(name: object, uid: int) -> str:
    """The machine's name of participant ``uid``'s lab ``name`` (``demo`` → ``demo-urs``), or a
    :class:`UsageError` naming why ``name`` cannot be one."""
    tag = uid_tag(uid)
    room = naming.MAX_LAB_NAME - len(tag) - 1
    if not isinstance(name, str) or not naming.LAB_NAME.match(name) or len(name) > room:
        raise UsageError(f"lab name {str(name)[:80]!r} is not valid here: through the labkit daemon a lab name starts "
                         f"with a letter and has at most {room} lower-case letters, digits and '-' (labkit adds "
                         f"-{tag}, your user's tag, to keep it apart from other users' labs)")
    return f"{name}-{tag}"


def owner_of(machine: str) -> int | None:
    """The uid a machine name says owns the lab (None: not a participant's lab)."""
    base, sep, tag = machine.rpartition("-u")
    if not sep or not base or not tag or not all(c in "0123456789abcdefghijklmnopqrstuvwxyz" for c in tag):
        return None
    return int(tag, 36)


def shown_name(machine: str) -> str:
    """The name a participant gave their lab (``demo-urs`` → ``demo``); other labs keep theirs."""
    return machine.rpartition("-u")[0] if owner_of(machine) is not None else machine


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


# ---------------------------------------------------------------- the daemon

class Daemon:
    def __init__(self, path: Path = SOCKET, instructors: str = "instructor", quota: Quota = Quota(),
                 max_clients: int = MAX_CLIENTS, request_seconds: float = REQUEST_SECONDS, log=print,
                 results: Path = RESULTS):
        self.path = Path(path)
        self.results = Path(results)
        self._seats = threading.Condition()
        self._queue: list[object] = []  # runs waiting for the measurement CPUs, the one measuring first
        self.instructors = instructors
        self.quota = quota
        self.request_seconds = request_seconds
        self.log = log
        self._slots = threading.BoundedSemaphore(max_clients)
        self._lab_locks = [threading.Lock() for _ in range(64)]
        self._user_locks: dict[int, threading.Lock] = {}  # per uid (the kernel's: not a name a client can invent)
        self._user_locks_guard = threading.Lock()
        self._stop = threading.Event()
        self.sock: socket.socket | None = None

    # ------------------------------------------------------------ lifecycle
    def bind(self) -> None:
        if os.geteuid() != 0:
            raise UsageError("labkit serve runs as root (it builds labs for the users who ask it)")
        if not self.path.parent.exists():  # a folder of its own (/run/labkit); an existing one keeps its mode
            self.path.parent.mkdir(parents=True)
            os.chmod(self.path.parent, 0o755)
        if self.path.exists() or self.path.is_symlink():
            st = self.path.lstat()
            if not stat.S_ISSOCK(st.st_mode):
                raise UsageError(f"{self.path} exists and is not a socket; remove it or give --socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
                raise UsageError(f"a labkit daemon already serves on {self.path}")
            except (ConnectionRefusedError, FileNotFoundError):
                self.path.unlink()  # a previous daemon's socket: nobody listens
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o111)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o666)
        sock.listen(128)
        self.sock = sock

    def serve_forever(self) -> None:
        if self.sock is None:
            self.bind()
        self.log(f"labkit daemon serving on {self.path} (instructor group: {self.instructors}; quota: "
                 + ", ".join(f"{k} {v}" for k, v in asdict(self.quota).items()) + ")")
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self.sock], [], [], 0.5)
                if not ready:
                    continue
                conn, _ = self.sock.accept()
            except OSError:
                if self._stop.is_set():
                    break
                raise
            if not self._slots.acquire(blocking=False):
                self._busy(conn)
                continue
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        if self.sock is not None:
            self.sock.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _busy(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(1)
            protocol.send(conn, {"done": True, "exit": Refused.exit_code,
                                 "error": "the labkit daemon is busy serving others; try again in a moment"})
        except OSError:
            pass
        finally:
            conn.close()

    # ------------------------------------------------------------ one connection
    def caller(self, conn: socket.socket) -> Caller:
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
            groups = struct.unpack(f"{len(raw) // 4}I", raw)
        except OSError:  # more than 256 groups: the user database's list instead
            try:
                groups = tuple(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
            except KeyError:
                groups = ()
        try:
            teacher = grp.getgrnam(self.instructors).gr_gid
        except KeyError:
            teacher = None
        return Caller(uid, gid, tuple(groups), pid, uid == 0 or (teacher is not None and teacher in (gid, *groups)))

    def _serve_one(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            who = self.caller(conn)
            try:
                request, fds = protocol.recv(conn, protocol.MAX_REQUEST, time.monotonic() + self.request_seconds,
                                             max_fds=protocol.MAX_FDS)
            except protocol.ProtocolError as exc:
                self._reply(conn, {"done": True, "exit": UsageError.exit_code, "error": f"bad request: {exc}"})
                return
            if request is None:
                return
            op = request.get("op")
            args = request.get("args", {})
            handler = OPS.get(op) if isinstance(op, str) else None
            if handler is None:
                raise UsageError(f"unknown request {str(op)[:40]!r}; known: {', '.join(sorted(OPS))}")
            if not isinstance(args, dict):
                raise UsageError("a request's args must be an object")
            if op != "exec" and fds:
                raise UsageError("only exec takes file descriptors")
            result = handler(self, who, args, conn, fds)
            self._reply(conn, {"done": True, "exit": result.pop("exit", 0), "result": result})
        except LabkitError as exc:
            self._reply(conn, {"done": True, "exit": exc.exit_code, "error": str(exc)})
        except Exception as exc:  # a handler's bug is one error reply; the daemon goes on serving
            self.log(f"labkit daemon: request failed: {type(exc).__name__}: {exc}")
            self._reply(conn, {"done": True, "exit": 5, "error": f"the daemon failed: {type(exc).__name__}: {exc}"})
        finally:
            protocol._close(fds)
            conn.close()
            self._slots.release()

    @staticmethod
    def _reply(conn: socket.socket, obj: dict) -> None:
        try:
            protocol.send(conn, obj)
        except OSError:
            pass  # the caller went away: its lab (if any) stays, named as its own

    # ------------------------------------------------------------ helpers for handlers
    def user_lock(self, uid: int) -> threading.Lock:
        """A participant's quota check and lab creation happen one at a time (two ups at once cannot
        both pass the quota); different participants build at once."""
        with self._user_locks_guard:
            return self._user_locks.setdefault(uid, threading.Lock())

    def lab_lock(self, machine: str) -> threading.Lock:
        """One of a fixed set of locks (a flood of names cannot grow it): ``up`` and ``down`` of one lab
        never run at once."""
        return self._lab_locks[hash(machine) % len(self._lab_locks)]

    def resolve(self, who: Caller, name: object) -> str:
        """The machine name of the caller's lab ``name``; for an instructor, also any lab by its
        machine name. Another participant's lab is 'no lab named ...' (its existence is not told)."""
        from .. import lab

        if not _plain_name(name):
            raise UsageError(naming.lab_name_problem(str(name)[:80]) or "a lab name is a string")
        try:
            mine = machine_name(name, who.uid)
        except UsageError:
            mine = None
        if mine and lab.exists(mine):
            return mine
        if who.instructor and lab.exists(name):  # type: ignore[arg-type]
            return name  # type: ignore[return-value]
        raise NoSuchLab(f"no lab named {name!r} of yours (labkit ls lists yours)")

    def own_labs(self, who: Caller) -> list[dict]:
        from .. import lab

        return [r for r in lab.labs() if owner_of(r["name"]) == who.uid]


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and naming.lab_name_problem(name) is None


# ---------------------------------------------------------------- requests

def _whoami(d: Daemon, who: Caller, args, conn, fds) -> dict:
    return {"uid": who.uid, "user": who.user, "instructor": who.instructor, "quota": asdict(d.quota),
            "labs": [r["name"] for r in d.own_labs(who)]}


def _up(d: Daemon, who: Caller, args, conn, fds) -> dict:
    from .. import lab
    from ..spec import parse_spec

    spec_data = args.get("spec")
    if not isinstance(spec_data, dict):
        raise UsageError("up needs the spec as a mapping (the labkit CLI reads your YAML file and sends it)")
    name = spec_data.get("name")
    machine = machine_name(name, who.uid)
    _precheck(d, who, spec_data)  # sizes first: parsing 30,000 pods alone takes seconds
    spec = parse_spec({**spec_data, "name": machine})  # SpecError: every problem, with its path
    _check_quota(d, who, spec)
    with d.lab_lock(machine):
        with d.user_lock(who.uid):
            if lab.exists(machine):
                raise UsageError(f"you have a lab named {name!r} already; `labkit down {name}` first")
            if not who.instructor and len(d.own_labs(who)) >= d.quota.labs:
                raise Refused(f"quota: at most {d.quota.labs} lab(s) per participant; you have "
                              f"{', '.join(r['name'] for r in d.own_labs(who))} (labkit down one first)")
            _progress(conn, f"building lab {name} ({machine} on this machine) for {who.user}")
            lab.up(spec, progress=False)
        from ..state import LabState

        LabState(machine).write_meta(owner=who.uid, display_name=name)
    return {"lab": name, "machine_name": machine, "nodes": len(spec.nodes), "pods": len(spec.pods()),
            "datapath": spec.datapath}


LIMITS = {"nodes": 64, "pods": 4096, "services": 10_000, "policies": 1_000}  # anyone's, instructors' too


def _precheck(d: Daemon, who: Caller, data: dict) -> None:
    """The spec's sizes as sent (lists' lengths, before any parsing) against the limits and quotas."""
    def items(value) -> list:
        return value if isinstance(value, list) else []

    nodes = items(data.get("nodes"))
    have = {"nodes": len(nodes), "pods": sum(len(items(n.get("pods"))) for n in nodes if isinstance(n, dict)),
            "services": len(items(data.get("services"))), "policies": len(items(data.get("policies")))}
    for what, n in have.items():
        most = LIMITS[what] if who.instructor else min(LIMITS[what], getattr(d.quota, what))
        if n > most:
            raise Refused(f"quota: {what}: {n} asked for; the quota is {most} per lab")


def _check_quota(d: Daemon, who: Caller, spec) -> None:
    q = d.quota
    problems = []
    server_cmd = [p.name for _, p in spec.pods() if p.server is not None and p.server.command]
    if spec.server.command or server_cmd:
        problems.append("server: a command of your own would run as root in the pods; through the labkit daemon "
                        "pods serve with labkit's server, 'http' (nginx) or 'none'"
                        + (f" (pods {', '.join(server_cmd)})" if server_cmd else ""))
    if spec.backend == "hosts":  # root on machines over ssh with the daemon's keys: never on a participant's say
        problems.append("backend: hosts (other machines, over ssh as root) is not available through the labkit "
                        "daemon; the instructor runs such labs as root")
    if who.instructor:
        if problems:
            raise Refused("; ".join(problems))
        return
    if spec.backend != "netns" and not q.vms:
        problems.append(f"backend: {spec.backend} (VMs) is not allowed in this classroom; use backend: netns")
    services = sum(s.count if s.count is not None else 1 for s in spec.services)
    for what, have, most in (("nodes", len(spec.nodes), q.nodes), ("pods", len(spec.pods()), q.pods),
                             ("services", services, q.services), ("policies", len(spec.policies), q.policies)):
        if have > most:
            problems.append(f"{what}: {have} asked for; the quota is {most} per lab")
    if problems:
        raise Refused("quota: " + "; ".join(problems))


def _progress(conn: socket.socket, text: str, raw: bool = False) -> None:
    try:
        protocol.send(conn, {"event": "output" if raw else "progress", "text": text})
    except OSError:
        pass


def _ls(d: Daemon, who: Caller, args, conn, fds) -> dict:
    from .. import lab

    rows = []
    for r in lab.labs():
        owner = owner_of(r["name"])
        if owner != who.uid and not who.instructor:
            continue
        shown = shown_name(r["name"]) if owner == who.uid else r["name"]
        user = user_name(owner if owner is not None else r.get("owner", 0))
        rows.append({**r, "name": shown, "machine_name": r["name"], "user": user})
    return {"labs": rows}


def _check(d: Daemon, who: Caller, args, conn, fds) -> dict:
    from .. import lab

    machine = d.resolve(who, args.get("name"))
    results = lab.open_lab(machine).check(services=not args.get("no_services", False))
    failed = sum(not r.ok for r in results)
    return {"lab": args.get("name"), "ok": not failed, "results": lab.results_json(results), "exit": 1 if failed else 0}


def _services(d: Daemon, who: Caller, args, conn, fds) -> dict:
    from .. import lab

    return {"services": lab.services_json(lab.open_lab(d.resolve(who, args.get("name"))).services())}


def _inspect(d: Daemon, who: Caller, args, conn, fds) -> dict:
    from .. import lab

    return {"inspect": lab.open_lab(d.resolve(who, args.get("name"))).inspect()}


def _spec(d: Daemon, who: Caller, args, conn, fds) -> dict:
    """The spec of a lab of the caller's as plain data, under the name the caller gave it (a
    participant's Python re-opens its lab from it)."""
    from .. import lab
    from ..spec.serialize import to_plain

    machine = d.resolve(who, args.get("name"))
    return {"spec": {**to_plain(lab.open_lab(machine).spec), "name": shown_name(machine)}}


def _down(d: Daemon, who: Caller, args, conn, fds) -> dict:
    from .. import lab

    machine = d.resolve(who, args.get("name"))
    with d.lab_lock(machine):
        counts = lab.down(machine, missing_ok=False)
    return {"lab": args.get("name"), "removed": counts}


def _exec(d: Daemon, who: Caller, args, conn, fds) -> dict:
    from .. import lab

    if len(fds) != 3:
        raise UsageError("exec needs the caller's stdin, stdout and stderr (3 descriptors)")
    argv = args.get("argv")
    if (not isinstance(argv, list) or not argv or len(argv) > MAX_ARGS
            or not all(isinstance(a, str) and "\0" not in a and len(a.encode()) <= MAX_ARG_BYTES for a in argv)):
        raise UsageError(f"exec needs a command: 1 to {MAX_ARGS} arguments, each a string of at most "
                         f"{MAX_ARG_BYTES} bytes without NUL")
    machine = d.resolve(who, args.get("name"))
    lb = lab.open_lab(machine)
    pod = args.get("pod")
    if not isinstance(pod, str) or pod not in {p.name for _, p in lb.spec.pods()}:
        raise UsageError(f"no pod {str(pod)[:40]!r} in lab {args.get('name')!r}; pods: "
                         + ", ".join(p.name for _, p in lb.spec.pods()))
    try:
        home = pwd.getpwuid(who.uid).pw_dir
    except KeyError:
        home = "/"
    groups = ",".join(str(g) for g in who.groups) or str(who.gid)
    wrapped = ["setpriv", f"--reuid={who.uid}", f"--regid={who.gid}", f"--groups={groups}",
               f"--inh-caps={EXEC_CAPS}", f"--ambient-caps={EXEC_CAPS}", f"--bounding-set={EXEC_CAPS}", "--",
               "env", "-i", f"PATH={EXEC_PATH}", f"HOME={home}", f"USER={who.user}", "LANG=C.UTF-8",
               *argv]
    proc = lb.spawn(pod, wrapped, stdin=fds[0], stdout=fds[1], stderr=fds[2])
    while True:  # the caller's going away ends the command (its descriptors stay open here until then)
        try:
            return {"exit": proc.wait(timeout=0.2)}
        except subprocess.TimeoutExpired:
            pass
        if _gone(conn):
            proc.kill()
            proc.wait()
            return {"exit": 130}


FORBIDDEN_FLAGS = ("--params", "--resume", "--inventory")  # files read as root; another run's folder


def _run(d: Daemon, who: Caller, args, conn, fds) -> dict:
    """``labkit run EXPERIMENT ARGV`` for the caller: validated, then queued for the measurement CPUs
    (one run measures at a time: the position is sent while waiting), run with its results in the
    caller's folder of the daemon's results store; its output streamed back as it comes."""
    from ..experiments import EXPERIMENTS

    exp, argv = args.get("experiment"), args.get("argv", [])
    if not isinstance(exp, str) or exp not in EXPERIMENTS:
        raise UsageError(f"unknown experiment {str(exp)[:40]!r}; known: {', '.join(EXPERIMENTS)}")
    if (not isinstance(argv, list) or len(argv) > MAX_ARGS
            or not all(isinstance(a, str) and "\0" not in a and len(a.encode()) <= MAX_ARG_BYTES for a in argv)):
        raise UsageError(f"run takes at most {MAX_ARGS} arguments, each a string of at most {MAX_ARG_BYTES} bytes "
                         "without NUL")
    for a in argv:
        flag = a.split("=", 1)[0]
        if flag.startswith("--") and len(flag) > 2 and any(f.startswith(flag) for f in FORBIDDEN_FLAGS):
            raise Refused(f"{flag}: through the labkit daemon a run takes its parameters as flags (no --params "
                          "file, no --resume, no --inventory)")
        if "vagrant" in a and not (d.quota.vms or who.instructor):
            raise Refused("backend: VM runs are not allowed in this classroom")
    params = args.get("params")
    if params is not None:
        argv = [*argv, "--params", str(_params_file(d, who, exp, params))]
    try:
        _check_run(d, who, exp, argv)  # the whole run as `labkit run` would measure it, bounded
    except BaseException:
        if params is not None:
            Path(argv[-1]).unlink(missing_ok=True)
        raise
    folder = d.results / str(who.uid)
    for p in (d.results, folder):  # root's, 0755, made here: nothing of the caller's is written through
        p.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = p.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise Refused(f"results folder {p} is not root's own folder; the daemon writes nowhere else")
    ticket = object()
    with d._seats:
        d._queue.append(ticket)
    try:
        with d._seats:
            shown = None
            while d._queue[0] is not ticket:
                ahead = d._queue.index(ticket)
                if ahead != shown:
                    _progress(conn, f"waiting for the measurement CPUs: {ahead} run(s) ahead of yours")
                    shown = ahead
                d._seats.wait(0.5)
                if _gone(conn):
                    return {"exit": 130}
        _progress(conn, f"measuring: labkit run {exp} (results in {folder})")
        known = {p.name for p in folder.iterdir()}
        env = {**os.environ, "LABKIT_RESULTS": str(folder), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "labkit.cli", "run", exp, *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd="/",
                                start_new_session=True)
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            ready, _, _ = select.select([proc.stdout, conn], [], [], 1.0)
            if conn in ready and _gone(conn):
                os.killpg(proc.pid, signal.SIGTERM)  # the run ends its labs on SIGTERM
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                return {"exit": 130}
            if proc.stdout in ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                _progress(conn, decode.decode(chunk), raw=True)
        made = sorted(p.name for p in folder.iterdir() if p.name not in known and (p / "manifest.json").exists())
        return {"exit": proc.wait(), "results": str(folder), "run_ids": made}
    finally:
        if params is not None:
            Path(argv[-1]).unlink(missing_ok=True)
        with d._seats:
            d._queue.remove(ticket)
            d._seats.notify_all()


MAX_PARAMS_BYTES = 64 * 1024
RUN_FLAGS_REFUSED = ("--dry-run",)  # the daemon's run measures; a plan needs no daemon (the CLI prints it itself)


def _check_run(d: Daemon, who: Caller, exp: str, argv: list[str]) -> None:
    """Parse ``labkit run EXP ARGV`` as the CLI would, validate the parameters, and bound the run:
    its estimated time within the quota's ``run_minutes`` (a list of a million services, or a billion
    samples, is refused here rather than measured as root)."""
    import contextlib
    import io

    from ..cli import build_parser
    from ..commands.experiments import params_of

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            ns = build_parser().parse_args(["run", exp, *argv])
    except SystemExit:
        raise UsageError(said.getvalue().strip().replace("labkit run: ", "run: ", 1) or "run: bad arguments") from None
    if any(getattr(ns, f.lstrip("-").replace("-", "_"), False) for f in RUN_FLAGS_REFUSED):
        raise Refused(f"{' / '.join(RUN_FLAGS_REFUSED)}: not through the labkit daemon (it measures; the labkit "
                      "CLI prints a plan without it)")
    params, _ = params_of(ns)
    params.validate()
    if getattr(params, "backend", "netns") == "hosts":
        raise Refused("backend: hosts (other machines, over ssh as root) is not available through the labkit daemon")
    if getattr(params, "backend", "netns") != "netns" and not (d.quota.vms or who.instructor):
        raise Refused("backend: VM runs are not allowed in this classroom")
    seconds = params.estimate().get("estimated_seconds", 0)
    if not who.instructor and seconds > d.quota.run_minutes * 60:
        raise Refused(f"quota: this run would measure for about {seconds / 60:.0f} min; a participant's run may "
                      f"take {d.quota.run_minutes} min (fewer services, repeats or samples)")


def _params_file(d: Daemon, who: Caller, exp: str, params: object) -> Path:
    """A run's parameters sent as a mapping (a participant's Python passes its params object): their
    names checked, then written to a file of the daemon's own for ``--params``
    (never a path the caller names)."""
    import tempfile

    import yaml

    from ..experiments import EXPERIMENTS

    if not isinstance(params, dict) or len(json.dumps(params)) > MAX_PARAMS_BYTES:
        raise UsageError(f"run: params must be a mapping of parameter names to values (at most {MAX_PARAMS_BYTES} "
                         "bytes as JSON)")
    cls, _ = EXPERIMENTS[exp]
    chosen = cls.from_mapping(params, "run params")  # unknown names here; values by _check_run, as for flags
    fd, name = tempfile.mkstemp(prefix=f"labkit-params-{who.uid}-", suffix=".yaml", dir=d.path.parent)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(chosen, f)
    return Path(name)


def _gone(conn: socket.socket) -> bool:
    """Whether the caller closed its end (it sends nothing after its request)."""
    ready, _, _ = select.select([conn], [], [], 0)
    if not ready:
        return False
    try:
        return not conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


OPS = {"run": _run, "whoami": _whoami, "up": _up, "ls": _ls, "check": _check, "services": _services,
       "inspect": _inspect, "spec": _spec, "down": _down, "exec": _exec}

UNIT = """[Unit]
Description=labkit daemon: labs for unprivileged users (a classroom)
After=network.target

[Service]
ExecStart={labkit} serve
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""

__all__ = ["Daemon", "Quota", "Caller", "SOCKET", "machine_name", "owner_of", "uid_tag", "OPS", "UNIT"]
