"""One hybrid-vsock connection: its host stream, its state and its credit (virtio 1.2 §5.10.6.3).

The state machine (`ConnState`), as the muxer drives it::

    HANDSHAKE --CONNECT line--> CONNECTING --RESPONSE--> ESTABLISHED --host EOF--> CLOSING --RST--> gone
        \\--passfd line--> PASSFD --port + fd--/                  \\--guest RST / full SHUTDOWN--> gone

A guest-initiated connection starts ESTABLISHED; any state ends on RST or a timeout.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from dataclasses import dataclass, field


def passfd_refusal(fd: int) -> str | None:
    """Why ``fd`` cannot be a passfd stream, or None for a pipe, FIFO or socket open for I/O.

    An O_PATH fd cannot be read, written or made non-blocking; a regular file, directory or device
    cannot be polled (epoll refuses it) and would let the guest read or write host data.
    """
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        mode = os.fstat(fd).st_mode
    except OSError as err:
        return f"unusable fd ({errno.errorcode.get(err.errno or 0, '?')})"
    if flags & os.O_PATH:
        return "O_PATH fd"
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return "not a pipe, fifo or socket"
    return None


class FdStream:
    """A host stream that is a bare fd passed by ``passfd`` (pipe, FIFO or socket): socket-like calls."""

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)  # may raise: the caller still owns fd then
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def send(self, data: bytes | bytearray) -> int:
        return os.write(self._fd, data)

    def recv(self, size: int) -> bytes:
        return os.read(self._fd, size)

    def shutdown(self, how: int) -> None:
        """Half-close has no meaning for a pipe; the fd stays open until the connection ends."""

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class ConnState:
    """The states of a `Connection` (plain strings: they show up readable in logs and test failures)."""

    HANDSHAKE = "handshake"  # host client: waiting for the CONNECT line
    PASSFD = "passfd"  # host client sent `passfd`: waiting for `<port>[ keep]` with one fd
    CONNECTING = "connecting"  # REQUEST sent to the guest, waiting for RESPONSE
    ESTABLISHED = "established"
    CLOSING = "closing"  # we sent SHUTDOWN(both), waiting for the guest's RST


@dataclass(eq=False)
class Connection:
    """A guest stream and its host side: a client socket, a socket to ``<uds_path>_<port>`` or a passed fd."""

    sock: socket.socket | FdStream
    state: str
    local_port: int = 0  # host-side port: src_port of our packets
    peer_port: int = 0  # guest port
    # host -> guest
    tx_cnt: int = 0
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    readable: bool = False  # the socket polled readable; read when an rx buffer is free
    credit_requested: bool = False
    # guest -> host
    rx_cnt: int = 0
    fwd_cnt: int = 0
    last_fwd_sent: int = 0
    pending: bytearray = field(default_factory=bytearray)
    guest_shut_send: bool = False  # guest will send no more: shut our socket's write side once flushed
    guest_shut_rcv: bool = False  # guest reads no more: stop reading the socket
    host_eof: bool = False
    closing_since: float = 0.0
    connecting_since: float = 0.0  # when the REQUEST was queued for the guest
    request_sent: float = 0.0  # when the guest got our REQUEST (0: not yet delivered)
    # passfd: the unix socket that gets `OK <port>` (then closes), and whether a closed reader
    # of the fd keeps the connection (its bytes are dropped) instead of ending it.
    control: socket.socket | None = None
    keep: bool = False
    line: bytearray = field(default_factory=bytearray)  # the CONNECT/passfd line read so far
    write_only: bool = False  # a passed fd not open for reading (a stdout pipe): never poll it for input

    @property
    def passed_fd(self) -> bool:
        """The host side is an fd handed over by passfd, not a client socket."""
        return isinstance(self.sock, FdStream)

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    def peer_credit(self) -> int:
        return (self.peer_buf_alloc - ((self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF)) & 0xFFFFFFFF
