"""The trio driver of `UpcallClientCore`: one background task keeps a connection, callers send requests.

``connect`` is any async callable returning a `trio.abc.Stream` (kata-vmm wraps kata-virtio's in-process
vsock connector; tests pass one end of a `trio.testing.memory_stream_pair` or a socketpair). The task
connects, hands the bytes to the core and reconnects after every failure (the factory raising, EOF, a
transport error, garbage from the guest, a handshake past its budget) with a backoff from ``retry_delay``
doubling to ``max_retry_delay`` (back to ``retry_delay`` only after a connection that answered a request,
so a guest that churns connections gets one attempt a second). Upstream retries every 10 ms and gives up
after 500 tries; here the retries never stop (one a second at worst) and every request has its own budget.

The protocol has no request ids: a reply is paired with the one request in flight by order and type only.
A guest that sends an extra frame can therefore have it taken for the next request's answer when it
arrives after that request went out; the guest only misleads the host about its own devices (it can lie
in any reply anyway), and the real answer then arrives with nothing in flight and resets the connection.

One request in flight: the core refuses a second one (`UpcallBusy`, as upstream); this driver queues
callers on a FIFO lock instead, so concurrent hot-plug callers (a container's volumes, Task.Update) need no
retry loops of their own and the wire still carries one request at a time. The queue wait counts against
the request's budget (``request_timeout``). A request that leaves without its reply (timeout,
cancellation, a send that failed) resets the connection: a late answer would otherwise be taken for the
next request's.
"""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from kata_upcall._client import Handshake, ReplyReceived, ServiceConnected, UpcallClientCore, UpcallState
from kata_upcall._codec import UPCALL_PORT, Reply, Request
from kata_upcall._errors import (
    UpcallConnectionLost,
    UpcallError,
    UpcallNotConnected,
    UpcallRequestFailed,
    UpcallTimeout,
)

StreamConnector = Callable[[], Awaitable[trio.abc.Stream]]

#: A request's budget (queue wait + connection wait + the guest's answer). Onlining a vCPU in a guest under
#: TCG takes seconds; a guest that never answers must not hold a hot-plug forever.
DEFAULT_REQUEST_TIMEOUT = 60.0
#: From a fresh stream to the service's Connect frame.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
_RECEIVE_SIZE = 4096


def socket_connector(open_socket: Callable[[], socket.socket]) -> StreamConnector:
    """A `StreamConnector` from a plain function returning a connected stdlib socket, e.g. kata-virtio's
    ``lambda: vsock.connect_local(UPCALL_PORT)`` (with `Handshake.ACCEPT_LINE`); the socket is made
    non-blocking and owned by the returned stream."""

    async def connect() -> trio.abc.Stream:
        return trio.SocketStream(trio.socket.from_stdlib_socket(open_socket()))

    return connect


@dataclass(frozen=True)
class UpcallStatistics:
    """What `UpcallClient.statistics` reports."""

    state: UpcallState
    connect_attempts: int
    services_connected: int
    requests_sent: int
    requests_waiting: int
    last_error: str | None


class _Pending:
    def __init__(self, request: Request) -> None:
        self.request = request
        self.done = trio.Event()
        self.reply: Reply | None = None
        self.error: UpcallError | None = None

    def finish(self, reply: Reply | None = None, error: UpcallError | None = None) -> None:
        if not self.done.is_set():
            self.reply, self.error = reply, error
            self.done.set()


