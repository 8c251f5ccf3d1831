"""The dbs-upcall client as a sans-I/O state machine: bytes in, bytes and events out, no clock, no sockets.

One connection's life (upstream's ``UpcallClientState``)::

    WAITING_SERVER --OK line--> WAITING_SERVICE --Connect frame--> SERVICE_CONNECTED <--reply-- SERVICE_BUSY
          ^                     (sent the service byte)                    |  send_request  ^
          |                                                               +----------------+
          +---- connection_lost(): EOF, transport error, garbage, timeout (any state) ----+

- `connect` starts a connection on a fresh stream: it returns the bytes to send (``CONNECT 219\\n`` on a
  hybrid vsock UDS; nothing for kata-virtio's in-process connector, which only answers ``OK``; the service
  byte straight away on a plain AF_VSOCK stream).
- `receive_data` takes whatever the stream delivered and returns ``(bytes to send, events)``; bytes that are
  not what the state allows raise `UpcallProtocolError` and leave the core BROKEN: the driver must drop the
  stream and call `connection_lost`, which fails the pending request.
- At most one request is in flight: `send_request` refuses with `UpcallBusy` while one is (as upstream), and
  with `UpcallNotConnected` before the service said Connect. A reply must answer the request in flight (same
  type); a frame with nothing in flight is garbage. `receive_data` is all or nothing: when a read holds a
  reply and then garbage, the reply is not delivered and the request stays pending (to be failed).

Standard library only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kata_upcall._codec import (
    DEV_MGR_MSG_SIZE,
    DEV_MGR_SERVICE_BYTE,
    MAX_ACCEPT_LINE,
    UPCALL_PORT,
    Reply,
    Request,
    decode_accept_line,
    decode_connect,
    decode_reply,
    encode_hybrid_connect,
)
from kata_upcall._errors import UpcallBusy, UpcallNotConnected, UpcallProtocolError


class UpcallState(enum.Enum):
    """Where the client's connection is (upstream's names)."""

    #: No connection yet, or connecting: waiting for the vsock server to accept (the ``OK`` line).
    WAITING_SERVER = "WaitingServer"
    #: The service byte went out; waiting for the service's Connect frame.
    WAITING_SERVICE = "WaitingService"
    #: Ready: a request may be sent.
    SERVICE_CONNECTED = "ServiceConnected"
    #: A request is in flight; nothing else may be sent until its reply.
    SERVICE_BUSY = "ServiceBusy"
    #: The peer sent garbage: the stream must be dropped (`connection_lost`).
    BROKEN = "Broken"


class Handshake(enum.Enum):
    """What a fresh stream from the connector needs before the service byte."""

    #: A hybrid vsock UDS (Firecracker's protocol, as upstream dbs-upcall uses): send ``CONNECT 219\\n``,
    #: read ``OK <port>\\n``.
    HYBRID_VSOCK = "hybrid"
    #: Already connected to the port, the acceptance still to read: kata-virtio's
    #: ``VirtioVsock.connect_local(219)`` (built-in mode, no UDS round trip).
    ACCEPT_LINE = "accept"
    #: A plain AF_VSOCK stream to the guest port: nothing before the service byte.
    NONE = "none"


@dataclass(frozen=True)
class ServiceConnected:
    """Event: the device-manager service said Connect; requests may be sent."""


@dataclass(frozen=True)
class ReplyReceived:
    """Event: the reply to the request in flight arrived."""

    request: Request
    reply: Reply


Event = ServiceConnected | ReplyReceived


class UpcallClientCore:
    """The client's protocol state for one connection at a time (sans-I/O; see the module docstring)."""

    def __init__(self, handshake: Handshake = Handshake.HYBRID_VSOCK, port: int = UPCALL_PORT) -> None:
        self.handshake = handshake
        self.port = port
        self._state = UpcallState.WAITING_SERVER
        self._connecting = False
        self._buffer = bytearray()
        self._pending: Request | None = None

    @property
    def state(self) -> UpcallState:
        """The current `UpcallState`."""
        return self._state

    @property
    def pending(self) -> Request | None:
        """The request in flight, if any."""
        return self._pending

    def connect(self) -> bytes:
        """Start a connection on a fresh stream; returns the bytes to send first (maybe none)."""
        if self._connecting:
            raise UpcallProtocolError("connect() on a live connection: call connection_lost() first")
        self._connecting = True
        self._buffer.clear()
        self._state = UpcallState.WAITING_SERVER
        if self.handshake is Handshake.HYBRID_VSOCK:
            return encode_hybrid_connect(self.port)
        if self.handshake is Handshake.ACCEPT_LINE:
            return b""
        self._state = UpcallState.WAITING_SERVICE
        return DEV_MGR_SERVICE_BYTE

    def send_request(self, request: Request) -> bytes:
        """The frame to send for ``request``, which becomes the one in flight.

        Raises `UpcallBusy` while another request is in flight and `UpcallNotConnected` before the service
        connected (both as upstream: the caller decides whether to wait)."""
        if self._state is UpcallState.SERVICE_BUSY:
            raise UpcallBusy(f"upcall request {self._pending!r} is still in flight")
        if self._state is not UpcallState.SERVICE_CONNECTED:
            raise UpcallNotConnected(f"upcall service not connected ({self._state.value})")
        frame = request.encode()
        self._pending = request
        self._state = UpcallState.SERVICE_BUSY
        return frame

    def receive_data(self, data: bytes | bytearray) -> tuple[bytes, list[Event]]:
        """Feed bytes from the stream; returns ``(bytes to send, events)``.

        Raises `UpcallProtocolError` for anything the state does not allow; the core is then BROKEN until
        `connection_lost`."""
        if self._state is UpcallState.BROKEN:
            raise UpcallProtocolError("upcall connection already broken")
        if not self._connecting:
            raise UpcallProtocolError("upcall data with no connection started")
        self._buffer += data
        pending = self._pending
        try:
            return self._process()
        except UpcallProtocolError:
            # All or nothing: a reply followed by garbage in one read is garbage, and its request still fails.
            self._state = UpcallState.BROKEN
            self._pending = pending
            self._buffer.clear()
            raise

    def connection_lost(self) -> Request | None:
        """The stream is gone (EOF, error, garbage, abandoned): back to WAITING_SERVER; returns the request
        that was in flight (its caller must be failed), if any."""
        pending, self._pending = self._pending, None
        self._state = UpcallState.WAITING_SERVER
        self._connecting = False
        self._buffer.clear()
        return pending

    def _process(self) -> tuple[bytes, list[Event]]:
        out = b""
        events: list[Event] = []
        while True:
            state = self._state
            if state is UpcallState.WAITING_SERVER:
                end = self._buffer.find(b"\n")
                if end < 0:
                    if len(self._buffer) >= MAX_ACCEPT_LINE:
                        raise UpcallProtocolError(
                            f"hybrid vsock answer of {len(self._buffer)}+ bytes, no newline"
                        )
                    break
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                decode_accept_line(line)
                if self._buffer:
                    # The service only talks after the service byte, which has not gone out yet.
                    raise UpcallProtocolError(
                        f"upcall server sent {len(self._buffer)} bytes before the service byte"
                    )
                self._state = UpcallState.WAITING_SERVICE
                out += DEV_MGR_SERVICE_BYTE
            elif state is UpcallState.WAITING_SERVICE:
                if len(self._buffer) < DEV_MGR_MSG_SIZE:
                    break
                decode_connect(self._take_frame())
                self._state = UpcallState.SERVICE_CONNECTED
                events.append(ServiceConnected())
            elif state is UpcallState.SERVICE_BUSY:
                if len(self._buffer) < DEV_MGR_MSG_SIZE:
                    break
                reply = decode_reply(self._take_frame())
                request = self._pending
                assert request is not None  # BUSY always has one
                if reply.msg_type != request.MSG_TYPE:
                    raise UpcallProtocolError(f"upcall answered {reply!r} to {request!r}")
                self._pending = None
                self._state = UpcallState.SERVICE_CONNECTED
                events.append(ReplyReceived(request, reply))
            else:  # SERVICE_CONNECTED: nothing is due
                if self._buffer:
                    raise UpcallProtocolError(
                        f"upcall service sent {len(self._buffer)} bytes with no request in flight"
                    )
                break
        return out, events

    def _take_frame(self) -> bytes:
        frame = bytes(self._buffer[:DEV_MGR_MSG_SIZE])
        del self._buffer[:DEV_MGR_MSG_SIZE]
        return frame
