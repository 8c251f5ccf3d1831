"""Test utilities (needs the ``trio`` extra): `FakeGuest`, a scripted dbs-upcall guest, the guest kernel's
server and device manager as a trio task on the far end of a memory stream (or a socket), answering each
request as a test says and misbehaving on cue. kata-upcall's, kata-vmm's and kata-shim's tests all use it."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import trio
import trio.testing

from kata_upcall import (
    DEV_MGR_MSG_SIZE,
    AddCpu,
    AddMmio,
    Connect,
    CpuReply,
    DelCpu,
    Handshake,
    MmioReply,
    MsgType,
    PciReply,
    Reply,
    Request,
    decode_request,
)

__all__ = [
    "CONNECTION_BEHAVIOURS",
    "REQUEST_BEHAVIOURS",
    "Answer",
    "FakeGuest",
    "receive_exactly",
    "reply_for",
]

#: What the guest does with one request: answer 0 ("ok") or -EINVAL ("fail") after 10 ms, answer after
#: ``slow_seconds``, close the connection ("drop"), send a garbage frame, a reply of the wrong type, two
#: replies, a short frame, or never answer ("silent").
REQUEST_BEHAVIOURS = ("ok", "fail", "slow", "drop", "garbage", "wrong", "extra", "short", "silent")
#: An `answer` callable's verdict on one request: the reply's result (0 or a negative errno), or one of
#: `REQUEST_BEHAVIOURS`.
Answer = Callable[[Request], int | str]
#: What the guest does with one connection before any request.
CONNECTION_BEHAVIOURS = (
    "serve",
    "refuse",
    "hang",
    "close",
    "bad-ok",
    "no-service",
    "unsolicited",
    "slow-service",
)


def reply_for(request: Request, result: int = 0) -> Reply:
    """The reply a guest sends to ``request`` with ``result`` (a CPU reply counts all done, or none)."""
    if isinstance(request, (AddCpu, DelCpu)):
        return CpuReply(request.MSG_TYPE, result, request.count if result == 0 else None)
    if isinstance(request, AddMmio) or request.MSG_TYPE is MsgType.DEL_MMIO:
        return MmioReply(request.MSG_TYPE, result)
    return PciReply(request.MSG_TYPE, result)


async def receive_exactly(stream: trio.abc.Stream, size: int) -> bytes | None:
    """``size`` bytes from ``stream``, or None at EOF before them."""
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


@dataclass
class FakeGuest:
    """Serves each connection the client makes; ``connection_script``/``request_script`` are consumed in
    order, then every connection serves and every request gets a successful reply. ``answer``, when given,
    decides each request instead of ``request_script``: a result to reply with, or a behaviour name.

    `connect` is the `StreamConnector` to hand the client (set ``nursery`` first: each connection's server
    runs there); `serve` serves one stream directly. ``requests`` records every request, ``connections``
    counts connections, ``max_in_flight`` the most requests received and not yet answered."""

    connection_script: list[str] = field(default_factory=list)
    request_script: list[str] = field(default_factory=list)
    answer: Answer | None = None
    handshake: Handshake = Handshake.HYBRID_VSOCK
    slow_seconds: float = 1000.0
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    max_in_flight: int = 0
    nursery: trio.Nursery | None = None
    _conn_iter: Iterator[str] = field(init=False)
    _req_iter: Iterator[str] = field(init=False)

    def __post_init__(self) -> None:
        self._conn_iter = iter(self.connection_script)
        self._req_iter = iter(self.request_script)

    async def connect(self) -> trio.abc.Stream:
        """The StreamConnector the client gets."""
        behaviour = next(self._conn_iter, "serve")
        if behaviour == "refuse":
            raise ConnectionRefusedError("nothing listens on the guest port")
        if behaviour == "hang":
            await trio.sleep(math.inf)  # a connector that never returns
        self.connections += 1
        client_end, guest_end = trio.testing.memory_stream_pair()
        assert self.nursery is not None
        self.nursery.start_soon(self.serve, guest_end, behaviour)
        return client_end

    async def serve(self, stream: trio.abc.Stream, behaviour: str = "serve") -> None:
        """Serve one connection as ``behaviour`` (one of `CONNECTION_BEHAVIOURS`) says, until it closes."""
        try:
            async with stream:
                await self._serve(stream, behaviour)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client dropped the connection: a guest sees EOF or a reset

    async def _serve(self, stream: trio.abc.Stream, behaviour: str) -> None:
        if self.handshake is Handshake.HYBRID_VSOCK:
            line = await receive_exactly(stream, len(b"CONNECT 219\n"))
            if line is None:
                return
            assert line == b"CONNECT 219\n", line
        if behaviour == "close":
            return
        if self.handshake is not Handshake.NONE:
            await stream.send_all(b"OK 1073741824\n" if behaviour != "bad-ok" else b"KO\n")
        if await receive_exactly(stream, 1) != b"d":
            return
        if behaviour == "no-service":
            await trio.sleep(math.inf)
        if behaviour == "slow-service":
            await trio.sleep(5)
        await stream.send_all(Connect().encode())
        counts = {"received": 0, "answered": 0}
        if behaviour == "unsolicited":
            await stream.send_all(MmioReply(MsgType.ADD_MMIO, 0).encode())
            counts["answered"] += 1
        send, receive = trio.open_memory_channel[Request](math.inf)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_requests, stream, send, counts, nursery.cancel_scope)
            async for request in receive:
                behaviour, result = self._verdict(request)
                await self._work(behaviour)
                sent = await self._answer(stream, request, behaviour, result)
                if sent is None:
                    break
                counts["answered"] += sent
            nursery.cancel_scope.cancel()

    async def _read_requests(
        self,
        stream: trio.abc.Stream,
        send: trio.MemorySendChannel[Request],
        counts: dict[str, int],
        scope: trio.CancelScope,
    ) -> None:
        """Read frames as they come (as the guest's socket buffers them): one arriving while an earlier one is
        unanswered (fewer reply frames sent than requests received) is two requests in flight."""
        while (frame := await receive_exactly(stream, DEV_MGR_MSG_SIZE)) is not None:
            in_flight = counts["received"] - counts["answered"] + 1
            self.max_in_flight = max(self.max_in_flight, in_flight)
            counts["received"] += 1
            request = decode_request(frame)
            self.requests.append(request)
            send.send_nowait(request)
        scope.cancel()

    def _verdict(self, request: Request) -> tuple[str, int]:
        """What to do with ``request`` and the result to reply with."""
        if self.answer is None:
            behaviour = next(self._req_iter, "ok")
            return behaviour, -22 if behaviour == "fail" else 0
        verdict = self.answer(request)
        if isinstance(verdict, str):
            return verdict, -22 if verdict == "fail" else 0
        return "ok", verdict

    async def _work(self, behaviour: str) -> None:
        if behaviour == "slow":
            await trio.sleep(self.slow_seconds)
        elif behaviour == "silent":
            await trio.sleep(math.inf)
        else:
            await trio.sleep(0.01)

    async def _answer(
        self, stream: trio.abc.Stream, request: Request, behaviour: str, result: int
    ) -> int | None:
        """Answer one request: how many reply frames went out, None when the connection is over."""
        if behaviour == "drop":
            return None
        if behaviour == "garbage":
            await stream.send_all(b"\xff" * DEV_MGR_MSG_SIZE)
            return 1
        if behaviour == "short":
            await stream.send_all(reply_for(request).encode()[:100])
            return None
        if behaviour == "wrong":
            other = AddCpu((1,)) if not isinstance(request, AddCpu) else AddMmio(0, 0x1000, 5)
            await stream.send_all(reply_for(other).encode())
            return 1
        reply = reply_for(request, result)
        await stream.send_all(reply.encode())
        if behaviour == "extra":
            await stream.send_all(reply.encode())
            return 2
        return 1