class UpcallClient:
    """A dbs-upcall device-manager client over any byte stream; make one with `open_upcall_client`."""

    def __init__(
        self,
        connect: StreamConnector,
        *,
        handshake: Handshake = Handshake.HYBRID_VSOCK,
        port: int = UPCALL_PORT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        retry_delay: float = 0.01,
        max_retry_delay: float = 1.0,
    ) -> None:
        self._connect = connect
        self._core = UpcallClientCore(handshake, port)
        self._handshake_timeout = handshake_timeout
        self._request_timeout = request_timeout
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._lock = trio.StrictFIFOLock()
        self._connected = trio.Event()
        self._stream: trio.abc.Stream | None = None
        self._conn_scope: trio.CancelScope | None = None
        self._pending: _Pending | None = None
        self._closed = False
        self._attempts = 0
        self._services = 0
        self._sent = 0
        self._replies = 0
        self._waiting = 0
        self._last_error: str | None = None

    @property
    def state(self) -> UpcallState:
        """The connection's `UpcallState`."""
        return self._core.state

    def is_ready(self) -> bool:
        """True when a request would be sent at once (connected, nothing in flight or queued)."""
        return self._core.state is UpcallState.SERVICE_CONNECTED and not self._lock.locked()

    def statistics(self) -> UpcallStatistics:
        """Counters and the last connection error, for logs and tests."""
        return UpcallStatistics(
            state=self._core.state,
            connect_attempts=self._attempts,
            services_connected=self._services,
            requests_sent=self._sent,
            requests_waiting=self._waiting,
            last_error=self._last_error,
        )

    async def wait_connected(self) -> None:
        """Return once the service is connected (callers own the timeout)."""
        while self._core.state not in (UpcallState.SERVICE_CONNECTED, UpcallState.SERVICE_BUSY):
            if self._closed:
                raise trio.ClosedResourceError("upcall client closed")
            await self._connected.wait()

    async def _wait_ready(self) -> None:
        # With the lock held, BUSY can only be an abandoned request's connection still being reset.
        while self._core.state is not UpcallState.SERVICE_CONNECTED:
            if self._closed:
                raise trio.ClosedResourceError("upcall client closed")
            await self._connected.wait()

    async def request(self, request: Request) -> Reply:
        """Send ``request`` once the service is connected and no other request is in flight; return its reply.

        Raises `UpcallRequestFailed` when the guest answered with a non-zero result, `UpcallConnectionLost`
        when the connection ended first (the guest may have acted), `UpcallTimeout` after the client's
        ``request_timeout`` (queue and connection waits included; the connection is then reset). A caller
        may cancel sooner with its own scope (the connection is reset too)."""
        timeout = self._request_timeout
        phase = "waiting for the requests before it"
        queued = True
        self._waiting += 1
        try:
            with trio.move_on_after(timeout):
                async with self._lock:
                    queued = False
                    self._waiting -= 1
                    phase = "waiting for the upcall service to connect"
                    await self._wait_ready()
                    phase = "waiting for the guest's answer"
                    reply = await self._exchange(request)
                if reply.result != 0:
                    raise UpcallRequestFailed(request, reply)
                return reply
        finally:
            if queued:
                self._waiting -= 1
        raise UpcallTimeout(f"upcall {request!r}: no answer within {timeout} s ({phase})")

    async def _exchange(self, request: Request) -> Reply:
        stream = self._stream
        if stream is None or self._core.state is not UpcallState.SERVICE_CONNECTED:
            raise UpcallNotConnected(f"upcall service not connected ({self._core.state.value})")
        frame = self._core.send_request(request)
        pending = self._pending = _Pending(request)
        try:
            await stream.send_all(frame)
            self._sent += 1
            await pending.done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
            self._reset(f"sending {request!r} failed: {err!r}")
            raise UpcallConnectionLost(f"upcall {request!r}: connection lost while sending") from err
        finally:
            if not pending.done.is_set():
                # Leaving without the reply (cancelled, timed out): the answer must not meet the next request.
                self._reset(f"{request!r} abandoned before its reply")
            if self._pending is pending:
                self._pending = None
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    def _reset(self, reason: str) -> None:
        self._last_error = reason
        if self._conn_scope is not None:
            self._conn_scope.cancel()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        delay = self._retry_delay
        while True:
            self._attempts += 1
            served = await self._one_connection()
            # Only a connection that answered a request earns a quick reconnect: a guest that accepts and then
            # drops or babbles, over and over, gets the growing delay (at most one attempt a second).
            delay = self._retry_delay if served else min(delay * 2, self._max_retry_delay)
            await trio.sleep(delay)

    async def _one_connection(self) -> bool:
        """Connect, serve until the connection ends; True if the guest answered a request on it."""
        replies_before = self._replies
        stream = None
        try:
            with trio.move_on_after(self._handshake_timeout):
                stream = await self._connect()
        except Exception as err:  # any connector failure means: not yet, try again
            self._last_error = f"connect failed: {err!r}"
            return False
        if stream is None:
            self._last_error = f"connect took more than {self._handshake_timeout} s"
            return False
        error: UpcallError = UpcallConnectionLost("upcall connection reset")
        with trio.CancelScope() as scope:
            self._conn_scope = scope
            try:
                self._stream = stream
                await self._serve(stream)
                error = UpcallConnectionLost("upcall connection closed by the guest")
            except UpcallError as err:
                error = UpcallConnectionLost(f"upcall connection dropped: {err}")
                error.__cause__ = err
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                error = UpcallConnectionLost(f"upcall connection failed: {err!r}")
                error.__cause__ = err
            finally:
                self._conn_scope = None
                self._stream = None
                if self._connected.is_set():
                    self._connected = trio.Event()
                self._core.connection_lost()
                if self._pending is not None:
                    self._pending.finish(error=error)
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
        if not scope.cancelled_caught:
            self._last_error = str(error)
        return self._replies > replies_before

    async def _serve(self, stream: trio.abc.Stream) -> None:
        out = self._core.connect()
        with trio.CancelScope(deadline=trio.current_time() + self._handshake_timeout) as handshake:
            if out:
                await stream.send_all(out)
            while True:
                data = await stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    return
                out, events = self._core.receive_data(data)
                if out:
                    await stream.send_all(out)
                for event in events:
                    if isinstance(event, ServiceConnected):
                        handshake.deadline = math.inf
                        self._services += 1
                        self._connected.set()
                    elif isinstance(event, ReplyReceived):
                        self._replies += 1
                        if self._pending is not None:
                            self._pending.finish(reply=event.reply)
        if handshake.cancelled_caught:
            raise UpcallTimeout(f"upcall handshake took more than {self._handshake_timeout} s")

    async def aclose(self) -> None:
        """Mark closed; `open_upcall_client` cancels the connection task."""
        self._closed = True
        self._connected.set()


@asynccontextmanager
async def open_upcall_client(
    connect: StreamConnector,
    *,
    handshake: Handshake = Handshake.HYBRID_VSOCK,
    port: int = UPCALL_PORT,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    retry_delay: float = 0.01,
    max_retry_delay: float = 1.0,
) -> AsyncIterator[UpcallClient]:
    """An `UpcallClient` whose connection task runs (and reconnects) for the block's life.

    ``connect`` returns a fresh stream per attempt; ``handshake`` says what that stream needs first
    (`Handshake.HYBRID_VSOCK` for a hybrid vsock UDS, `Handshake.ACCEPT_LINE` for kata-virtio's
    ``connect_local``, `Handshake.NONE` for AF_VSOCK)."""
    client = UpcallClient(
        connect,
        handshake=handshake,
        port=port,
        handshake_timeout=handshake_timeout,
        request_timeout=request_timeout,
        retry_delay=retry_delay,
        max_retry_delay=max_retry_delay,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(client._run)
        try:
            yield client
        finally:
            await client.aclose()
            nursery.cancel_scope.cancel()
