"""The hybrid vsock handshake reader against arbitrary muxer answers (hypothesis)."""

from __future__ import annotations

import os
import tempfile

import trio
from client_harness import one_connection  # type: ignore[import-not-found]
from hypothesis import given, settings
from hypothesis import strategies as st

from kata_agent_client import AgentAddress, HandshakeFailed, connect


@settings(max_examples=40, deadline=None)
@given(answer=st.binary(max_size=100), trailer=st.binary(max_size=16))
def test_any_answer_connects_or_fails_typed(answer: bytes, trailer: bytes) -> None:
    async def main() -> None:
        d = tempfile.mkdtemp(prefix="kah-", dir="/tmp")
        path = os.path.join(d, "hv.sock")

        async def muxer(conn: trio.socket.SocketType) -> None:
            assert await conn.recv(64) == b"CONNECT 1024\n"
            await conn.send(answer + trailer)

        try:
            async with one_connection(path, muxer):
                first_line = answer.split(b"\n", 1)[0] + b"\n" if b"\n" in answer else None
                ok = first_line is not None and first_line.startswith(b"OK ") and len(first_line) <= 64
                with trio.fail_after(5):
                    try:
                        stream = await connect(AgentAddress("hvsock", path=path))
                    except HandshakeFailed:
                        assert not ok
                    else:
                        assert ok
                        rest = answer.split(b"\n", 1)[1] + trailer
                        got = b""
                        async with stream:
                            while len(got) < len(rest):
                                got += await stream.receive_some(64)
                        assert got == rest  # bytes after the OK line belong to the guest
        finally:
            os.unlink(path)
            os.rmdir(d)

    trio.run(main)
