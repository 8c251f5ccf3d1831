"""The zygote: a warm parent that forks a serving shim per sandbox instead of starting a new interpreter.

`containerd-shim-kata-v2 start` used to exec a fresh Python for every sandbox, and that interpreter's
start-up and imports (trio, protobuf, the shim's modules) took 3-5 s under nested TCG before it served:
most of a start from a VM template. The zygote is a fork of a run-mode shim taken after its imports and
before it ran anything (no thread, no trio run, no logging, no sandbox), with the back-ends' modules
imported too and its objects frozen out of the cyclic GC (so forks share its pages). `start` hands it
the listening socket and the ready pipe (SCM_RIGHTS) with the argv, environment, working directory and
umask the shim would have been exec'd with; the zygote forks twice (the shim ends up nobody's child,
as an exec'd one after `start` exits) and the grandchild becomes that shim: a session of its own, stdio
on /dev/null, the request's cwd, umask, environment and argv (/proc/PID/cmdline and environ are rewritten
to them, so `ps`, `delete` and the lab find it by its flags), then the run mode as after an exec.

containerd also runs `containerd-shim-kata-v2 delete` after every shim's exit and waits for it: a
`delete` hands the zygote its stdin, stdout and stderr instead, and a fork with everything imported does
the cleanup and answers on them.

Lifecycle: a `start` that finds no zygote execs its shim as before, with `ENV_SPAWN` set; that shim
forks the zygote off first thing. One zygote per interpreter and install (the socket's name hashes
them) in $KATA_SHIM_ZYGOTE_DIR (default /run/kata-shim-zygote, root-only; "off" disables it). It holds
a lock for its life, answers only its own uid (SO_PEERCRED), refuses and exits once any module file it
loaded changed on disk (an upgrade never leaves a stale shim), and exits after $KATA_SHIM_ZYGOTE_IDLE
seconds (default 900) without a request. `start` falls back to exec on any failure.

Forks share what a fork shares: the interpreter's str hash seed (`random` reseeds itself in each child;
`os.urandom` and `secrets` draw from the kernel).

The wire: the client sends one message, a 4-byte big-endian length and the request (NUL-separated:
`MAGIC`, cwd, octal umask, the number of argv items before the shim's flags, the argv count, argv, then
the environment as KEY=VALUE), with its fds (`FDS`) on its first bytes; the zygote answers a line,
``pid N`` (forked) or ``stale: ...`` or ``error: ...`` (nothing forked); a delete's fork then says
``exit N``. Client side: standard library only (`start` and `delete` import it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import sys
import time

from kata_shim.__about__ import __version__
from kata_shim._proc import stat_fields

try:  # the built-in sha256 (see kata_shim.shim._address)
    from _sha256 import sha256  # type: ignore[import-not-found]  # no stub: private module
except ImportError:  # pragma: no cover - interpreters without it (3.12 calls it _sha2)
    from hashlib import sha256

TYPE_CHECKING = False  # typing itself is not imported (see kata_shim.shim._address)
if TYPE_CHECKING:
    from collections.abc import Iterator

ENV_DIR = "KATA_SHIM_ZYGOTE_DIR"
"""Where the zygote's socket and lock are ("off" or empty: no zygote, every shim is exec'd)."""
DEFAULT_DIR = "/run/kata-shim-zygote"
ENV_IDLE = "KATA_SHIM_ZYGOTE_IDLE"
"""Seconds without a request after which the zygote exits."""
DEFAULT_IDLE = 900.0
ENV_SPAWN = "KATA_SHIM_ZYGOTE_SPAWN"
"""Set by `start` on a shim it execs because no zygote answered: that shim forks one off."""
ENV_ROOM = "KATA_SHIM_ZYGOTE_ROOM"
"""Padding in that shim's environment: the zygote rewrites its forks' /proc/PID/environ over the area it
inherited, which must hold theirs when the kernel cannot be pointed elsewhere (no CAP_SYS_RESOURCE)."""
ROOM = 4096
ENV_FORKED_BY = "KATA_SHIM_FORKED_BY"
"""In a forked shim's environment: the zygote's pid."""
MAGIC = b"kata-zygote-1"
CLIENT_TIMEOUT = 10.0
"""Seconds `start` gives the zygote to take a request (connect and send)."""
ANSWER_WITHIN = 120.0
"""Seconds `start` then waits for its answer (a fork takes a fraction of one, but a host may be loaded)."""
MAX_REQUEST = 1 << 20
LOCK_WAIT = 2.0
"""Seconds a new zygote waits for the lock of one that is on its way out (a stale one)."""

_PR_SET_MM = 35
_PR_SET_MM_ARG_START = 8
_PR_SET_MM_ARG_END = 9
_PR_SET_MM_ENV_START = 10
_PR_SET_MM_ENV_END = 11
_AREAS = {
    "arg": (45, _PR_SET_MM_ARG_START, _PR_SET_MM_ARG_END),
    "env": (47, _PR_SET_MM_ENV_START, _PR_SET_MM_ENV_END),
}
"""Index in `stat_fields` of each area's start (its end follows), and its PR_SET_MM ops."""
_KEEP_ALIVE: list[object] = []
"""Buffers the kernel now reads a process's cmdline or environ from."""


