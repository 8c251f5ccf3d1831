"""`containerd-shim-kata-v2 delete`: clean up after a shim that died, print a DeleteResponse.

containerd runs it when it lost a shim (or its start failed). For the pod's sandbox (or a single
container) the persisted state under /run/kata/<sandbox id> says what to undo: the shim process is
killed if it still lives, the sandbox's mounts are unmounted, its directories removed. A later
container of a CRI pod owns nothing on the host of its own: its delete touches nothing.

containerd also runs it whenever the connection drops, which an orderly Shutdown does too, and gives it
a few seconds (containerd 1.6: 5 s) before killing it. A shim that says it is shutting down (`SHUTTING_DOWN`
in its bundle, with its pid) is undoing what it made: `delete` waits for it up to `SHUTDOWN_WAIT` and never
kills it, so a slow host cannot leave the sandbox half torn down (the shim killed mid-unmount, then this
process killed by containerd before its own cleanup). One shutting down for longer than `SHUTDOWN_STUCK` is
killed as a wedged one.

containerd's few seconds are not enough on a loaded host either (measured in the lab VM: `delete` killed at
5 s, the pod's state and mounts left for good, since containerd runs it once). So the cleanup runs in a
finisher: a child forked first thing, in a session of its own, with none of containerd's pipes open (Go's
`cmd.Run` would wait for them). The parent waits for it until `ANSWER_WITHIN` seconds after its own start
and then answers; a finisher still at work goes on to the end, and a parent killed by containerd does not
take it along. Finishers of one bundle take turns (flock on the bundle directory), so a second `delete`
finds the first one's work done.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from kata_shim._steps import process_age
from kata_shim.shim._address import bundle_sandbox_id, can_connect, socket_address, socket_path
from kata_shim.shim._flags import ShimFlags
from kata_shim.shim._start import write_atomic
from kata_shim.shim._wire import encode_delete_response

KILLED_STATUS = 128 + signal.SIGKILL
KILL_WAIT = 5.0
"""Seconds `delete` waits for the shim it killed to exit (its socket and mounts go with it)."""
SHUTTING_DOWN = "shim.shutting-down"
"""File in the bundle the shim writes (its pid) when its orderly shutdown begins."""
SHUTDOWN_WAIT = 3.0
"""Seconds `delete` waits for a shim in its orderly shutdown to exit before leaving it to finish."""
SHUTDOWN_STUCK = 120.0
"""Seconds of shutting down after which a shim counts as wedged (and is killed)."""
ANSWER_WITHIN = 4.0
"""Seconds after its start by which `delete` answers, finished or not (containerd 1.6 kills it at 5 s)."""


def mark_shutting_down(bundle: Path) -> None:
    """Say in ``bundle`` that this shim's orderly shutdown has begun (best effort)."""
    with contextlib.suppress(OSError):
        write_atomic(str(bundle / SHUTTING_DOWN), str(os.getpid()))


def _shutting_down(bundle: Path, pid: int, now: float) -> bool:
    """Whether shim ``pid`` said it is shutting down, not longer ago than `SHUTDOWN_STUCK`."""
    marker = bundle / SHUTTING_DOWN
    try:
        said = int(marker.read_text().strip())
        since = now - os.lstat(marker).st_mtime
    except (OSError, ValueError):
        return False
    return said == pid and since < SHUTDOWN_STUCK


def _end_shim_of(bundle: Path, id: str) -> bool:
    """End the pid in the bundle's shim.pid if that process is still this container's shim and wait
    until it has exited (the socket check and the cleanup that follow must not race a dying shim): a shim
    in its orderly shutdown is waited for (`SHUTDOWN_WAIT`), any other is SIGKILLed. False: a shim still
    shutting down was left to finish (nothing else may be touched)."""
    try:
        pid = int((bundle / "shim.pid").read_text().strip())
        pidfd = os.pidfd_open(pid)  # from here on the pid cannot name another process
    except (OSError, ValueError):
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ours = any(b"containerd-shim-kata-v2" in a or a == b"kata_shim" for a in cmdline)
        if not (ours and id.encode() in cmdline and pid != os.getpid()):
            return True
        if _shutting_down(bundle, pid, time.time()):
            readable, _, _ = select.select([pidfd], [], [], SHUTDOWN_WAIT)  # readable once it has exited
            return bool(readable)
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], KILL_WAIT)
    except OSError:
        pass  # it exited meanwhile
    finally:
        os.close(pidfd)
    return True


def run_detached(work: Callable[[], list[str]], answer_within: float) -> list[str] | None:
    """Run ``work`` in a finisher (a forked child in its own session, stdio on /dev/null) and wait for it
    until ``answer_within`` seconds after this process started. Returns what ``work`` returned, or None
    when it was still running then (it goes on alone, and outlives this process)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the finisher: never returns
        status = 1
        try:
            os.close(r)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            try:
                lines = work()
            except Exception as err:  # said to the parent, which says it to containerd
                lines = [f"cleanup failed: {err!r}"]
            said = "\n".join(lines).encode()
            with contextlib.suppress(OSError):  # the parent may be gone
                os.write(w, said[: select.PIPE_BUF])
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    said = b""
    try:
        while True:
            left = answer_within - (process_age() or 0.0)
            readable, _, _ = select.select([r], [], [], max(0.0, left))
            if not readable:
                return None  # not finished by the answer's time: the finisher goes on alone
            chunk = os.read(r, select.PIPE_BUF)
            if not chunk:
                break
            said += chunk
    finally:
        os.close(r)
    os.waitpid(pid, 0)
    return [line for line in said.decode(errors="replace").splitlines() if line]


def _clean_up(bundle: Path, flags: ShimFlags) -> list[str]:
    """The finisher's work: end the shim, undo the sandbox, remove a dead socket. Returns the problems."""
    lock = None
    with contextlib.suppress(OSError):
        lock = os.open(bundle, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fcntl.flock(lock, fcntl.LOCK_EX)  # another delete of this bundle finishes first
    try:
        if not _end_shim_of(bundle, flags.id):
            # the shim is still undoing what it made, and it alone knows where it is: leave it to finish
            return []
        # Imported here: a pod container's delete needs none of it.
        from kata_shim.persist import cleanup_sandbox

        report = cleanup_sandbox(flags.id)
        if flags.namespace:
            address = socket_address(flags.address, flags.namespace, flags.id)
            if not can_connect(address):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(socket_path(address))
        return [f"sandbox {flags.id}: {error}" for error in report.errors]
    finally:
        if lock is not None:
            os.close(lock)


def delete(flags: ShimFlags) -> bytes:
    """Clean up (in a finisher, `run_detached`) and return the serialized DeleteResponse (exit status 137,
    exited now). The cleanup's problems, and one still running at the answer's time, go to stderr
    (containerd logs them as the cleanup's warnings)."""
    bundle = Path(flags.bundle or os.getcwd())
    if bundle_sandbox_id(bundle) is None and flags.id:
        said = run_detached(lambda: _clean_up(bundle, flags), ANSWER_WITHIN)
        if said is None:
            late = f"cleanup still running {ANSWER_WITHIN:g} s after delete began, goes on"
            said = [f"sandbox {flags.id}: {late}"]
        for line in said:
            print(line, file=sys.stderr)
    return encode_delete_response(pid=0, exit_status=KILLED_STATUS)


def delete_command(flags: ShimFlags) -> int:
    """`containerd-shim-kata-v2 delete` as containerd runs it: the DeleteResponse on stdout, problems on
    stderr; the exit status."""
    try:
        data = delete(flags)
    except OSError as err:
        print(f"containerd-shim-kata-v2: delete: {err}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0
