"""Test helpers: a scripted peer on a unix socket (the hybrid-vsock muxer or the agent's log port)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def one_connection(
    path: str, script: Callable[[trio.socket.SocketType], Awaitable[None]]
) -> AsyncIterator[None]:
    """Listen on the unix socket `path` and run `script(conn)` on its first connection; the block's exit
    waits for the script, then the listener is closed."""
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen(1)

    async def serve() -> None:
        conn, _ = await sock.accept()
        with conn:
            await script(conn)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            yield
    finally:
        sock.close()