class Request:
    """What a shim would have been exec'd with: argv (``head`` items of interpreter and script, then the
    shim's flags), environment, working directory and umask."""

    def __init__(self, argv: list[str], head: int, env: dict[str, str], cwd: str, umask: int) -> None:
        self.argv = argv
        self.head = head
        self.env = env
        self.cwd = cwd
        self.umask = umask

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Request):
            return NotImplemented
        return vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Request({self.argv!r}, head={self.head}, cwd={self.cwd!r}, umask={self.umask:o})"

    def encode(self) -> bytes:
        fields = [MAGIC, os.fsencode(self.cwd), b"%o" % self.umask, b"%d" % self.head, b"%d" % len(self.argv)]
        fields += [os.fsencode(a) for a in self.argv]
        fields += [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in self.env.items()]
        if any(b"\0" in f for f in fields):
            raise ValueError("a NUL byte in an argument, the environment or the directory")
        return b"\0".join(fields)

    @classmethod
    def decode(cls, data: bytes) -> Request:
        """Raises ValueError on anything `encode` would not have written."""
        fields = data.split(b"\0")
        if len(fields) < 5 or fields[0] != MAGIC:
            raise ValueError("not a zygote request")
        cwd, umask, head, count = fields[1], int(fields[2], 8), int(fields[3]), int(fields[4])
        if not (0 <= umask <= 0o777 and 0 <= head <= count <= len(fields) - 5 and cwd.startswith(b"/")):
            raise ValueError("bad zygote request header")
        argv = [os.fsdecode(a) for a in fields[5 : 5 + count]]
        env: dict[str, str] = {}
        for entry in fields[5 + count :]:
            key, eq, value = entry.partition(b"=")
            if not eq or not key:
                raise ValueError(f"bad environment entry {entry[:40]!r}")
            env[os.fsdecode(key)] = os.fsdecode(value)
        return cls(argv, head, env, os.fsdecode(cwd), umask)


def current_umask() -> int:
    """This process's umask (reading it means setting it: set back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def zygote_dir() -> str | None:
    """The zygote's directory, None when it is turned off."""
    value = os.environ.get(ENV_DIR, DEFAULT_DIR)
    return None if value in ("", "off") else value


