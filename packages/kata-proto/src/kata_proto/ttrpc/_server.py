"""ttrpc server over trio: unary calls, concurrent per connection, on a unix socket or any stream."""

from __future__ import annotations

import inspect
import logging
import math
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from google.protobuf import descriptor, message

from kata_proto._gen.google.rpc import status_pb2
from kata_proto._gen.ttrpc import request_pb2
from kata_proto.ttrpc._channel import Channel
from kata_proto.ttrpc._context import CallContext, metadata_from_pairs
from kata_proto.ttrpc._errors import (
    AlreadyExists,
    Code,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    TtrpcError,
    Unimplemented,
    Unknown,
)
from kata_proto.ttrpc._frame import (
    FLAG_REMOTE_CLOSED,
    FLAG_REMOTE_OPEN,
    MAX_PAYLOAD,
    Frame,
    MessageType,
)
from kata_proto.ttrpc._service import RpcMethod, service_methods

log = logging.getLogger("kata_proto.ttrpc")

Handler = Callable[[Any, CallContext], Awaitable[message.Message]]


@dataclass(frozen=True, slots=True)
class _Registered:
    rpc: RpcMethod
    handler: Handler | None


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """A snapshot of `TtrpcServer.statistics()`."""

    connections: int
    calls_in_flight: int
    calls_served: int


@dataclass
class _Counters:
    connections: int = 0
    calls_in_flight: int = 0
    calls_served: int = 0
    services: dict[str, dict[str, _Registered]] = field(default_factory=dict)


def _status_for_exception(exc: Exception, rpc: RpcMethod) -> status_pb2.Status:
    """The status a handler's exception becomes; the connection always survives it."""
    # A handler's own nursery wraps what it raises in a group (trio's strict groups): a
    # group of exactly one error answers as that error.
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, TtrpcError):
        return exc.to_status()
    if isinstance(exc, (trio.TooSlowError, TimeoutError)):
        return DeadlineExceeded(f"{rpc.name}: {exc or 'timed out'}").to_status()
    # The same few OS errors upstream's convertCode maps, so a handler may let them through.
    mapped: type[TtrpcError] | None = None
    if isinstance(exc, FileNotFoundError):
        mapped = NotFound
    elif isinstance(exc, FileExistsError):
        mapped = AlreadyExists
    elif isinstance(exc, PermissionError):
        mapped = PermissionDenied
    if mapped is not None:
        return mapped(str(exc)).to_status()
    log.error("ttrpc: %s/%s failed", rpc.service, rpc.name, exc_info=exc)
    return Unknown(f"{rpc.name}: {type(exc).__name__}: {exc}").to_status()


