"""`containerd-shim-kata-v2 start`: find or launch the pod's shim and print its address.

Runs in a fresh Python process on every container start, so it uses the standard library only
(and not pathlib: see `kata_shim.shim._address`).
The socket is bound here and handed to the new shim (as runtime-rs does), so the address
accepts connections the moment it is printed and two racing starts cannot both bind it; the new
shim reports on a pipe once it serves (or why it could not), and `start` fails with that message.

containerd writes the runtime's options on `start`'s stdin; their ``config_path`` is handed to the new
shim (`ENV_CONFIG_PATH`). It is the only place containerd 2.x's Sandbox API gives it: CreateSandbox's
options carry the CRI pod config instead.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import stat
import sys
import time

from kata_shim._steps import process_age
from kata_shim.shim._address import bundle_sandbox_id, can_connect, socket_address, socket_path
from kata_shim.shim._flags import ShimFlags
from kata_shim.shim._wire import start_config_path
from kata_shim.shim._zygote import (
    ENV_FORKED_BY,
    ENV_ROOM,
    ENV_SPAWN,
    ROOM,
    Request,
    ZygoteError,
    current_umask,
    fork_via_zygote,
    zygote_dir,
)

TYPE_CHECKING = False  # typing itself is not imported: `start` runs in a fresh interpreter per container
if TYPE_CHECKING:
    import subprocess

ENV_LISTEN_FD = "KATA_SHIM_LISTEN_FD"
"""The run-mode shim serves the listening socket with this fd number (set by `start`)."""
ENV_READY_FD = "KATA_SHIM_READY_FD"
"""The run-mode shim writes ``ok`` (or an error line) to this fd once it serves."""
READY_TIMEOUT = float(os.environ.get("KATA_SHIM_READY_TIMEOUT", "120"))
"""Seconds `start` waits for the new shim (Python start-up under nested TCG takes seconds)."""
ENV_CONFIG_PATH = "KATA_SHIM_RUNTIME_CONFIG_PATH"
"""The runtime options' config_path from `start`'s stdin, for the new shim (the default of every Create)."""
ENV_START_EXEC = "KATA_SHIM_START_EXEC"
"""When `start` was exec'd (boot-time clock, seconds), for the new shim's debug line on its own start-up."""
STDIN_TIMEOUT = 1.0
"""Seconds `start` waits for stdin to have something (containerd writes it at once, then closes it)."""
MAX_STDIN = 1 << 20
"""More bytes than this on stdin are not runtime options."""


class StartError(Exception):
    """The shim could not be started (the message says why; containerd shows it)."""


def write_atomic(path: str, text: str) -> None:
    """Replace `path` with `text` in one rename."""
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def shim_command(flags: ShimFlags) -> list[str]:
    """argv that runs this shim in run mode (the console script when we were started through it)."""
    script = sys.argv[0] if sys.argv else ""
    if os.path.basename(script) == "containerd-shim-kata-v2" and os.path.isfile(script):
        head = [sys.executable, os.path.abspath(script)]
    else:
        head = [sys.executable, "-m", "kata_shim"]
    return [*head, *flags.to_argv()]


def bind_socket(address: str) -> socket.socket:
    """A listening unix socket at `address` (a stale socket file nobody serves is replaced)."""
    path = socket_path(address)
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def adjust_oom_score(pid: int) -> None:
    """Give the shim containerd's OOM score adjustment + 1, as containerd's shims do: the kernel then
    prefers killing the shim (and its VM) over containerd, and spares it before ordinary processes."""
    try:
        with open(f"/proc/{os.getppid()}/oom_score_adj") as f:
            parent = int(f.read())
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(min(parent + 1, 1000)))
    except (OSError, ValueError):
        pass  # not permitted (unprivileged tests): keep the inherited score


def _wait_ready(pid: int, child: subprocess.Popen[bytes] | None, ready_fd: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StartError(f"the shim (pid {pid}) did not report ready within {timeout:.0f} s")
        readable, _, _ = select.select([ready_fd], [], [], min(left, 1.0))
        if not readable:
            continue
        chunk = os.read(ready_fd, 4096)
        data += chunk
        if not chunk or b"\n" in data:
            break
    line = data.decode(errors="replace").strip()
    if line == "ok":
        return
    if line:
        raise StartError(line)
    if child is None:
        raise StartError(f"the shim (pid {pid}) exited before serving")
    child.wait(timeout=5)
    raise StartError(f"the shim exited with status {child.returncode} before serving")


def stdin_config_path(fd: int = 0, timeout: float = STDIN_TIMEOUT) -> str:
    """``config_path`` of the runtime options on stdin ("" without any: a terminal, /dev/null, nothing
    written within `timeout`, or bytes that are not runtime options)."""
    data = b""
    deadline = time.monotonic() + timeout
    try:
        if os.isatty(fd):
            return ""
        while True:
            left = deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(left, 0))
            if not readable:
                return ""  # a writer that never writes nor closes: no options
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_STDIN:
                return ""
    except (OSError, ValueError):
        return ""
    try:
        return start_config_path(data)
    except ValueError:
        return ""


def launch(flags: ShimFlags, address: str, bundle: str, config_path: str = "") -> int:
    """Start the run-mode shim serving `address` (forked by the zygote, else a new interpreter); return
    its pid once it serves."""
    sock = bind_socket(address)
    ready_r, ready_w = os.pipe()
    try:
        env = dict(os.environ)
        for name in (
            ENV_LISTEN_FD,
            ENV_READY_FD,
            ENV_CONFIG_PATH,
            ENV_START_EXEC,
            ENV_SPAWN,
            ENV_ROOM,
            ENV_FORKED_BY,
        ):
            env.pop(name, None)
        if config_path:
            env[ENV_CONFIG_PATH] = config_path
        age = process_age()
        if age is not None:
            env[ENV_START_EXEC] = f"{time.clock_gettime(time.CLOCK_BOOTTIME) - age:.3f}"
        argv = shim_command(flags)
        head = len(argv) - len(flags.to_argv())
        request = Request(argv, head, env, os.path.abspath(bundle), current_umask())
        child = None
        try:
            pid = fork_via_zygote(request, (sock.fileno(), ready_w))
        except ZygoteError as err:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path(address))
            raise StartError(str(err)) from None
        if pid is None:
            if zygote_dir() is not None:
                env[ENV_SPAWN] = "1"  # and the new shim forks a zygote off for the next start
                env[ENV_ROOM] = "." * ROOM  # room in the zygote's environ area for its forks' own
            env[ENV_LISTEN_FD] = str(sock.fileno())
            env[ENV_READY_FD] = str(ready_w)
            import subprocess  # here: only this fallback needs it

            # A fresh interpreter (no fork of this one): new session, cwd the bundle, stdio to /dev/null.
            child = subprocess.Popen(
                argv,
                cwd=bundle,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(sock.fileno(), ready_w),
                start_new_session=True,
            )
            pid = child.pid
        os.close(ready_w)
        ready_w = -1
        sock.close()  # the shim holds the listening socket now
        adjust_oom_score(pid)
        try:
            _wait_ready(pid, child, ready_r, READY_TIMEOUT)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path(address))
            raise
        return pid
    finally:
        sock.close()
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)


def start(flags: ShimFlags) -> str:
    """Return the address of the shim that serves this container, launching one if needed."""
    if not flags.namespace:
        raise StartError("shim namespace cannot be empty")
    if not flags.id:
        raise StartError("shim id cannot be empty")
    bundle = flags.bundle or os.getcwd()
    sandbox_id = bundle_sandbox_id(bundle)
    if sandbox_id is not None:
        # A later container of a CRI pod: its sandbox's shim serves it.
        address = socket_address(flags.address, flags.namespace, sandbox_id)
    else:
        address = socket_address(flags.address, flags.namespace, flags.id)
        if not can_connect(address):
            pid = launch(flags, address, bundle, stdin_config_path())
            write_atomic(os.path.join(bundle, "shim.pid"), str(pid))
    write_atomic(os.path.join(bundle, "address"), address)
    return address