def key() -> str:
    """This interpreter's and install's zygote name: a zygote serves only shims of the same code."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return sha256(f"{sys.executable}\0{package}\0{__version__}".encode()).hexdigest()[:16]


def trusted_dir(path: str) -> bool:
    """A real directory of ours that nobody else can write (the socket in it is then the zygote's)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class ZygoteError(Exception):
    """The zygote took the fds and did not say what it did with them: `start` must not exec a second
    shim onto the same socket."""


def _send(request: Request, fds: tuple[int, ...], timeout: float) -> socket.socket | None:
    """A connection to this install's zygote that has taken ``request`` and ``fds``; None when there is
    no zygote to ask (none, not ours, not listening, or the request could not be sent whole: nothing
    was forked then)."""
    directory = zygote_dir()
    if directory is None or not trusted_dir(directory):
        return None
    try:
        payload = request.encode()
    except ValueError:
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(os.path.join(directory, key() + ".sock"))
        if peer_uid(s) != os.geteuid():
            s.close()
            return None
        message = len(payload).to_bytes(4, "big") + payload
        sent = socket.send_fds(s, [message[:4096]], list(fds))
        if sent < len(message):  # (never an empty send: the zygote may have answered and gone)
            s.sendall(message[sent:])  # a request cut short is never forked
    except OSError:
        s.close()
        return None
    return s


def _lines(s: socket.socket, timeout: float) -> Iterator[bytes]:
    """The zygote's answer, line by line, until it closes (TimeoutError when it says nothing for
    ``timeout`` seconds; a reset ends it like a close)."""
    s.settimeout(timeout)
    data = b""
    while True:
        while b"\n" in data:
            line, data = data.split(b"\n", 1)
            yield line
        try:
            chunk = s.recv(512)
        except TimeoutError:
            raise
        except OSError:
            return
        if not chunk or len(data) > 4096:
            return
        data += chunk


def _pid(line: bytes | None) -> int | None:
    word, _, value = (line or b"").partition(b" ")
    return int(value) if word == b"pid" and value.isdigit() else None


def fork_via_zygote(
    request: Request,
    fds: tuple[int, int],
    timeout: float = CLIENT_TIMEOUT,
    answer_within: float = ANSWER_WITHIN,
) -> int | None:
    """Have the zygote fork the shim of ``request`` with ``fds`` (the listening socket, the ready pipe's
    write end); its pid, or None when no zygote forked one (none there, stale, refused, gone before it
    forked: the caller execs the shim). Raises ZygoteError when it has the fds and says nothing within
    ``answer_within`` seconds (it may yet fork)."""
    s = _send(request, fds, timeout)
    if s is None:
        return None
    with s:  # from here on the zygote may have forked: only its word (or its end: EOF) says it did not
        try:
            return _pid(next(_lines(s, answer_within), None))
        except TimeoutError:
            raise ZygoteError(f"the zygote did not answer within {answer_within:g} s") from None


def delete_via_zygote(args: list[str], timeout: float = CLIENT_TIMEOUT) -> int | None:
    """Run containerd's ``delete`` command line (``args``) in a fork of the zygote, on this process's
    stdin, stdout and stderr (all its imports done: containerd waits for `delete` after every shim's
    exit); its exit status, or None when no zygote took it (the caller deletes itself)."""
    from kata_shim._steps import ENV_STARTED_AT, process_age

    env = dict(os.environ)
    age = process_age()
    if age is not None:  # the fork answers containerd in time counted from this process's start
        env[ENV_STARTED_AT] = f"{time.clock_gettime(time.CLOCK_BOOTTIME) - age:.3f}"
    script = sys.argv[0] if sys.argv else "containerd-shim-kata-v2"
    request = Request([sys.executable, script, *args], 2, env, os.getcwd(), current_umask())
    s = _send(request, (0, 1, 2), timeout)
    if s is None:
        return None
    with s:
        lines = _lines(s, ANSWER_WITHIN)
        try:
            if _pid(next(lines, None)) is None:
                return None  # stale or refused: nothing ran
            word, _, value = (next(lines, None) or b"").partition(b" ")
        except TimeoutError:
            word, value = b"", b""
    if word == b"exit" and value.isdigit():
        return int(value)
    print("containerd-shim-kata-v2: delete: the zygote's fork ended without a status", file=sys.stderr)
    return 1


def end_zygotes(directory: str | os.PathLike[str]) -> list[int]:
    """SIGKILL the zygotes of ``directory`` (each one's lock file names its pid, checked against its
    cmdline) and remove their sockets; their pids. A zygote holds nothing a kill loses."""
    import signal

    ended: list[int] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return ended
    for name in names:
        if not name.endswith(".lock"):
            continue
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(directory, name), "rb") as f:
                pid = int(f.read().strip() or 0)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().split(b"\0")
            if pid and b"zygote" in cmdline and os.fsencode(directory) in cmdline:
                os.kill(pid, signal.SIGKILL)
                ended.append(pid)
                os.unlink(os.path.join(directory, name.removesuffix(".lock") + ".sock"))
    return ended


@contextlib.contextmanager
def zygotes_in(directory: str | os.PathLike[str] | None = None) -> Iterator[str]:
    """Within: this process's environment (and so every shim started from it) uses the zygotes of
    ``directory`` (by default a new one below /tmp, removed after; "off": none), a test's or a benchmark's
    own; after: those zygotes are ended and the variable is restored."""
    import shutil
    import tempfile

    scratch = None
    if directory is None:
        scratch = tempfile.mkdtemp(prefix="kz-", dir="/tmp")
        directory = os.path.join(scratch, "z")
    path = os.fspath(directory)
    before = os.environ.get(ENV_DIR)
    os.environ[ENV_DIR] = path
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop(ENV_DIR, None)
        else:
            os.environ[ENV_DIR] = before
        end_zygotes(path)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


# --- the zygote's side: runs only in a run-mode shim's fork, where everything below is imported already.


def spawn() -> None:
    """Fork the zygote off this run-mode shim, which has imported everything and started nothing yet
    (`run` calls this first). Returns at once in the shim; the zygote is its grandchild, in a session of
    its own, and not its child."""
    directory = zygote_dir()
    if directory is None:
        return
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return
    try:  # the intermediate: never returns
        os.setsid()
        if os.fork() == 0:
            try:
                _zygote_main(directory)
            finally:
                os._exit(0)
    finally:
        os._exit(0)


