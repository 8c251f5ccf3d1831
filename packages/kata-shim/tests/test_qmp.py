"""The QMP client against an in-process fake QMP server (a trio unix listener): negotiation, commands,
events for the connection's whole life, and hostile answers (bad JSON, huge lines, early EOF) that become
typed errors, never hangs."""

from __future__ import annotations

import array
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from kata_shim.hypervisor import HypervisorError
from kata_shim.hypervisor._qmp import (
    MAX_LINE,
    QmpClient,
    QmpClosed,
    QmpCommandError,
    QmpError,
    QmpEvent,
    QmpProtocolError,
    QmpTimeout,
    _decode,
)

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}


@pytest.fixture
def sock() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="kqmp-", dir="/tmp"))
    yield directory / "qmp.sock"
    shutil.rmtree(directory, ignore_errors=True)


class Peer:
    """The server's side of one connection: line-based JSON."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def send(self, obj: object) -> None:
        await self.stream.send_all(json.dumps(obj).encode() + b"\n")

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    async def negotiate(self) -> None:
        await self.send(GREETING)
        message = await self.recv()
        assert message["execute"] == "qmp_capabilities"
        await self.send({"return": {}, "id": message["id"]})


Handler = Callable[[Peer], Awaitable[None]]


async def serve_one(path: Path, handler: Handler, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Accept one connection on `path` and run `handler` on it, then close it."""
    listener_sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener_sock.bind(str(path))
    listener_sock.listen(1)
    listener = trio.SocketListener(listener_sock)
    task_status.started()
    async with listener:
        stream = await listener.accept()
        async with stream:
            await handler(Peer(stream))


def run_with_server(path: Path, handler: Handler, client_side: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_one, path, handler)
            result = await client_side()
            nursery.cancel_scope.cancel()
            return result

    return trio.run(main)


def test_negotiates_executes_and_delivers_events_before_and_after_answers(sock: Path) -> None:
    events: list[QmpEvent] = []

    async def server(peer: Peer) -> None:
        await peer.send(GREETING)
        message = await peer.recv()
        assert message == {"execute": "qmp_capabilities", "id": 0}
        await peer.send({"event": "EARLY", "data": {}, "timestamp": {}})
        await peer.send({"return": {}, "id": 0})
        message = await peer.recv()
        assert message["execute"] == "query-status" and "arguments" not in message
        await peer.send({"event": "STOP", "data": {}, "timestamp": {}})
        await peer.send({"return": {"status": "paused", "running": False}, "id": message["id"]})
        message = await peer.recv()
        assert message["arguments"] == {"id": "x"}
        await peer.send({"return": [], "id": message["id"]})
        await peer.send({"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"}})

    async def client() -> None:
        qmp = await QmpClient.connect(sock, events.append, timeout=10)
        assert qmp.greeting["version"]["qemu"]["major"] == 7
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qmp.run)
            assert await qmp.execute("query-status") == {"status": "paused", "running": False}
            assert await qmp.execute("device_del", {"id": "x"}) == []
            with trio.fail_after(10):
                await qmp.closed.wait()  # the server closed after the last event
        assert [e["event"] for e in events] == ["EARLY", "STOP", "SHUTDOWN"]
        with pytest.raises(QmpClosed):
            await qmp.execute("query-status")

    run_with_server(sock, server, client)


def test_error_answer_is_a_typed_command_error(sock: Path) -> None:
    async def server(peer: Peer) -> None:
        await peer.negotiate()
        message = await peer.recv()
        await peer.send({"error": {"class": "GenericError", "desc": "no such device"}, "id": message["id"]})
        await trio.sleep_forever()

    async def client() -> None:
        qmp = await QmpClient.connect(sock, timeout=10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qmp.run)
            with pytest.raises(QmpCommandError) as caught:
                await qmp.execute("device_del", {"id": "nope"})
            nursery.cancel_scope.cancel()
        assert caught.value.error_class == "GenericError" and caught.value.desc == "no such device"
        assert isinstance(caught.value, HypervisorError)

    run_with_server(sock, server, client)