class TtrpcServer:
    """Serves registered services to ttrpc clients.

    Register each service with `register(descriptor, implementation)`: the implementation has
    one `async def Name(self, request, ctx)` per rpc, taking the request message and a
    `CallContext` and returning the response message. Rpcs it does not define answer
    Unimplemented. Then `serve_unix(path)` or `serve_stream(stream)`.
    """

    def __init__(self) -> None:
        self._state = _Counters()

    def register(self, service: descriptor.ServiceDescriptor, implementation: object) -> None:
        """Serve `service` (a protobuf ServiceDescriptor) with the methods of `implementation`."""
        if service.full_name in self._state.services:
            raise ValueError(f"service {service.full_name} is registered already")
        table: dict[str, _Registered] = {}
        for name, rpc in service_methods(service).items():
            handler = getattr(implementation, name, None)
            if handler is not None and not inspect.iscoroutinefunction(handler):
                raise TypeError(f"{type(implementation).__name__}.{name} must be an async method")
            table[name] = _Registered(rpc, handler)
        self._state.services[service.full_name] = table

    def statistics(self) -> ServerStatistics:
        """Open connections, calls running now and calls answered since the server was made."""
        s = self._state
        return ServerStatistics(s.connections, s.calls_in_flight, s.calls_served)

    async def serve_unix(
        self,
        path: str | os.PathLike[str],
        *,
        backlog: int = 128,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on a unix socket at `path` and serve every connection until cancelled.

        A stale socket file at `path` is replaced; the file is removed when serving stops.
        `task_status.started` reports the path once the socket accepts connections.
        """
        path = os.fspath(path)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            sock.listen(backlog)
            inode = os.stat(path).st_ino
        except BaseException:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(trio.serve_listeners, self.serve_stream, [listener]))
                task_status.started(path)
        finally:
            try:
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            except FileNotFoundError:
                pass

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until the peer closes it or it breaks; closes `stream` at the end.

        Never raises for anything the peer does; cancelling it ends the connection.
        """
        conn = _ServerConnection(self._state, Channel(stream))
        self._state.connections += 1
        try:
            await conn.run()
        except Exception:
            log.exception("ttrpc: connection failed")
        finally:
            self._state.connections -= 1
            await trio.aclose_forcefully(stream)


class _ServerConnection:
    def __init__(self, state: _Counters, channel: Channel) -> None:
        self._state = state
        self._channel = channel
        self._last_stream_id = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, nursery.cancel_scope)
            await self._read(nursery)
            # The client is gone (or broke the protocol): calls still running have nobody to
            # answer to, so they are cancelled, as upstream cancels their contexts.
            nursery.cancel_scope.cancel()

    async def _write(self, scope: trio.CancelScope) -> None:
        try:
            await self._channel.run_writer()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            log.debug("ttrpc: cannot write to client: %s", err)
        scope.cancel()

    async def _read(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                frame = await self._channel.receive_frame()
            except ProtocolError as err:
                log.warning("ttrpc: closing connection: %s", err)
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
                log.debug("ttrpc: connection lost: %s", err)
                return
            if frame is None:
                return
            self._dispatch(frame, nursery)

    def _reply(self, stream_id: int, status: status_pb2.Status, payload: bytes = b"") -> None:
        data = request_pb2.Response(status=status, payload=payload).SerializeToString()
        if len(data) > MAX_PAYLOAD:
            # The envelope pushed a payload just under the limit over it.
            status = ResourceExhausted(
                f"message length {len(data)} exceeds maximum message size of {MAX_PAYLOAD}"
            ).to_status()
            data = request_pb2.Response(status=status).SerializeToString()
        try:
            self._channel.send_nowait(stream_id, MessageType.RESPONSE, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("ttrpc: reply to stream %d dropped, connection is closing", stream_id)

    def _reject(self, stream_id: int, error: TtrpcError) -> None:
        log.debug("ttrpc: stream %d rejected: %s", stream_id, error)
        self._reply(stream_id, error.to_status())

    def _dispatch(self, frame: Frame, nursery: trio.Nursery) -> None:
        sid = frame.stream_id
        if frame.oversize:
            msg = f"message length {frame.length} exceeds maximum message size of {MAX_PAYLOAD}"
            self._reject(sid, ResourceExhausted(msg))
            return
        if sid % 2 != 1:
            self._reject(sid, InvalidArgument("StreamID must be odd for client initiated streams"))
            return
        if frame.type == MessageType.DATA:
            # Only streaming rpcs carry data and none is ever accepted here; late data for a
            # rejected stream is dropped rather than answered twice.
            log.debug("ttrpc: data on stream %d ignored", sid)
            return
        if frame.type != MessageType.REQUEST:
            log.debug("ttrpc: frame type %d on stream %d ignored", frame.type, sid)
            return
        if sid <= self._last_stream_id:
            self._reject(sid, InvalidArgument("StreamID cannot be re-used and must increment"))
            return
        self._last_stream_id = sid
        try:
            req = request_pb2.Request.FromString(frame.payload)
        except message.DecodeError as err:
            self._reject(sid, InvalidArgument(f"unmarshal request error: {err}"))
            return
        methods = self._state.services.get(req.service)
        if methods is None:
            self._reject(sid, Unimplemented(f"service {req.service}"))
            return
        entry = methods.get(req.method)
        if entry is None:
            self._reject(sid, Unimplemented(f"method {req.method}"))
            return
        if entry.rpc.streaming or frame.flags & (FLAG_REMOTE_OPEN | FLAG_REMOTE_CLOSED):
            self._reject(sid, Unimplemented(f"{req.method}: streaming rpcs are not supported by this server"))
            return
        if entry.handler is None:
            self._reject(sid, Unimplemented(f"method {req.method} is not implemented"))
            return
        if req.timeout_nano > 0:
            deadline = trio.current_time() + req.timeout_nano / 1e9
        elif req.timeout_nano < 0:
            deadline = -math.inf  # already expired, as a negative Go timeout is
        else:
            deadline = math.inf
        ctx = CallContext(
            service=req.service,
            method=req.method,
            stream_id=sid,
            metadata=metadata_from_pairs(req.metadata),
            deadline=deadline,
        )
        self._state.calls_in_flight += 1
        nursery.start_soon(self._call, entry.rpc, entry.handler, req.payload, ctx)

    async def _call(self, rpc: RpcMethod, handler: Handler, payload: bytes, ctx: CallContext) -> None:
        started = trio.current_time()
        try:
            status, data = await self._run_handler(rpc, handler, payload, ctx)
            self._reply(ctx.stream_id, status, data)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "ttrpc: %s/%s answered %s in %.3f s",
                    rpc.service,
                    rpc.name,
                    Code(status.code).name,
                    trio.current_time() - started,
                )
        finally:
            self._state.calls_in_flight -= 1
            self._state.calls_served += 1

    async def _run_handler(
        self, rpc: RpcMethod, handler: Handler, payload: bytes, ctx: CallContext
    ) -> tuple[status_pb2.Status, bytes]:
        try:
            try:
                request = rpc.request_type.FromString(payload)
            except message.DecodeError as err:
                raise Internal(f"ttrpc: error unmarshalling payload: {err}") from err
            with trio.move_on_at(ctx.deadline) as scope:
                response = await handler(request, ctx)
            if scope.cancelled_caught:
                raise DeadlineExceeded(f"{rpc.name}: deadline exceeded")
            if not isinstance(response, rpc.response_type):
                raise Internal(
                    f"{rpc.name} returned {type(response).__name__}, expected {rpc.response_type.__name__}"
                )
            data = response.SerializeToString()
            if len(data) > MAX_PAYLOAD:
                raise ResourceExhausted(
                    f"message length {len(data)} exceeds maximum message size of {MAX_PAYLOAD}"
                )
        except Exception as exc:
            return _status_for_exception(exc, rpc), b""
        return status_pb2.Status(code=Code.OK), data
