"""Passfd stdio (Dragonball's fd passthrough): containerd's fifos handed to the VMM, not copied by us.

For each fifo the shim connects to the hybrid vsock socket, writes ``passfd\\n``, then sends
``<port>[ keep]`` with the fifo's fd (SCM_RIGHTS); the VMM bridges that fd to a guest connection on the
agent's passfd listener and answers ``OK <host_port>\\n``. The host ports go into CreateContainer /
ExecProcess, so stdio bytes never cross ttrpc.

Fifos are opened non-blocking (no open(2) blocks the trio thread): an output fifo first O_RDWR (so it has a
reader and the write-only open that follows never fails with ENXIO), and the VMM gets the O_WRONLY fd
(passed with ``keep``: a reader gone later drops bytes, and Python ignores SIGPIPE); stdin O_RDONLY.
The shim closes its own descriptors as soon as the VMM holds them: the VMM's copy of an output fifo is
then its only writer, so containerd sees EOF when the VMM closes it at the end of the stream, and
containerd's close of the stdin fifo (CloseIO) is the EOF the VMM turns into a stream shutdown.

Nothing here waits on the guest without a budget: each handshake (connect, send, the VMM's ``OK``, which
needs the guest's answer) has `PASSFD_TIMEOUT` seconds (of the guest's time when the listener has its
clock, within kata-agent-client's wall-time cap), then `PassfdError` names the stream that did not get
through. The VMM also expires a REQUEST the guest never answers (kata-virtio's ``connect_timeout``, on the
guest's clock too) and says ``ERR <reason>``, which becomes the error message.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from kata_agent_client import StdioPorts, guest_timed

#: The longest reply line we accept from the VMM (`OK 4294967295\n` is 14 bytes).
_REPLY_MAX = 64
#: Seconds for one process's passfd handshakes (longer than the VMM's own 10 s REQUEST expiry, so its
#: ERR reason normally arrives first).
PASSFD_TIMEOUT = 15.0


class PassfdError(OSError):
    """The VMM refused or dropped a passfd handshake."""


@dataclass(frozen=True)
class PassfdListener:
    """Where the hypervisor takes passfd fds: its hybrid vsock socket and the agent's guest port."""

    uds: Path
    port: int
    clock: Callable[[], float] | None = field(default=None, compare=False)
    """The guest's clock (`GuestClock.now`) the handshakes' budget is counted on; None: wall time."""


async def passfd_connect(listener: PassfdListener, fd: int, *, keep: bool = False) -> int:
    """Hand `fd` to the VMM for a stream to the guest's passfd port; returns the stream's host port.

    The VMM gets its own copy of `fd` (the caller still owns and closes `fd`). Raises `PassfdError` when
    the VMM refuses (``ERR``), hangs up, or no ``OK`` arrives within `PASSFD_TIMEOUT` seconds.
    """
    where = f"passfd to {listener.uds} port {listener.port}"
    try:
        line = await guest_timed(listener.clock, PASSFD_TIMEOUT, lambda: _handshake(listener, fd, keep))
    except trio.TooSlowError as err:
        why = f"no answer {err} (the guest did not accept the stream)"
        raise PassfdError(errno.ETIMEDOUT, f"{where}: {why}") from None
    parts = line.split()
    if not line:
        raise PassfdError(
            f"{where}: the VMM closed the connection without an answer (no guest listener on that port?)"
        )
    if parts[:1] == [b"ERR"]:
        reason = line[4:].strip().decode("ascii", "replace")
        raise PassfdError(f"{where}: the VMM refused: {reason}")
    if len(parts) != 2 or parts[0] != b"OK" or not parts[1].isdigit():
        raise PassfdError(f"{where}: bad reply {line[:32]!r}")
    return int(parts[1])


async def _handshake(listener: PassfdListener, fd: int, keep: bool) -> bytes:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        try:
            await sock.connect(str(listener.uds))
            await sock.send(b"passfd\n")
            text = f"{listener.port}{' keep' if keep else ''}".encode()
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            await sock.sendmsg([text], ancillary)
            line = b""
            while not line.endswith(b"\n") and len(line) < _REPLY_MAX:
                chunk = await sock.recv(_REPLY_MAX - len(line))
                if not chunk:
                    break
                line += chunk
        except OSError as err:
            raise PassfdError(err.errno or 0, f"passfd to {listener.uds}: {err.strerror or err}") from err
    return line


async def passfd_stdio(
    listener: PassfdListener,
    stdin: str,
    stdout: str,
    stderr: str,
    *,
    terminal: bool,
) -> StdioPorts:
    """Open the process's fifos, hand each to the VMM and return the ports (a terminal has no stderr).

    Each handshake has `PASSFD_TIMEOUT` seconds. Every fd the shim opened is closed before this
    returns, whether it succeeds or not.
    """
    opened: list[int] = []
    ports = {"stdin": 0, "stdout": 0, "stderr": 0}
    try:
        plan = [("stdin", stdin, os.O_RDONLY), ("stdout", stdout, os.O_RDWR)]
        if not terminal:
            plan.append(("stderr", stderr, os.O_RDWR))
        for name, path, mode in plan:
            if not path:
                continue
            fd = os.open(path, mode | os.O_NONBLOCK | os.O_CLOEXEC)
            opened.append(fd)
            if mode == os.O_RDWR:
                # The O_RDWR fd is a reader, so a write-only open cannot fail with ENXIO; the VMM gets the
                # write-only one: with a read end it would poll its own unread output and take it back.
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                opened.append(fd)
            # Output: `keep`, so a reader containerd closed early never ends the process's output stream.
            try:
                ports[name] = await passfd_connect(listener, fd, keep=name != "stdin")
            except PassfdError as err:
                if err.errno:
                    raise PassfdError(err.errno, f"{name}: {err.strerror}") from err
                raise PassfdError(f"{name}: {err}") from err
    finally:
        for fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)
    return StdioPorts(**ports)
