"""Reaching the agent: a unix socket, hybrid vsock (`CONNECT <port>` over a unix socket) or AF_VSOCK."""

from __future__ import annotations

import socket as _socket
from dataclasses import dataclass

import trio

from kata_agent_client._errors import BadAddress, HandshakeFailed
from kata_proto.agent import AGENT_VSOCK_PORT, LOG_VSOCK_PORT

AGENT_PORT = AGENT_VSOCK_PORT
LOG_PORT = LOG_VSOCK_PORT
_MAX_LINE = 64


@dataclass(frozen=True)
class AgentAddress:
    """Where the agent is: kind "unix" (path), "hvsock" (path, port) or "vsock" (cid, port)."""

    kind: str
    path: str = ""
    cid: int = 0
    port: int = AGENT_PORT

    @classmethod
    def parse(cls, text: str) -> AgentAddress:
        """`unix:PATH`, `hvsock:PATH[:PORT]` (hybrid vsock; also `hvsock://`) or `vsock://CID:PORT`."""
        if text.startswith("unix:"):
            return cls("unix", path=text.removeprefix("unix:").removeprefix("//"))
        if text.startswith("hvsock:"):
            rest = text.removeprefix("hvsock:").removeprefix("//")
            path, _, port = rest.rpartition(":")
            if path and port.isdigit():
                return cls("hvsock", path=path, port=int(port))
            return cls("hvsock", path=rest)
        if text.startswith("vsock://"):
            cid, _, port = text.removeprefix("vsock://").partition(":")
            try:
                return cls("vsock", cid=int(cid), port=int(port or AGENT_PORT))
            except ValueError:
                pass
        raise BadAddress(f"agent address {text!r} is not unix:PATH, hvsock:PATH[:PORT] or vsock://CID:PORT")

    def with_port(self, port: int) -> AgentAddress:
        """The same peer at another port (the log stream at 1025); a unix path gets `.log` appended."""
        if self.kind == "unix":
            return AgentAddress("unix", path=self.path + ".log")
        return AgentAddress(self.kind, path=self.path, cid=self.cid, port=port)


async def _read_line(stream: trio.SocketStream) -> bytes:
    # Byte by byte: whatever follows the OK line belongs to the guest connection.
    line = b""
    while not line.endswith(b"\n"):
        if len(line) >= _MAX_LINE:
            raise HandshakeFailed(f"hybrid vsock answer too long: {line!r}")
        chunk = await stream.receive_some(1)
        if not chunk:
            raise HandshakeFailed("hybrid vsock closed the connection (nothing listens on the guest port?)")
        line += chunk
    return line


async def connect(address: AgentAddress) -> trio.SocketStream:
    """A connected byte stream to the agent's port (after the hybrid vsock handshake if needed)."""
    if address.kind == "vsock":
        sock = trio.socket.socket(_socket.AF_VSOCK, _socket.SOCK_STREAM)
        try:
            await sock.connect((address.cid, address.port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)
    stream = await trio.open_unix_socket(address.path)
    if address.kind == "hvsock":
        try:
            await stream.send_all(f"CONNECT {address.port}\n".encode())
            line = await _read_line(stream)
            if not line.startswith(b"OK "):
                raise HandshakeFailed(f"hybrid vsock answered {line!r} to CONNECT {address.port}")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
    return stream
