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
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from pathlib import Path

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


def delete(flags: ShimFlags) -> bytes:
    """Clean up and return the serialized DeleteResponse (exit status 137, exited now)."""
    bundle = Path(flags.bundle or os.getcwd())
    if bundle_sandbox_id(bundle) is None and flags.id:
        if not _end_shim_of(bundle, flags.id):
            # the shim is still undoing what it made, and it alone knows where it is: leave it to finish
            return encode_delete_response(pid=0, exit_status=KILLED_STATUS)
        # Imported here: a pod container's delete needs none of it.
        from kata_shim.persist import cleanup_sandbox

        cleanup_sandbox(flags.id)
        if flags.namespace:
            address = socket_address(flags.address, flags.namespace, flags.id)
            if not can_connect(address):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(socket_path(address))
    return encode_delete_response(pid=0, exit_status=KILLED_STATUS)
