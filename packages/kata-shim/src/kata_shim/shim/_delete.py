"""`containerd-shim-kata-v2 delete`: clean up after a shim that died, print a DeleteResponse.

containerd runs it when it lost a shim (or its start failed). For the pod's sandbox (or a single
container) the persisted state under /run/kata/<sandbox id> says what to undo: the shim process is
killed if it still lives, the sandbox's mounts are unmounted, its directories removed. A later
container of a CRI pod owns nothing on the host of its own: its delete touches nothing.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from pathlib import Path

from kata_shim.shim._address import bundle_sandbox_id, can_connect, socket_address, socket_path
from kata_shim.shim._flags import ShimFlags
from kata_shim.shim._wire import encode_delete_response

KILLED_STATUS = 128 + signal.SIGKILL
KILL_WAIT = 5.0
"""Seconds `delete` waits for the shim it killed to exit (its socket and mounts go with it)."""


def _kill_shim_of(bundle: Path, id: str) -> None:
    """SIGKILL the pid in the bundle's shim.pid if that process is still this container's shim, and
    wait until it has exited: the socket check and the cleanup that follow must not race a dying
    shim (containerd runs `delete` as soon as the connection drops, often while the shim shuts down)."""
    try:
        pid = int((bundle / "shim.pid").read_text().strip())
        pidfd = os.pidfd_open(pid)  # from here on the pid cannot name another process
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ours = any(b"containerd-shim-kata-v2" in a or a == b"kata_shim" for a in cmdline)
        if ours and id.encode() in cmdline and pid != os.getpid():
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], KILL_WAIT)  # readable once the process has exited
    except OSError:
        pass  # it exited meanwhile
    finally:
        os.close(pidfd)


def delete(flags: ShimFlags) -> bytes:
    """Clean up and return the serialized DeleteResponse (exit status 137, exited now)."""
    bundle = Path(flags.bundle or os.getcwd())
    if bundle_sandbox_id(bundle) is None and flags.id:
        # Imported here: a pod container's delete needs none of it.
        from kata_shim.persist import cleanup_sandbox

        _kill_shim_of(bundle, flags.id)
        cleanup_sandbox(flags.id)
        if flags.namespace:
            address = socket_address(flags.address, flags.namespace, flags.id)
            if not can_connect(address):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(socket_path(address))
    return encode_delete_response(pid=0, exit_status=KILLED_STATUS)