def _detach(keep: set[int]) -> None:
    """Close every fd but stdio and ``keep``; stdio to /dev/null."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def _lock(path: str) -> int | None:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    end = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() > end:
                os.close(fd)
                return None
            time.sleep(0.1)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        return fd


def warm_up() -> None:
    """Import what a sandbox's start would import later (the registries' modules): a fork then has it."""
    import importlib

    from kata_shim.hypervisor._registry import HYPERVISORS
    from kata_shim.runtime._registry import RUNTIME_HANDLERS

    targets = [*RUNTIME_HANDLERS.values(), *HYPERVISORS.values(), "kata_shim.factory:", "kata_resources:"]
    for target in targets:
        with contextlib.suppress(Exception):
            importlib.import_module(target.partition(":")[0])


def module_files() -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of the interpreter and of every loaded module's file."""
    paths = {sys.executable}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str):
            paths.add(path)
    seen = {path: _signature(path) for path in paths}
    return {path: sig for path, sig in seen.items() if sig is not None}


def _signature(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def changed_file(seen: dict[str, tuple[int, int]]) -> str | None:
    """The first file of ``seen`` that is no longer what it was (or is gone), None when none changed."""
    return next((path for path, was in seen.items() if _signature(path) != was), None)


def _zygote_main(directory: str) -> None:
    import gc

    from kata_shim.shim._start import ENV_LISTEN_FD, ENV_READY_FD, bind_socket

    seen = module_files()  # first: the files as the shim this is a fork of imported them
    _detach(set())
    os.chdir("/")
    for name in (ENV_SPAWN, ENV_ROOM, ENV_LISTEN_FD, ENV_READY_FD):
        os.environ.pop(name, None)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if not trusted_dir(directory):
        return
    name = key()
    lock = _lock(os.path.join(directory, name + ".lock"))
    if lock is None:
        return  # another zygote serves
    path = os.path.join(directory, name + ".sock")
    server = bind_socket(path)  # replaces a dead zygote's socket: we hold the lock
    try:
        set_proc_strings("arg", ["containerd-shim-kata-v2", "zygote", directory])
        warm_up()
        seen = {**module_files(), **seen}
        gc.collect()
        gc.freeze()
        try:
            idle = float(os.environ.get(ENV_IDLE, DEFAULT_IDLE))
        except ValueError:
            idle = DEFAULT_IDLE
        server.settimeout(idle)
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                return
            with conn:
                if not _answer(conn, seen):
                    return
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # ours: we hold the lock
        server.close()


FDS = {"run": 2, "delete": 3}
"""The fds a request of each action brings: run (a shim): the listening socket and the ready pipe's write
end; delete: the client's stdin, stdout and stderr."""


def _answer(conn: socket.socket, seen: dict[str, tuple[int, int]]) -> bool:
    """Serve one request; False when the zygote must go (its code changed, or it grew a thread)."""
    from kata_shim.shim._flags import UsageError, parse_flags

    conn.settimeout(30.0)
    fds: list[int] = []
    try:
        if peer_uid(conn) != os.geteuid():
            return True
        data, fds, _, _ = socket.recv_fds(conn, 4096, max(FDS.values()))
        if len(data) < 4:
            conn.sendall(b"error: a request has a length\n")
            return True
        size = int.from_bytes(data[:4], "big")
        if size > MAX_REQUEST:
            conn.sendall(b"error: request too large\n")
            return True
        payload = data[4:]
        while len(payload) < size:
            chunk = conn.recv(min(65536, size - len(payload)))
            if not chunk:
                return True
            payload += chunk
        request = Request.decode(payload)
        try:
            action = parse_flags(request.argv[request.head :]).action
        except UsageError as err:
            raise ValueError(str(err)) from None
        if action not in FDS:
            conn.sendall(f"error: the zygote forks for {' and '.join(FDS)}, not {action}\n".encode())
            return True
        if len(fds) != FDS[action]:
            conn.sendall(f"error: {action} takes {FDS[action]} fds, not {len(fds)}\n".encode())
            return True
        changed = changed_file(seen)
        if changed is not None:
            conn.sendall(f"stale: {changed} changed\n".encode(errors="replace"))
            return False
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            conn.sendall(b"error: the zygote has %d threads\n" % threads)
            return False
        zygote = os.getpid()
        pid = os.fork()
        if pid == 0:  # the intermediate: never returns
            try:
                child = os.fork()
                if child == 0:
                    if action == "run":
                        _become_shim(request, (fds[0], fds[1]), zygote)
                    _run_delete(request, fds, conn)
                with contextlib.suppress(OSError):
                    conn.sendall(b"pid %d\n" % child)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    except (OSError, ValueError) as err:
        with contextlib.suppress(OSError):
            conn.sendall(f"error: {err}\n".encode(errors="replace"))
    finally:
        for fd in fds:
            os.close(fd)
    return True


def _take_request(request: Request, extra_env: dict[str, str]) -> None:
    """The forked child becomes the process the request describes: working directory, umask,
    environment (and /proc/self/environ), argv."""
    os.chdir(request.cwd)
    os.umask(request.umask)
    env = {**request.env, **extra_env}
    os.environ.clear()
    os.environ.update(env)
    sys.argv = list(request.argv)


def _run_delete(request: Request, fds: list[int], conn: socket.socket) -> None:
    """In the zygote's grandchild: containerd's `delete` on the client's stdio; says ``exit N`` on
    ``conn`` and exits with N. Never returns."""
    status = 1
    try:
        os.setsid()
        _detach({conn.fileno(), *fds})
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        _take_request(request, {})
        from kata_shim.shim._delete import delete_command
        from kata_shim.shim._flags import parse_flags

        status = delete_command(parse_flags(request.argv[request.head :]))
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException as err:
        with contextlib.suppress(Exception):
            print(f"containerd-shim-kata-v2: delete (zygote): {err!r}", file=sys.stderr, flush=True)
    finally:
        with contextlib.suppress(OSError):
            conn.sendall(b"exit %d\n" % status)
        os._exit(status)


def _become_shim(request: Request, fds: tuple[int, int], zygote: int) -> None:
    """In the zygote's (pid ``zygote``) grandchild: become the shim ``request`` describes and run it;
    never returns."""
    from kata_shim.shim._start import ENV_LISTEN_FD, ENV_READY_FD

    status = 1
    listen_fd, ready_fd = fds
    try:
        os.setsid()
        _detach({listen_fd, ready_fd})
        extra = {ENV_LISTEN_FD: str(listen_fd), ENV_READY_FD: str(ready_fd), ENV_FORKED_BY: str(zygote)}
        _take_request(request, extra)
        env = dict(os.environ)
        if not (
            set_proc_strings("arg", request.argv)
            and set_proc_strings("env", [f"{k}={v}" for k, v in env.items()])
        ):
            # Without its own cmdline `ps` and `delete` would not know this shim: exec it instead.
            for fd in fds:
                os.set_inheritable(fd, True)
            del env[ENV_FORKED_BY]
            os.execve(request.argv[0], request.argv, env)
        from kata_shim.shim._flags import parse_flags
        from kata_shim.shim._run import run

        status = run(parse_flags(request.argv[request.head :]))
    except BaseException as err:  # said where `start` waits (run reports its own failures there too)
        with contextlib.suppress(OSError):
            os.write(ready_fd, f"zygote: cannot become the shim: {err}\n".encode(errors="replace"))
    finally:
        from kata_shim.shim._run import exit_now

        exit_now(status)


def _prctl_mm(op: int, value: int) -> bool:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)
    return int(libc.prctl(_PR_SET_MM, ctypes.c_ulong(op), ctypes.c_ulong(value), zero, zero)) == 0


