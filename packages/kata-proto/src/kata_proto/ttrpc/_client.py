"""ttrpc client over trio: many concurrent unary calls multiplexed on one connection."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import trio
from google.protobuf import message

from kata_proto._gen.ttrpc import request_pb2
from kata_proto.ttrpc._channel import Channel
from kata_proto.ttrpc._context import MetadataArg, metadata_to_pairs
from kata_proto.ttrpc._errors import (
    ConnectionClosed,
    DeadlineExceeded,
    Internal,
    ProtocolError,
    ResourceExhausted,
    TtrpcError,
    Unavailable,
    error_for_status,
)
from kata_proto.ttrpc._frame import MAX_PAYLOAD, Frame, MessageType

log = logging.getLogger("kata_proto.ttrpc")

M = TypeVar("M", bound=message.Message)

_MAX_STREAM_ID = 0xFFFFFFFF


class _Pending:
    """One call waiting for its response frame (or for the error that replaces it)."""

    __slots__ = ("done", "error", "frame")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.frame: Frame | None = None
        self.error: TtrpcError | None = None


class TtrpcClient:
    """A ttrpc connection used by many tasks at once; get one from `open_ttrpc_client`.

    Each call takes the next odd stream id; replies are matched by id, in any order. When
    the connection drops, every pending and later call raises `ConnectionClosed` (both an
    `Unavailable` and a `trio.BrokenResourceError`); after the client is closed, calls
    raise `trio.ClosedResourceError`.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._next_stream_id = 1
        self._pending: dict[int, _Pending] = {}
        self._broken: str | None = None
        self._broken_event = trio.Event()
        self._closed = False

    @property
    def pending_calls(self) -> int:
        """Calls sent and not yet answered."""
        return len(self._pending)

    @property
    def broken(self) -> str | None:
        """Why the connection is unusable (lost, protocol error, closed), or None while it works."""
        return self._broken

    async def wait_broken(self) -> str:
        """Wait until the connection is unusable; return why (the reason every later call reports)."""
        await self._broken_event.wait()
        return self._broken or ""

    async def call(
        self,
        service: str,
        method: str,
        request: message.Message,
        response_type: type[M],
        *,
        # A timeout argument, not only the caller's cancel scope: it travels as timeout_nano.
        timeout: float | None = None,  # noqa: ASYNC109
        metadata: MetadataArg | None = None,
    ) -> M:
        """Call `service`/`method` and return its response, decoded as `response_type`.

        `timeout` (seconds) is sent as the server-side deadline and enforced here too
        (DeadlineExceeded); an enclosing trio deadline is sent as well. Raises the
        TtrpcError subclass matching the status the server answers with.
        """
        if self._closed:
            raise trio.ClosedResourceError("ttrpc client is closed")
        if self._broken is not None:
            raise ConnectionClosed(self._broken)
        now = trio.current_time()
        local_deadline = math.inf if timeout is None else now + timeout
        deadline = min(local_deadline, trio.current_effective_deadline())
        timeout_nano = 0
        if deadline != math.inf:
            timeout_nano = max(1, int((deadline - now) * 1e9))
        data = request_pb2.Request(
            service=service,
            method=method,
            payload=request.SerializeToString(),
            timeout_nano=timeout_nano,
            metadata=metadata_to_pairs(metadata),
        ).SerializeToString()
        if len(data) > MAX_PAYLOAD:
            raise ResourceExhausted(
                f"request length {len(data)} exceeds maximum message size of {MAX_PAYLOAD}"
            )
        if local_deadline <= now:
            raise DeadlineExceeded(f"{service}/{method}: timeout {timeout} s already expired")
        sid = self._next_stream_id
        if sid > _MAX_STREAM_ID:
            self._break("stream ids exhausted on this connection")
            raise ConnectionClosed(self._broken or "")
        self._next_stream_id += 2
        # Queued synchronously: ids reach the wire in the order they are taken.
        try:
            self._channel.send_nowait(sid, MessageType.REQUEST, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            self._break(f"cannot write to the server: {err}")
            raise ConnectionClosed(self._broken or "") from err
        pending = self._pending[sid] = _Pending()
        try:
            with trio.move_on_at(local_deadline):
                await pending.done.wait()
        finally:
            self._pending.pop(sid, None)
        if not pending.done.is_set():
            raise DeadlineExceeded(f"{service}/{method}: no response within {timeout} s")
        if pending.error is not None:
            raise pending.error
        assert pending.frame is not None
        try:
            response = request_pb2.Response.FromString(pending.frame.payload)
        except message.DecodeError as err:
            raise ProtocolError(f"{service}/{method}: undecodable response envelope: {err}") from err
        if response.HasField("status") and response.status.code != 0:
            raise error_for_status(response.status)
        try:
            return response_type.FromString(response.payload)
        except message.DecodeError as err:
            raise Internal(
                f"{service}/{method}: response payload is not a {response_type.DESCRIPTOR.full_name}: {err}"
            ) from err

    def _break(self, reason: str) -> None:
        """Mark the connection dead and fail every pending call with ConnectionClosed."""
        if self._broken is None:
            self._broken = reason
        self._broken_event.set()
        for sid, pending in list(self._pending.items()):
            pending.error = ConnectionClosed(f"{reason} (stream {sid} pending)")
            pending.done.set()
        self._pending.clear()

    def _deliver(self, frame: Frame) -> None:
        pending = self._pending.get(frame.stream_id)
        if pending is None:
            log.debug("ttrpc: frame for inactive stream %d dropped", frame.stream_id)
            return
        if frame.oversize:
            pending.error = ResourceExhausted(
                f"response length {frame.length} exceeds maximum message size of {MAX_PAYLOAD}"
            )
        elif frame.type == MessageType.RESPONSE:
            pending.frame = frame
        elif frame.type == MessageType.DATA:
            pending.error = ProtocolError(f"stream data received for unary stream {frame.stream_id}")
        else:
            log.debug("ttrpc: frame type %d on stream %d ignored", frame.type, frame.stream_id)
            return
        del self._pending[frame.stream_id]
        pending.done.set()

    async def _run_reader(self) -> None:
        reason = "connection closed by the server"
        try:
            while (frame := await self._channel.receive_frame()) is not None:
                self._deliver(frame)
        except ProtocolError as err:
            reason = f"protocol error from the server: {err.message}"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            reason = f"connection lost: {err}"
        self._break(reason)

    async def _run_writer(self) -> None:
        try:
            await self._channel.run_writer()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            self._break(f"cannot write to the server: {err}")

    def _close(self) -> None:
        self._closed = True
        self._break("ttrpc client closed")


@asynccontextmanager
async def open_ttrpc_client(target: str | os.PathLike[str] | trio.abc.Stream) -> AsyncIterator[TtrpcClient]:
    """Connect to a ttrpc server: a unix socket path, or an already open trio stream.

    The stream (for instance a hybrid-vsock connection after its handshake) belongs to the
    client from then on and is closed when the block exits. A socket that cannot be
    connected to raises `Unavailable` (the OSError is its cause).
    """
    if isinstance(target, trio.abc.Stream):
        stream: trio.abc.Stream = target
    else:
        path = os.fspath(target)
        try:
            stream = await trio.open_unix_socket(path)
        except OSError as err:
            raise Unavailable(f"cannot connect to ttrpc server at {path}: {err}") from err
    channel = Channel(stream)
    client = TtrpcClient(channel)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._run_reader)
            nursery.start_soon(client._run_writer)
            try:
                yield client
            finally:
                client._close()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)
