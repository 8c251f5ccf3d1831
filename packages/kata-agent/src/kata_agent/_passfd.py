"""Passfd stdio (Dragonball): process stdio carried by vsock streams the VMM bridged from host fds.

The shim hands each of containerd's fifos to the VMM, which opens a guest connection to the agent's
passfd listener (kernel parameter ``agent.passfd_listener_port``, 0 = off) and tells the shim the
connection's host port. CreateContainer/ExecProcess then name those ports (stdin_port, stdout_port,
stderr_port), so the agent finds each stream by its peer port.
"""

from __future__ import annotations

import contextlib
import logging
import socket as _socket
from collections.abc import Iterator
from dataclasses import dataclass

import trio

from kata_agent._guest import kernel_param
from kata_proto import ttrpc
from kata_proto.agent import PASSFD_CMDLINE_PARAM

log = logging.getLogger("kata_agent")

#: Seconds CreateContainer/ExecProcess wait for a named stream that has not been accepted yet.
STREAM_WAIT = 5.0
#: Seconds an accepted stream waits to be taken before the next arrival closes it (its request failed).
STREAM_STALE = 120.0


def passfd_port_from_cmdline(cmdline: str) -> int:
    """The passfd listener port on a kernel command line; 0 (off) when absent or not a port."""
    value = kernel_param(cmdline, PASSFD_CMDLINE_PARAM)
    if value is None:
        return 0
    try:
        port = int(value)
    except ValueError:
        log.warning("ignoring bad %s=%r", PASSFD_CMDLINE_PARAM, value)
        return 0
    return port if 0 < port <= 0xFFFFFFFF else 0


class PassfdStreams:
    """Accepted passfd streams, keyed by peer port, until a process takes them.

    The vsock accept loop (`serve`) feeds it in the guest; tests feed it with socketpair ends (`add`).
    """

    def __init__(self, *, wait: float = STREAM_WAIT, stale: float = STREAM_STALE) -> None:
        self._streams: dict[int, trio.SocketStream] = {}
        self._added: dict[int, float] = {}
        self._arrived = trio.Event()
        self.wait = wait
        self.stale = stale

    def add(self, port: int, stream: trio.SocketStream) -> None:
        """Keep `stream` for the process that names `port` (a second stream for one port replaces it).

        Streams nobody took for `stale` seconds (the shim's request failed) are closed now."""
        now = trio.current_time()
        for old_port in [p for p, t in self._added.items() if now - t > self.stale or p == port]:
            self._added.pop(old_port, None)
            old = self._streams.pop(old_port, None)
            if old is not None:
                old.socket.close()
        self._streams[port] = stream
        self._added[port] = now
        self._arrived.set()
        self._arrived = trio.Event()

    async def take(self, port: int) -> trio.SocketStream:
        """The stream for `port`, waiting up to `wait` seconds for it; FailedPrecondition after that."""
        with trio.move_on_after(self.wait):
            while port not in self._streams:
                await self._arrived.wait()
            self._added.pop(port, None)
            return self._streams.pop(port)
        raise ttrpc.FailedPrecondition(f"no passfd stream from port {port} within {self.wait:g} s")

    async def serve(self, listener: trio.SocketListener, *, task_status: trio.TaskStatus[None]) -> None:
        """Accept streams for ever, keyed by the connecting (host) port."""
        task_status.started()
        while True:
            stream = await listener.accept()
            try:
                port = int(stream.socket.getpeername()[1])
            except OSError:
                stream.socket.close()
                continue
            self.add(port, stream)

    def close(self) -> None:
        """Close every stream no process took."""
        for stream in self._streams.values():
            stream.socket.close()
        self._streams.clear()
        self._added.clear()

    def __len__(self) -> int:
        return len(self._streams)


async def open_passfd_listener(port: int) -> trio.SocketListener:
    """A vsock listener (any CID) on `port`."""
    sock = trio.socket.socket(_socket.AF_VSOCK, _socket.SOCK_STREAM)
    try:
        await sock.bind((_socket.VMADDR_CID_ANY, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


@dataclass
class PassfdStdio:
    """The streams one process takes: stdin, stdout, stderr (None where the request named no port)."""

    stdin: trio.SocketStream | None = None
    stdout: trio.SocketStream | None = None
    stderr: trio.SocketStream | None = None

    @classmethod
    async def take(
        cls, streams: PassfdStreams, stdin_port: int, stdout_port: int, stderr_port: int, *, terminal: bool
    ) -> PassfdStdio | None:
        """Take the named streams (a terminal has no stderr); None when no port is named at all."""
        if terminal:
            stderr_port = 0
        if not (stdin_port or stdout_port or stderr_port):
            return None
        taken = cls()
        try:
            if stdin_port:
                taken.stdin = await streams.take(stdin_port)
            if stdout_port:
                taken.stdout = await streams.take(stdout_port)
            if stderr_port:
                taken.stderr = await streams.take(stderr_port)
        except BaseException:
            taken.close()
            raise
        return taken

    def close(self) -> None:
        """Close whichever streams are still open."""
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.socket.close()


@contextlib.contextmanager
def closed_on_error(stdio: PassfdStdio | None) -> Iterator[None]:
    """Close the taken streams if the request that took them fails (once a process attached them, its
    own close does it too; closing twice is harmless)."""
    try:
        yield
    except BaseException:
        if stdio is not None:
            stdio.close()
        raise
