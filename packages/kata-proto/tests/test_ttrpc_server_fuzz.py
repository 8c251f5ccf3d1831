"""Whatever frames a client sends, the server answers or hangs up: it never fails or hangs."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ttrpc_echo import SERVICE, SERVICE_NAME, EchoRequest, EchoService

from kata_proto._gen.ttrpc import request_pb2
from kata_proto.ttrpc import FrameDecoder, MessageType, TtrpcServer, encode_frame

_payloads = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda svc, method, req, timeout: request_pb2.Request(
            service=svc, method=method, payload=req, timeout_nano=timeout
        ).SerializeToString(),
        st.sampled_from([SERVICE_NAME, "other.Svc", ""]),
        st.sampled_from(["Echo", "Wrong", "Missing", "Watch", "Nope"]),
        st.one_of(
            st.binary(max_size=20),
            st.builds(
                lambda c, crash, ms: EchoRequest(fail_code=c, crash=crash, sleep_ms=ms).SerializeToString(),
                st.integers(-5, 20),
                st.sampled_from(["", "key", "enoent"]),
                st.integers(0, 30),
            ),
        ),
        st.integers(-(10**9), 10**9),
    ),
)
_frames = st.lists(
    st.tuples(st.integers(0, 12), st.integers(0, 4), st.integers(0, 7), _payloads),
    max_size=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=_frames, close_early=st.booleans())
def test_server_survives_arbitrary_frame_sequences(
    frames: list[tuple[int, int, int, bytes]], close_early: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.clear()

    async def main() -> int:
        server = TtrpcServer()
        server.register(SERVICE, EchoService())
        a, b = trio.testing.memory_stream_pair()
        answers = 0
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.serve_stream, a)
                for sid, typ, flags, payload in frames:
                    await b.send_all(encode_frame(sid, typ, payload, flags))
                if close_early:
                    await b.aclose()
                    return 0
                await trio.sleep(0.05)
                await b.send_stream.aclose()
                decoder = FrameDecoder()
                while data := await b.receive_some():
                    decoder.feed(data)
                    while (frame := decoder.next_frame()) is not None:
                        assert frame.type == MessageType.RESPONSE
                        request_pb2.Response.FromString(frame.payload)
                        answers += 1
        assert server.statistics().calls_in_flight == 0
        return answers

    with caplog.at_level(logging.ERROR, logger="kata_proto.ttrpc"):
        answers = trio.run(main)
    assert answers <= len(frames)
    assert not [r for r in caplog.records if "connection failed" in r.getMessage()]
