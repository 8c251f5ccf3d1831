"""The REST client of the clh and firecracker back-ends against an in-process trio server on a unix socket:
well-formed answers parse; a bad status line, a chunked answer, a huge or short body, a body that never
ends, a server that never answers or closes at once: each is a typed RestError (a HypervisorError), never a
hang and never an unbounded buffer."""

from __future__ import annotations

import functools
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from restvmm_harness import read_head  # type: ignore[import-not-found]

from kata_shim.hypervisor import HypervisorError
from kata_shim.hypervisor._rest import MAX_HEADER, RestError, RestResponse, expect, request

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@pytest.fixture
def sock() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="krs-", dir="/tmp"))
    yield path / "api.sock"
    shutil.rmtree(path, ignore_errors=True)


async def _serve(sock: Path) -> trio.SocketListener:
    raw = trio.socket.socket(trio.socket.AF_UNIX)
    await raw.bind(str(sock))
    raw.listen(4)
    return trio.SocketListener(raw)


def _canned(raw: bytes, seen: list[bytes] | None = None, *, then_sleep: float = 0.0) -> Handler:
    async def handler(stream: trio.SocketStream) -> None:
        data = await read_head(stream)
        if data is None:
            return
        if seen is not None:
            seen.append(data)
        await stream.send_all(raw)
        if then_sleep:
            await trio.sleep(then_sleep)

    return handler


def _run(
    sock: Path, handler: Handler, method: str = "GET", path: str = "/vm.info", **kw: Any
) -> RestResponse:
    """One request against ``handler`` serving one connection."""
    return trio.run(functools.partial(_exchange, sock, handler, method, path, **kw))


async def _exchange(sock: Path, handler: Handler, method: str, path: str, **kw: Any) -> RestResponse:
    listener = await _serve(sock)
    result: list[RestResponse] = []
    failure: list[RestError] = []

    async def serve_one() -> None:
        stream = await listener.accept()
        async with stream:
            await handler(stream)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            try:
                result.append(await request(sock, method, path, **kw))
            except RestError as err:
                failure.append(err)  # raised outside the nursery (not in an ExceptionGroup)
            nursery.cancel_scope.cancel()
    finally:
        await listener.aclose()
    if failure:
        raise failure[0]
    return result[0]


def test_json_answer_and_request_form(sock: Path) -> None:
    seen: list[bytes] = []
    body = b'{"state": "Running", "config": {}}'
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    answer = _run(sock, _canned(raw, seen), "PUT", "/vm.resize", body={"desired_vcpus": 2})
    assert answer.status == 200 and answer.json() == {"state": "Running", "config": {}}
    head = seen[0].decode()
    assert head.startswith("PUT /vm.resize HTTP/1.1\r\n")
    assert "Content-Type: application/json\r\n" in head and "Content-Length: 19\r\n" in head


def test_no_content_and_bodiless_put(sock: Path) -> None:
    seen: list[bytes] = []
    answer = _run(sock, _canned(b"HTTP/1.1 204 No Content\r\n\r\n", seen), "PUT", "/vm.boot")
    assert answer.status == 204 and answer.body == b""
    assert "Content-Length: 0\r\n" in seen[0].decode()
    assert expect(answer, "boot") is answer


def test_body_until_close(sock: Path) -> None:
    answer = _run(sock, _canned(b"HTTP/1.1 200 OK\r\n\r\n{}"))
    assert answer.json() == {}


def test_error_status_quotes_fault_message(sock: Path) -> None:
    body = b'{"fault_message": "The kernel file cannot be opened"}'
    raw = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    answer = _run(sock, _canned(raw), "PUT", "/boot-source", body={})
    with pytest.raises(RestError, match="HTTP 400 Bad Request: The kernel file cannot be opened") as err:
        expect(answer, "firecracker PUT /boot-source")
    assert err.value.status == 400 and isinstance(err.value, HypervisorError)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", "chunked"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", "over the"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", "closed after 2 of 10"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{{{{{", "not JSON"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 40000\r\n\r\n" + b"[" * 20000 + b"]" * 20000, "not JSON"),
        (b"HTTP/1.1 200 OK\r\n", "closed before a complete answer"),
        (b"", "no answer"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEADER + 10), "head longer"),
    ],
    ids=[
        "not-http",
        "bad-status",
        "bad-header",
        "chunked",
        "negative-length",
        "huge-length",
        "short-body",
        "bad-json",
        "deep-json",
        "no-blank-line",
        "closed-at-once",
        "endless-head",
    ],
)
def test_malformed_answers_are_typed_errors(sock: Path, raw: bytes, match: str) -> None:
    with pytest.raises(RestError, match=match):
        answer = _run(sock, _canned(raw))
        answer.json()


def test_huge_body_without_length_is_bounded(sock: Path) -> None:
    async def flood(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\n")
        chunk = b"x" * 65536
        for _ in range(64):  # 4 MiB, then close; the client stops at 64 KiB
            await stream.send_all(chunk)

    with pytest.raises(RestError, match="over the 65536-byte limit"):
        _run(sock, flood, max_body=65536)


def test_slow_body_times_out(sock: Path) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"
    with pytest.raises(RestError, match=r"no complete answer within 0\.5 s"):
        _run(sock, _canned(raw, then_sleep=60), timeout=0.5)


def test_silent_server_times_out(sock: Path) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep(60)

    with pytest.raises(RestError, match="no complete answer"):
        _run(sock, silent, timeout=0.5)


def test_no_socket(sock: Path) -> None:
    with pytest.raises(RestError, match="cannot connect"):
        trio.run(request, sock, "GET", "/")
