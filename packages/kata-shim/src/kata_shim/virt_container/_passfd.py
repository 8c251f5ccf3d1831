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
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import trio

from kata_agent_client import StdioPorts

#: The longest reply line we accept from the VMM (`OK 4294967295\n` is 14 bytes).
_REPLY_MAX = 64


class PassfdError(OSError):
    """The VMM refused or dropped a passfd handshake."""


@dataclass(frozen=True)
class PassfdListener:
    """Where the hypervisor takes passfd fds: its hybrid vsock socket and the agent's guest port."""

    uds: Path
    port: int


async def passfd_connect(listener: PassfdListener, fd: int, *, keep: bool = False) -> int:
    """Hand `fd` to the VMM for a stream to the guest's passfd port; returns the stream's host port.

    The VMM gets its own copy of `fd` (the caller still owns and closes `fd`).
    """
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
    parts = line.split()
    if not line:
        raise PassfdError(
            f"passfd to {listener.uds} port {listener.port}: the VMM closed the connection without an answer"
            " (no guest listener on that port?)"
        )
    if len(parts) != 2 or parts[0] != b"OK" or not parts[1].isdigit():
        raise PassfdError(f"passfd to {listener.uds} port {listener.port}: bad reply {line[:32]!r}")
    return int(parts[1])


async def passfd_stdio(
    listener: PassfdListener, stdin: str, stdout: str, stderr: str, *, terminal: bool
) -> StdioPorts:
    """Open the process's fifos, hand each to the VMM and return the ports (a terminal has no stderr).

    Every fd the shim opened is closed before this returns, whether it succeeds or not.
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
            ports[name] = await passfd_connect(listener, fd, keep=name != "stdin")
    finally:
        for fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)
    return StdioPorts(**ports)