@pytest.mark.parametrize(
    "bad",
    [b"{not json\n", b"[1, 2]\n", b"\xff\xfe\n", b'"a string"\n'],
    ids=["not-json", "array", "not-utf8", "string"],
)
def test_malformed_answer_fails_the_pending_command_and_the_connection(sock: Path, bad: bytes) -> None:
    async def server(peer: Peer) -> None:
        await peer.negotiate()
        await peer.recv()
        await peer.send_raw(bad)
        await trio.sleep_forever()

    async def client() -> None:
        qmp = await QmpClient.connect(sock, timeout=10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qmp.run)
            with pytest.raises(QmpProtocolError), trio.fail_after(10):
                await qmp.execute("query-status", timeout=60)
            with trio.fail_after(10):
                await qmp.closed.wait()
            with pytest.raises(QmpProtocolError):
                await qmp.execute("query-status")

    run_with_server(sock, server, client)


def test_endless_line_is_refused_at_the_cap_not_buffered(sock: Path) -> None:
    sent = 0

    async def server(peer: Peer) -> None:
        nonlocal sent
        await peer.negotiate()
        await peer.recv()
        chunk = b"x" * 65536
        try:
            while sent < 16 * MAX_LINE:  # far past the cap, never a newline
                await peer.send_raw(chunk)
                sent += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await trio.sleep_forever()

    async def client() -> None:
        qmp = await QmpClient.connect(sock, timeout=10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qmp.run)
            with pytest.raises(QmpProtocolError, match="line over"), trio.fail_after(30):
                await qmp.execute("query-status", timeout=60)
            nursery.cancel_scope.cancel()

    run_with_server(sock, server, client)
    assert sent < 16 * MAX_LINE  # the client hung up instead of reading on


def test_eof_before_greeting_is_closed_not_a_hang(sock: Path) -> None:
    async def server(peer: Peer) -> None:
        await peer.send_raw(b'{"QMP": ')  # half a greeting, then EOF

    async def client() -> None:
        with pytest.raises(QmpClosed), trio.fail_after(10):
            await QmpClient.connect(sock, timeout=60)

    run_with_server(sock, server, client)


def test_eof_with_a_command_pending_is_closed(sock: Path) -> None:
    async def server(peer: Peer) -> None:
        await peer.negotiate()
        await peer.recv()  # and hang up without answering

    async def client() -> None:
        qmp = await QmpClient.connect(sock, timeout=10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qmp.run)
            with pytest.raises(QmpClosed), trio.fail_after(10):
                await qmp.execute("quit", timeout=60)

    run_with_server(sock, server, client)


@pytest.mark.parametrize(
    "greeting", [{"return": {}}, {"QMP": "yes"}, [1]], ids=["no-QMP-key", "QMP-not-object", "array"]
)
def test_bad_greeting_is_a_protocol_error(sock: Path, greeting: object) -> None:
    async def server(peer: Peer) -> None:
        await peer.send(greeting)
        await trio.sleep_forever()

    async def client() -> None:
        with pytest.raises(QmpProtocolError), trio.fail_after(10):
            await QmpClient.connect(sock, timeout=60)

    run_with_server(sock, server, client)


def test_capabilities_refused_is_a_command_error(sock: Path) -> None:
    async def server(peer: Peer) -> None:
        await peer.send(GREETING)
        message = await peer.recv()
        await peer.send({"error": {"class": "CommandNotFound", "desc": "no"}, "id": message["id"]})
        await trio.sleep_forever()

    async def client() -> None:
        with pytest.raises(QmpCommandError, match="qmp_capabilities"):
            await QmpClient.connect(sock, timeout=10)

    run_with_server(sock, server, client)


def test_silent_server_times_out(sock: Path) -> None:
    async def server(peer: Peer) -> None:
        await peer.negotiate()
        await peer.recv()
        await trio.sleep_forever()

    async def client() -> None:
        qmp = await QmpClient.connect(sock, timeout=10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qmp.run)
            with pytest.raises(QmpTimeout):
                await qmp.execute("query-status", timeout=0.2)
            nursery.cancel_scope.cancel()

    run_with_server(sock, server, client)


