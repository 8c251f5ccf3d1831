"""Listening addresses: `vsock://PORT` (AF_VSOCK, any CID) or `unix:PATH` (tests, debugging)."""

from __future__ import annotations

import contextlib
import os
import socket as _socket

import trio

from kata_proto.agent import AGENT_VSOCK_PORT, LOG_VSOCK_PORT

__all__ = ["AGENT_VSOCK_PORT", "LOG_VSOCK_PORT", "open_listener"]


async def open_listener(address: str) -> tuple[trio.SocketListener, str | None]:
    """A listener for `address`, and the unix path to remove afterwards (None for vsock)."""
    if address.startswith("vsock://"):
        port = int(address.removeprefix("vsock://").rsplit(":", 1)[-1])
        sock = trio.socket.socket(_socket.AF_VSOCK, _socket.SOCK_STREAM)
        await sock.bind((_socket.VMADDR_CID_ANY, port))
        sock.listen(128)
        return trio.SocketListener(sock), None
    if address.startswith("unix:"):
        path = address.removeprefix("unix:").removeprefix("//")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(128)
        return trio.SocketListener(sock), path
    raise ValueError(f"listen address {address!r} is neither vsock://PORT nor unix:PATH")
