"""TtrpcServer and TtrpcClient together, and each against a raw peer speaking frames by hand."""

from __future__ import annotations

import math
import os
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from ttrpc_echo import SERVICE, SERVICE_NAME, EchoRequest, EchoResponse, EchoService

from kata_proto import ttrpc
from kata_proto._gen.google.rpc import status_pb2
from kata_proto._gen.ttrpc import request_pb2
from kata_proto.ttrpc import (
    FLAG_REMOTE_OPEN,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    MessageType,
    TtrpcServer,
    encode_frame,
    open_ttrpc_client,
)


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn)


@asynccontextmanager
async def echo_pair(
    svc: EchoService | None = None,
) -> AsyncIterator[tuple[TtrpcServer, EchoService, ttrpc.TtrpcClient]]:
    """A server and a client joined by an in-memory stream pair."""
    server = TtrpcServer()
    svc = svc or EchoService()
    server.register(SERVICE, svc)
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, a)
        async with open_ttrpc_client(b) as client:
            yield server, svc, client
        nursery.cancel_scope.cancel()


class RawPeer:
    """One end of a connection driven frame by frame."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(
        self, sid: int, method: str = "Echo", payload: bytes = b"", flags: int = 0, **fields: Any
    ) -> None:
        req = request_pb2.Request(service=SERVICE_NAME, method=method, payload=payload, **fields)
        await self.send(encode_frame(sid, MessageType.REQUEST, req.SerializeToString(), flags))

    async def frame(self) -> Frame | None:
        with trio.fail_after(5):
            while (frame := self.decoder.next_frame()) is None:
                data = await self.stream.receive_some()
                if not data:
                    return None
                self.decoder.feed(data)
            return frame

    async def response(self) -> tuple[int, request_pb2.Response]:
        frame = await self.frame()
        assert frame is not None and frame.type == MessageType.RESPONSE
        return frame.stream_id, request_pb2.Response.FromString(frame.payload)


@asynccontextmanager
async def raw_client(
    svc: EchoService | None = None,
) -> AsyncIterator[tuple[TtrpcServer, EchoService, RawPeer]]:
    server = TtrpcServer()
    svc = svc or EchoService()
    server.register(SERVICE, svc)
    a, b = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, a)
        yield server, svc, RawPeer(b)
        nursery.cancel_scope.cancel()


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll state the code under test exposes only as counters."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.01)


def echo(text: str = "", **kw: Any) -> Any:
    return EchoRequest(text=text, **kw)


# --- basic calls ----------------------------------------------------------------------------


def test_unary_call_over_memory_stream_returns_response() -> None:
    async def main() -> None:
        async with echo_pair() as (_, _, client):
            resp = await client.call(SERVICE_NAME, "Echo", echo("hi"), EchoResponse)
            assert resp.text == "hi"

    run(main)


def test_unary_call_over_unix_socket_and_socket_removed_after() -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "ttrpc.sock")
            server = TtrpcServer()
            server.register(SERVICE, EchoService())
            async with trio.open_nursery() as nursery:
                started = await nursery.start(server.serve_unix, path)
                assert started == path
                for _ in range(2):  # two connections one after the other
                    async with open_ttrpc_client(path) as client:
                        resp = await client.call(SERVICE_NAME, "Echo", echo("unix"), EchoResponse)
                        assert resp.text == "unix"
                nursery.cancel_scope.cancel()
            assert not await trio.Path(path).exists()

    run(main)


def test_stub_made_from_service_descriptor_calls_by_rpc_name() -> None:
    async def main() -> None:
        async with echo_pair() as (_, _, client):
            stub = ttrpc.ServiceStub(client, SERVICE, metadata={"who": "stub"})
            resp: Any = await stub.Echo(echo("via stub"))
            assert resp.text == "via stub"
            assert list(resp.metadata) == ["who=stub"]
            with pytest.raises(AttributeError, match="no rpc 'Nope'"):
                stub.Nope  # noqa: B018
            with pytest.raises(TypeError, match="takes EchoRequest"):
                await stub.Echo(EchoResponse())
            with pytest.raises(ttrpc.Unimplemented, match="streaming"):
                await stub.Watch(echo())

    run(main)


def test_register_rejects_duplicates_and_sync_methods() -> None:
    server = TtrpcServer()
    server.register(SERVICE, EchoService())
    with pytest.raises(ValueError, match="registered already"):
        server.register(SERVICE, EchoService())

    class Sync:
        def Echo(self, request: Any, ctx: Any) -> Any:
            return None

    with pytest.raises(TypeError, match="async"):
        TtrpcServer().register(SERVICE, Sync())


# --- concurrency ----------------------------------------------------------------------------


def test_concurrent_calls_complete_out_of_order_and_each_gets_its_own_reply() -> None:
    async def main() -> None:
        async with echo_pair() as (server, _, client):
            done: list[str] = []

            async def one(text: str, ms: int) -> None:
                resp = await client.call(SERVICE_NAME, "Echo", echo(text, sleep_ms=ms), EchoResponse)
                assert resp.text == text
                done.append(text)

            async with trio.open_nursery() as nursery:
                for text, ms in [("slow", 300), ("mid", 150), ("fast", 0)]:
                    nursery.start_soon(one, text, ms)
                    await trio.sleep(0.01)
                await trio.sleep(0.05)
                assert server.statistics().calls_in_flight == 2
                assert client.pending_calls == 2
            assert done == ["fast", "mid", "slow"]

    run(main)


def test_client_uses_odd_increasing_stream_ids_from_one() -> None:
    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        server = RawPeer(a)
        async with open_ttrpc_client(b) as client, trio.open_nursery() as nursery:
            results: dict[str, str] = {}

            async def one(text: str) -> None:
                results[text] = (await client.call(SERVICE_NAME, "Echo", echo(text), EchoResponse)).text

            for t in ("a", "b", "c"):
                nursery.start_soon(one, t)
            seen = []
            for _ in range(3):
                frame = await server.frame()
                assert frame is not None
                seen.append((frame.stream_id, request_pb2.Request.FromString(frame.payload)))
            assert [sid for sid, _ in seen] == [1, 3, 5]
            # Answer in reverse order: the client matches by stream id.
            for sid, req in reversed(seen):
                text = EchoRequest.FromString(req.payload).text
                resp = request_pb2.Response(payload=EchoResponse(text=text.upper()).SerializeToString())
                await server.send(encode_frame(sid, MessageType.RESPONSE, resp.SerializeToString()))
        assert results == {"a": "A", "b": "B", "c": "C"}

    run(main)


# --- status paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", range(1, 17))
def test_handler_raising_a_ttrpc_error_reaches_the_caller_with_its_code(code: int) -> None:
    async def main() -> None:
        async with echo_pair() as (_, _, client):
            with pytest.raises(ttrpc.TtrpcError) as info:
                await client.call(SERVICE_NAME, "Echo", echo(fail_code=code), EchoResponse)
            assert info.value.code == code
            assert type(info.value) is type(ttrpc.error_for_status(status_pb2.Status(code=code)))
            assert info.value.message == f"failing with {code}"
            # the connection is still fine
            assert (await client.call(SERVICE_NAME, "Echo", echo("ok"), EchoResponse)).text == "ok"

    run(main)


def test_unknown_service_and_method_are_unimplemented() -> None:
    async def main() -> None:
        async with echo_pair() as (_, _, client):
            with pytest.raises(ttrpc.Unimplemented, match=r"service nope\.Svc"):
                await client.call("nope.Svc", "Echo", echo(), EchoResponse)
            with pytest.raises(ttrpc.Unimplemented, match="method Nope"):
                await client.call(SERVICE_NAME, "Nope", echo(), EchoResponse)
            with pytest.raises(ttrpc.Unimplemented, match="not implemented"):
                await client.call(SERVICE_NAME, "Missing", echo(), EchoResponse)

    run(main)


def test_streaming_requests_are_rejected_cleanly() -> None:
    async def main() -> None:
        async with raw_client() as (_, svc, peer):
            await peer.request(1, method="Watch", payload=echo().SerializeToString())
            sid, resp = await peer.response()
            assert (sid, resp.status.code) == (1, ttrpc.Code.UNIMPLEMENTED)
            # a unary method asked for with the streaming flag is refused too; its data frames are dropped
            await peer.request(3, flags=FLAG_REMOTE_OPEN, payload=echo().SerializeToString())
            await peer.send(encode_frame(3, MessageType.DATA, echo().SerializeToString()))
            sid, resp = await peer.response()
            assert (sid, resp.status.code) == (3, ttrpc.Code.UNIMPLEMENTED)
            await peer.request(5, payload=echo("after").SerializeToString())
            sid, resp = await peer.response()
            assert (sid, resp.status.code, EchoResponse.FromString(resp.payload).text) == (5, 0, "after")
            assert svc.started == 1

    run(main)


def test_undecodable_payload_is_internal_and_bad_envelope_invalid_argument() -> None:
    async def main() -> None:
        async with raw_client() as (_, svc, peer):
            await peer.request(1, payload=b"\x0a\xff")  # field 1, truncated length
            sid, resp = await peer.response()
            assert (sid, resp.status.code) == (1, ttrpc.Code.INTERNAL)
            assert "unmarshal" in resp.status.message
            await peer.send(encode_frame(3, MessageType.REQUEST, b"\xff\xff\xff"))
            sid, resp = await peer.response()
            assert (sid, resp.status.code) == (3, ttrpc.Code.INVALID_ARGUMENT)
            assert svc.started == 0

    run(main)


def test_handler_crash_becomes_unknown_with_message_and_oserrors_map() -> None:
    async def main() -> None:
        async with echo_pair() as (server, _, client):
            with pytest.raises(ttrpc.Unknown, match="KeyError: 'no such thing'"):
                await client.call(SERVICE_NAME, "Echo", echo(crash="key"), EchoResponse)
            with pytest.raises(ttrpc.NotFound, match="nowhere"):
                await client.call(SERVICE_NAME, "Echo", echo(crash="enoent"), EchoResponse)
            with pytest.raises(ttrpc.Internal, match="returned EchoRequest, expected EchoResponse"):
                await client.call(SERVICE_NAME, "Wrong", echo(), EchoResponse)
            assert (await client.call(SERVICE_NAME, "Echo", echo("alive"), EchoResponse)).text == "alive"
            assert server.statistics().connections == 1

    run(main)


def test_even_and_non_increasing_stream_ids_are_rejected_and_connection_kept() -> None:
    async def main() -> None:
        async with raw_client() as (_, svc, peer):
            await peer.request(2, payload=echo().SerializeToString())
            sid, resp = await peer.response()
            assert (sid, resp.status.code) == (2, ttrpc.Code.INVALID_ARGUMENT)
            await peer.request(7, payload=echo("seven").SerializeToString())
            sid, resp = await peer.response()
            assert (sid, resp.status.code) == (7, 0)
            for old in (7, 5):
                await peer.request(old, payload=echo().SerializeToString())
                sid, resp = await peer.response()
                assert (sid, resp.status.code) == (old, ttrpc.Code.INVALID_ARGUMENT)
                assert "increment" in resp.status.message
            await peer.request(9, payload=echo("nine").SerializeToString())
            sid, resp = await peer.response()
            assert (sid, EchoResponse.FromString(resp.payload).text) == (9, "nine")
            assert svc.started == 2

    run(main)


def test_oversize_frame_is_answered_resource_exhausted_and_connection_kept() -> None:
    async def main() -> None:
        async with raw_client() as (_, _, peer):
            size = MAX_PAYLOAD + 1
            await peer.send(struct.pack(">IIBB", size, 1, MessageType.REQUEST, 0))
            for _ in range(size // 65536):
                await peer.send(bytes(65536))
            await peer.send(bytes(size % 65536))
            sid, resp = await peer.response()
            assert (sid, resp.status.code) == (1, ttrpc.Code.RESOURCE_EXHAUSTED)
            assert str(size) in resp.status.message
            await peer.request(3, payload=echo("still here").SerializeToString())
            sid, resp = await peer.response()
            assert (sid, EchoResponse.FromString(resp.payload).text) == (3, "still here")

    run(main)


def test_client_refuses_oversize_request_locally_and_keeps_working() -> None:
    async def main() -> None:
        async with echo_pair() as (_, svc, client):
            with pytest.raises(ttrpc.ResourceExhausted, match="exceeds maximum"):
                await client.call(SERVICE_NAME, "Echo", echo(blob=bytes(MAX_PAYLOAD)), EchoResponse)
            big = bytes(MAX_PAYLOAD - 100)
            assert (await client.call(SERVICE_NAME, "Echo", echo(blob=big), EchoResponse)).blob == big
            assert svc.started == 1

    run(main)


# --- deadlines and metadata -----------------------------------------------------------------


def test_server_enforces_timeout_nano_and_cancels_the_handler() -> None:
    async def main() -> None:
        async with raw_client() as (server, svc, peer):
            start = trio.current_time()
            await peer.request(1, payload=echo(sleep_ms=5000).SerializeToString(), timeout_nano=50_000_000)
            sid, resp = await peer.response()
            assert (sid, resp.status.code) == (1, ttrpc.Code.DEADLINE_EXCEEDED)
            assert trio.current_time() - start < 2
            assert svc.cancelled == 1
            assert server.statistics().calls_in_flight == 0

    run(main)


def test_client_timeout_is_sent_and_enforced_locally() -> None:
    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        silent = RawPeer(a)  # a server that never answers
        async with open_ttrpc_client(b) as client:
            start = trio.current_time()
            with pytest.raises(ttrpc.DeadlineExceeded, match=r"no response within 0\.2"):
                await client.call(SERVICE_NAME, "Echo", echo(), EchoResponse, timeout=0.2)
            assert 0.2 <= trio.current_time() - start < 2
            assert client.pending_calls == 0
            frame = await silent.frame()
            assert frame is not None
            assert request_pb2.Request.FromString(frame.payload).timeout_nano == pytest.approx(2e8, rel=0.05)

    run(main)


def test_deadline_and_metadata_reach_the_handler() -> None:
    async def main() -> None:
        async with echo_pair() as (_, svc, client):
            resp = await client.call(
                SERVICE_NAME,
                "Echo",
                echo(),
                EchoResponse,
                timeout=5,
                metadata={ttrpc.NAMESPACE_METADATA_KEY: "k8s.io", "Multi": ["a", "b"]},
            )
            assert list(resp.metadata) == ["containerd-namespace-ttrpc=k8s.io", "multi=a", "multi=b"]
            assert 4 < resp.timeout_s <= 5
            ctx = svc.contexts[-1]
            assert ctx.namespace == "k8s.io"
            assert ctx.metadata_value("MULTI") == "a"
            assert (ctx.service, ctx.method, ctx.stream_id) == (SERVICE_NAME, "Echo", 1)
            # No timeout: no deadline.
            await client.call(SERVICE_NAME, "Echo", echo(), EchoResponse)
            assert svc.contexts[-1].deadline == math.inf
            assert svc.contexts[-1].namespace is None
            # An enclosing trio deadline travels too.
            with trio.fail_after(3):
                resp = await client.call(SERVICE_NAME, "Echo", echo(), EchoResponse)
            assert 2 < resp.timeout_s <= 3

    run(main)


# --- connections coming and going -----------------------------------------------------------


def test_vanishing_client_cancels_its_calls_and_leaves_others_alone() -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s")
            server = TtrpcServer()
            svc = EchoService()
            server.register(SERVICE, svc)
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_unix, path)

                async def doomed() -> None:
                    async with open_ttrpc_client(path) as client:
                        await client.call(SERVICE_NAME, "Echo", echo(sleep_ms=60_000), EchoResponse)

                async with open_ttrpc_client(path) as other:
                    doomed_scope = trio.CancelScope()
                    nursery.start_soon(_run_in, doomed_scope, doomed)
                    await wait_until(lambda: svc.started >= 1)
                    survivor = trio.Event()

                    async def steady() -> None:
                        req = echo("steady", sleep_ms=200)
                        resp = await other.call(SERVICE_NAME, "Echo", req, EchoResponse)
                        assert resp.text == "steady"
                        survivor.set()

                    nursery.start_soon(steady)
                    await trio.sleep(0.05)
                    doomed_scope.cancel()  # the first client disappears mid-call
                    with trio.fail_after(5):
                        await wait_until(lambda: svc.cancelled >= 1)
                        await survivor.wait()
                    stats = server.statistics()
                    assert stats.connections == 1 and stats.calls_in_flight == 0
                    again = await other.call(SERVICE_NAME, "Echo", echo("again"), EchoResponse)
                    assert again.text == "again"
                with trio.fail_after(5):
                    await wait_until(lambda: server.statistics().connections == 0)
                nursery.cancel_scope.cancel()

    run(main)


async def _run_in(scope: trio.CancelScope, fn: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await fn()


def test_connection_drop_fails_every_pending_call_and_later_calls() -> None:
    async def main() -> None:
        server = TtrpcServer()
        server.register(SERVICE, EchoService())
        a, b = trio.testing.memory_stream_pair()
        errors: list[BaseException] = []
        async with trio.open_nursery() as nursery, open_ttrpc_client(b) as client:
            server_scope = trio.CancelScope()

            async def serve() -> None:
                with server_scope:
                    await server.serve_stream(a)

            nursery.start_soon(serve)

            async def pending() -> None:
                try:
                    await client.call(SERVICE_NAME, "Echo", echo(sleep_ms=60_000), EchoResponse)
                except ttrpc.ConnectionClosed as err:
                    errors.append(err)

            async with trio.open_nursery() as calls:
                for _ in range(3):
                    calls.start_soon(pending)
                await trio.testing.wait_all_tasks_blocked()
                await wait_until(lambda: client.pending_calls == 3)
                server_scope.cancel()  # the server goes away and closes its end
            assert len(errors) == 3
            assert all(isinstance(e, trio.BrokenResourceError) for e in errors)
            assert all("closed by the server" in str(e) for e in errors)
            with pytest.raises(trio.BrokenResourceError):
                await client.call(SERVICE_NAME, "Echo", echo(), EchoResponse)
            assert client.pending_calls == 0
        with pytest.raises(trio.ClosedResourceError):
            await client.call(SERVICE_NAME, "Echo", echo(), EchoResponse)

    run(main)


def test_server_closes_only_the_connection_that_sends_garbage() -> None:
    async def main() -> None:
        async with raw_client() as (server, _, peer):
            await peer.send(b"\xffgarbage-not-ttrpc")
            assert await peer.frame() is None  # the server hung up
            assert server.statistics().connections == 0

    run(main)


def test_garbage_from_server_fails_pending_calls_with_protocol_reason() -> None:
    async def main() -> None:
        a, b = trio.testing.memory_stream_pair()
        fake = RawPeer(a)
        async with open_ttrpc_client(b) as client, trio.open_nursery() as nursery:

            async def answer_badly() -> None:
                await fake.frame()
                await fake.send(b"\x01\x00\x00\x00\x00\x00\x00\x01\x02\x00")

            nursery.start_soon(answer_badly)
            with pytest.raises(ttrpc.ConnectionClosed, match="protocol error"):
                await client.call(SERVICE_NAME, "Echo", echo(), EchoResponse)

    run(main)


def test_server_error_with_details_round_trips() -> None:
    class Detailed(EchoService):
        async def Echo(self, request: Any, ctx: ttrpc.CallContext) -> Any:
            from google.protobuf import any_pb2

            raise ttrpc.FailedPrecondition("not yet", details=[any_pb2.Any(type_url="t/x", value=b"1")])

    async def main() -> None:
        async with echo_pair(Detailed()) as (_, _, client):
            with pytest.raises(ttrpc.FailedPrecondition) as info:
                await client.call(SERVICE_NAME, "Echo", echo(), EchoResponse)
            assert info.value.message == "not yet"
            assert [d.type_url for d in info.value.details] == ["t/x"]

    run(main)


def test_server_stopping_on_unix_socket_fails_pending_calls() -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s")
            server = TtrpcServer()
            server.register(SERVICE, EchoService())
            async with trio.open_nursery() as nursery:
                server_scope = trio.CancelScope()

                async def serve(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
                    with server_scope:
                        await server.serve_unix(path, task_status=task_status)

                await nursery.start(serve)
                async with open_ttrpc_client(path) as client:
                    nursery.start_soon(_cancel_when, server_scope, lambda: client.pending_calls == 1)
                    with pytest.raises(ttrpc.ConnectionClosed):
                        await client.call(SERVICE_NAME, "Echo", echo(sleep_ms=60_000), EchoResponse)
            assert not await trio.Path(path).exists()

    run(main)


async def _cancel_when(scope: trio.CancelScope, predicate: Callable[[], bool]) -> None:
    await wait_until(predicate)
    scope.cancel()


def test_large_and_small_calls_interleave_over_unix_socket() -> None:
    # Big frames cannot go out in one non-blocking send: the rest queues behind, in order.
    async def main() -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s")
            server = TtrpcServer()
            server.register(SERVICE, EchoService())
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_unix, path)
                async with open_ttrpc_client(path) as client:
                    results: dict[int, bytes] = {}

                    async def one(i: int) -> None:
                        blob = bytes([i]) * (3_000_000 if i % 3 == 0 else 10)
                        resp = await client.call(SERVICE_NAME, "Echo", echo(blob=blob), EchoResponse)
                        results[i] = resp.blob

                    async with trio.open_nursery() as calls:
                        for i in range(12):
                            calls.start_soon(one, i)
                    assert {i: (len(b), set(b)) for i, b in results.items()} == {
                        i: (3_000_000 if i % 3 == 0 else 10, {i}) for i in range(12)
                    }
                nursery.cancel_scope.cancel()

    run(main)


def test_connecting_to_a_missing_socket_is_unavailable() -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as d:
            with pytest.raises(ttrpc.Unavailable, match="cannot connect") as info:
                async with open_ttrpc_client(os.path.join(d, "absent.sock")):
                    pass
            assert isinstance(info.value.__cause__, FileNotFoundError)

    run(main)


def test_error_raised_inside_a_handler_nursery_keeps_its_code() -> None:
    class Nested(EchoService):
        async def Echo(self, request: Any, ctx: ttrpc.CallContext) -> Any:
            async def fail() -> None:
                raise ttrpc.NotFound(f"container {request.text} not found")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(fail)
            return EchoResponse()

    async def main() -> None:
        async with echo_pair(Nested()) as (_, _, client):
            with pytest.raises(ttrpc.NotFound, match="container c1 not found"):
                await client.call(SERVICE_NAME, "Echo", echo("c1"), EchoResponse)

    run(main)


def test_each_answered_call_is_logged_at_debug_with_its_status_and_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with echo_pair() as (_, _, client):
            await client.call(SERVICE_NAME, "Echo", echo("hi"), EchoResponse)
            with pytest.raises(ttrpc.TtrpcError):
                await client.call(SERVICE_NAME, "Echo", echo(fail_code=5), EchoResponse)

    with caplog.at_level("DEBUG", logger="kata_proto.ttrpc"):
        run(main)
    lines = [r.getMessage() for r in caplog.records if "answered" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"ttrpc: {SERVICE_NAME}/Echo answered OK in ")
    assert lines[1].startswith(f"ttrpc: {SERVICE_NAME}/Echo answered NOT_FOUND in ")
    assert float(lines[0].split(" in ")[1].removesuffix(" s")) >= 0


def test_nothing_is_formatted_per_call_above_debug(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with echo_pair() as (_, _, client):
            await client.call(SERVICE_NAME, "Echo", echo("hi"), EchoResponse)

    with caplog.at_level("INFO", logger="kata_proto.ttrpc"):
        run(main)
    assert not [r for r in caplog.records if "answered" in r.getMessage()]
