"""A small HTTP/1.1 client over a unix socket, in trio, for the REST APIs of external VMMs (Cloud Hypervisor's
``--api-socket``, Firecracker's ``--api-sock``).

One request per connection (``Connection: close``); the answer is read by its ``Content-Length`` (or to the
end of the connection when it has none), within `MAX_HEADER` bytes of head and ``max_body`` bytes of body,
and the whole exchange within ``timeout`` seconds. A chunked answer, a malformed status line or header, a
body over the bound, a slow or closed connection: each is a `RestError` (a `HypervisorError`), never a hang
and never an unbounded buffer. The VMM is a trusted host process, but the bounds keep a wedged one from
wedging the shim.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from kata_shim.hypervisor._base import HypervisorError

REST_TIMEOUT = 10.0
"""Seconds one request (connect, send, whole answer) may take."""
MAX_HEADER = 16 * 1024
"""Bytes of status line and headers."""
MAX_BODY = 1024 * 1024
"""Bytes of answer body (vm.info of a big VM is a few KiB)."""
_CHUNK = 65536


class RestError(HypervisorError):
    """A REST request failed: no connection, a timeout, a malformed answer, or a status it did not expect.

    ``status`` is the HTTP status (0 when there was no well-formed answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RestResponse:
    """A parsed answer: status, reason phrase, lower-cased headers, body bytes."""

    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        """The body as JSON; `RestError` when it is not."""
        try:
            return json.loads(self.body)
        except (ValueError, RecursionError) as err:
            raise RestError(f"answer {self.status} has a body that is not JSON: {err}", self.status) from err


async def request(
    socket_path: Path,
    method: str,
    path: str,
    body: object | None = None,
    *,
    timeout: float = REST_TIMEOUT,  # noqa: ASYNC109 (one budget for connect, send and receive)
    max_body: int = MAX_BODY,
) -> RestResponse:
    """Send ``method path`` (with ``body`` as JSON when not None) to the API socket; return the answer.

    Any status is returned; `expect` checks it."""
    what = f"{method} {path}"
    payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Accept: application/json", "Connection: close"]
    if body is not None:
        head += ["Content-Type: application/json"]
    if body is not None or method in ("PUT", "PATCH", "POST"):
        head += [f"Content-Length: {len(payload)}"]
    data = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
    try:
        with trio.fail_after(timeout):
            try:
                stream = await trio.open_unix_socket(str(socket_path))
            except OSError as err:
                raise RestError(f"{what}: cannot connect to {socket_path}: {err.strerror or err}") from err
            async with stream:
                try:
                    await stream.send_all(data)
                    return await _read_response(stream, what, method, max_body)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                    raise RestError(f"{what}: connection failed: {err}") from err
    except trio.TooSlowError as err:
        raise RestError(f"{what}: no complete answer within {timeout:g} s") from err


async def _read_response(stream: trio.SocketStream, what: str, method: str, max_body: int) -> RestResponse:
    buf = bytearray()
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > MAX_HEADER:
            raise RestError(f"{what}: answer head longer than {MAX_HEADER} bytes")
        chunk = await stream.receive_some(_CHUNK)
        if not chunk:
            raise RestError(
                f"{what}: connection closed before a complete answer" if buf else f"{what}: no answer"
            )
        buf += chunk
    if end > MAX_HEADER:
        raise RestError(f"{what}: answer head longer than {MAX_HEADER} bytes")
    head, rest = bytes(buf[:end]), bytes(buf[end + 4 :])
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if (
        len(parts) < 2
        or not parts[0].startswith("HTTP/1.")
        or not (parts[1].isdigit() and len(parts[1]) == 3)
    ):
        raise RestError(f"{what}: malformed status line {lines[0][:80]!r}")
    status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise RestError(f"{what}: malformed header line {line[:80]!r}", status)
        headers[name.lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise RestError(f"{what}: chunked answers are not supported", status)
    length_text = headers.get("content-length")
    no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
    if no_body:
        return RestResponse(status, reason, headers)
    if length_text is not None:
        if not length_text.isdigit():
            raise RestError(f"{what}: bad Content-Length {length_text[:20]!r}", status)
        length = int(length_text)
        if length > max_body:
            raise RestError(
                f"{what}: answer body of {length} bytes is over the {max_body}-byte limit", status
            )
        body = bytearray(rest[:length])
        while len(body) < length:
            chunk = await stream.receive_some(min(_CHUNK, length - len(body)))
            if not chunk:
                raise RestError(f"{what}: connection closed after {len(body)} of {length} body bytes", status)
            body += chunk
        return RestResponse(status, reason, headers, bytes(body))
    body = bytearray(rest)  # no length: the body ends with the connection
    while chunk := await stream.receive_some(_CHUNK):
        body += chunk
        if len(body) > max_body:
            raise RestError(f"{what}: answer body over the {max_body}-byte limit", status)
    if len(body) > max_body:
        raise RestError(f"{what}: answer body over the {max_body}-byte limit", status)
    return RestResponse(status, reason, headers, bytes(body))


def expect(response: RestResponse, what: str, ok: tuple[int, ...] = (204,)) -> RestResponse:
    """``response`` when its status is one of ``ok``; else a `RestError` quoting the VMM's message
    (Firecracker's ``fault_message``, or the body's first bytes)."""
    if response.status in ok:
        return response
    detail = response.body[:300].decode(errors="replace").strip()
    try:
        parsed = json.loads(response.body)
        if isinstance(parsed, dict) and isinstance(parsed.get("fault_message"), str):
            detail = parsed["fault_message"][:300]
    except (ValueError, RecursionError):
        pass
    message = f"{what}: HTTP {response.status} {response.reason}".rstrip()
    raise RestError(message + (f": {detail}" if detail else ""), response.status)