def set_proc_strings(area: str, items: list[str]) -> bool:
    """Make /proc/self/cmdline (``area`` "arg") or /proc/self/environ ("env") read ``items``: written over
    the original area when they fit (anyone may), else into a buffer of ours the kernel is pointed at
    (PR_SET_MM: CAP_SYS_RESOURCE). False when neither could be done (the area is unchanged)."""
    import ctypes

    field, start_op, end_op = _AREAS[area]
    data = b"".join(os.fsencode(item) + b"\0" for item in items)
    try:
        fields = stat_fields("/proc/self/stat")
        start, end = int(fields[field]), int(fields[field + 1])
    except (OSError, ValueError, IndexError):
        return False
    if 0 < len(data) <= end - start:
        ctypes.memmove(start, data + bytes(end - start - len(data)), end - start)
        _prctl_mm(end_op, start + len(data))  # trims the padding where permitted; it reads as NULs if not
        return True
    buf = ctypes.create_string_buffer(data, len(data))
    new_start = ctypes.addressof(buf)
    new_end = new_start + len(data)
    # The kernel checks start <= end after each call: move the end first when the buffer lies above.
    first, second = (
        ((end_op, new_end), (start_op, new_start))
        if new_start >= start
        else ((start_op, new_start), (end_op, new_end))
    )
    if not _prctl_mm(*first):
        return False
    if not _prctl_mm(*second):
        _prctl_mm(first[0], end if first[0] == end_op else start)
        return False
    _KEEP_ALIVE.append(buf)
    return True