def test_silent_greeting_times_out(sock: Path) -> None:
    async def server(peer: Peer) -> None:
        await trio.sleep_forever()

    async def client() -> None:
        with pytest.raises(QmpTimeout):
            await QmpClient.connect(sock, timeout=0.2)

    run_with_server(sock, server, client)


def test_connect_to_missing_socket_is_closed(sock: Path) -> None:
    with pytest.raises(QmpClosed, match="cannot connect"):
        trio.run(QmpClient.connect, sock)


def test_answers_for_unknown_ids_and_a_failing_event_handler_are_survived(sock: Path) -> None:
    def bad_handler(event: QmpEvent) -> None:
        raise RuntimeError("handler bug")

    async def server(peer: Peer) -> None:
        await peer.negotiate()
        message = await peer.recv()
        await peer.send({"return": {}, "id": 999})
        await peer.send({"return": {}, "id": "str"})
        await peer.send({"event": "RESET", "data": {}})
        await peer.send({"return": 42, "id": message["id"]})
        await trio.sleep_forever()

    async def client() -> None:
        qmp = await QmpClient.connect(sock, bad_handler, timeout=10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qmp.run)
            assert await qmp.execute("query-status", timeout=10) == 42
            nursery.cancel_scope.cancel()

    run_with_server(sock, server, client)


def test_deeply_nested_json_is_a_protocol_error_not_a_recursion_error(sock: Path) -> None:
    """json.loads raises RecursionError (not ValueError) on deep nesting: it must not end the reader task
    (a system task in the shim: an escaping exception would crash the shim)."""

    async def server(peer: Peer) -> None:
        await peer.negotiate()
        await peer.recv()
        await peer.send_raw(b"[" * 200_000 + b"\n")
        await trio.sleep_forever()

    async def client() -> None:
        qmp = await QmpClient.connect(sock, timeout=10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qmp.run)
            with pytest.raises(QmpProtocolError, match="not JSON"), trio.fail_after(10):
                await qmp.execute("query-status", timeout=60)

    run_with_server(sock, server, client)
    with pytest.raises(QmpProtocolError):
        _decode(b'{"a": ' * 100_000)


@given(st.binary(max_size=200))
def test_decode_accepts_objects_and_refuses_everything_else_with_a_protocol_error(data: bytes) -> None:
    try:
        message = _decode(data)
    except QmpError as err:
        assert isinstance(err, QmpProtocolError)
    else:
        assert isinstance(message, dict)


def test_pass_fd_sends_the_fd_as_scm_rights_with_the_getfd_command_itself(sock: Path, tmp_path: Path) -> None:
    """QEMU's getfd takes the fd that came with the command's bytes: the server receives both in one
    recvmsg, and the fd it gets is the same open file (same inode), not a number."""
    target = tmp_path / "passed"
    target.write_bytes(b"x")
    got: dict[str, Any] = {}

    async def server(peer: Peer) -> None:
        await peer.negotiate()
        data, ancdata, _, _ = await peer.stream.socket.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
        fds = array.array("i")
        for level, kind, payload in ancdata:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            fds.frombytes(payload)
        message = json.loads(data.split(b"\n")[0])
        got.update(message=message, inodes=[os.fstat(fd).st_ino for fd in fds])
        for fd in fds:
            os.close(fd)
        await peer.send({"return": {}, "id": message["id"]})
        await trio.sleep_forever()

    async def client() -> None:
        qmp = await QmpClient.connect(sock, timeout=10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(qmp.run)
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
            try:
                await qmp.pass_fd("fd-test", fd, timeout=10)
            finally:
                os.close(fd)
            nursery.cancel_scope.cancel()

    run_with_server(sock, server, client)
    assert got["message"]["execute"] == "getfd" and got["message"]["arguments"] == {"fdname": "fd-test"}
    assert got["inodes"] == [target.stat().st_ino]


def test_fds_over_a_stream_that_is_not_a_unix_socket_are_a_typed_error() -> None:
    async def main() -> None:
        left, _right = trio.testing.memory_stream_pair()
        qmp = QmpClient(left)
        with pytest.raises(QmpError, match="only be passed over a unix socket"):
            await qmp.execute("getfd", {"fdname": "x"}, timeout=5, fds=[0])

    trio.run(main)
