"""A QMP (QEMU Machine Protocol) client over a unix socket, in trio.

QMP is JSON objects, one per line (docs/interop/qmp-spec): the server greets with ``{"QMP": {...}}``, the
client leaves capabilities negotiation with ``qmp_capabilities``, then sends ``{"execute", "arguments",
"id"}`` and gets ``{"return"|"error", "id"}`` back; ``{"event", "data", "timestamp"}`` objects arrive at any
time. One task reads (`run`): it answers the command waiting for its ``id`` and hands every event to the
``on_event`` callback, for the connection's whole life.

QEMU runs a guest we do not trust, and the socket is the only channel back: a line longer than
`MAX_LINE` bytes, bytes that are not a JSON object, or an early end of the stream become a `QmpError`
subclass, never a hang (commands have a timeout) or unbounded memory.

A command can carry host fds (``execute(..., fds=[...])``): they go as SCM_RIGHTS ancillary data on the
same ``sendmsg`` as the command's first byte, as QEMU's ``getfd`` wants (`pass_fd`).
"""

from __future__ import annotations

import array
import itertools
import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from kata_shim.hypervisor._base import HypervisorError

log = logging.getLogger("kata_shim.hypervisor.qmp")

MAX_LINE = 1 << 20
"""Longest QMP line accepted (1 MiB): the largest answer we ask for (query-cpus-fast) is a few KiB."""
DEFAULT_TIMEOUT = 30.0
READ_CHUNK = 65536

QmpEvent = dict[str, Any]
"""``{"event": NAME, "data": {...}, "timestamp": {...}}``."""


class QmpError(HypervisorError):
    """A QMP exchange failed (base class)."""


class QmpProtocolError(QmpError):
    """QEMU sent something that is not QMP: not JSON, not an object, a line over `MAX_LINE`, no greeting."""


class QmpClosed(QmpError):
    """The QMP connection ended (QEMU exited, or the socket closed) before the answer came."""


class QmpTimeout(QmpError):
    """No answer to a command within its timeout."""


class QmpCommandError(QmpError):
    """QEMU answered a command with an error (`error_class`, `desc`)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class _LineReader:
    """Splits a byte stream into lines, refusing any line longer than `limit`."""

    def __init__(self, stream: trio.abc.ReceiveStream, limit: int = MAX_LINE) -> None:
        self._stream = stream
        self._limit = limit
        self._buf = bytearray()

    async def readline(self) -> bytes:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                if len(line) > self._limit:
                    raise QmpProtocolError(f"QMP line of {len(line)} bytes (limit {self._limit})")
                return line
            if len(self._buf) > self._limit:
                raise QmpProtocolError(f"QMP line over {self._limit} bytes")
            try:
                data = await self._stream.receive_some(READ_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                raise QmpClosed(f"QMP connection lost: {err}") from err
            if not data:
                raise QmpClosed("QMP connection closed by QEMU")
            self._buf += data


def _decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as err:  # deep nesting raises RecursionError, not ValueError
        raise QmpProtocolError(f"QMP sent a line that is not JSON: {line[:80]!r}") from err
    if not isinstance(message, dict):
        raise QmpProtocolError(f"QMP sent a JSON {type(message).__name__}, not an object")
    return message


class QmpClient:
    """One QMP connection. `connect` negotiates; `run` (a task) reads until the stream ends.

    ``on_event`` is called (on the trio thread, from `run`) with every event QEMU sends; it must not block.
    """

    def __init__(self, stream: trio.abc.Stream, on_event: Callable[[QmpEvent], None] | None = None) -> None:
        self._stream = stream
        self._reader = _LineReader(stream)
        self._on_event = on_event or (lambda event: None)
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any] | QmpError]] = {}
        self._send_lock = trio.Lock()
        self._failure: QmpError | None = None
        self.greeting: dict[str, Any] = {}
        self.closed = trio.Event()
        """Set when `run` has ended (the stream ended or broke)."""

    @classmethod
    async def connect(
        cls,
        path: Path | str,
        on_event: Callable[[QmpEvent], None] | None = None,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (one budget for connect and negotiation)
    ) -> QmpClient:
        """Connect to QEMU's ``-qmp unix:<path>`` socket, read the greeting and negotiate capabilities.
        Start `run` next (in a nursery or system task) before calling `execute`."""
        with trio.move_on_after(timeout) as scope:
            try:
                stream = await trio.open_unix_socket(str(path))
            except OSError as err:
                raise QmpClosed(f"cannot connect to QMP socket {path}: {err.strerror or err}") from err
            client = cls(stream, on_event)
            try:
                await client._negotiate()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return client
        assert scope.cancelled_caught
        raise QmpTimeout(f"QMP socket {path}: no greeting within {timeout:g} s")

    async def _negotiate(self) -> None:
        greeting = _decode(await self._reader.readline())
        if not isinstance(greeting.get("QMP"), dict):
            raise QmpProtocolError(f"QMP greeting expected, got {str(greeting)[:120]}")
        self.greeting = greeting["QMP"]
        await self._send({"execute": "qmp_capabilities", "id": 0})
        while True:  # events may come before the answer
            message = _decode(await self._reader.readline())
            if "event" in message:
                self._deliver(message)
                continue
            if "error" in message:
                error = message["error"] if isinstance(message["error"], dict) else {}
                raise QmpCommandError(
                    "qmp_capabilities", str(error.get("class", "?")), str(error.get("desc", ""))
                )
            if "return" in message:
                return
            raise QmpProtocolError(f"unexpected QMP answer to qmp_capabilities: {str(message)[:120]}")

    async def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        data = json.dumps(message).encode() + b"\n"
        async with self._send_lock:
            try:
                if fds:
                    data = data[await self._send_fds(data, fds) :]
                if data:
                    await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as err:
                raise QmpClosed(f"QMP connection lost: {err}") from err

    async def _send_fds(self, data: bytes, fds: list[int]) -> int:
        """One ``sendmsg`` of (the start of) ``data`` with ``fds`` as SCM_RIGHTS; returns the bytes sent.
        QEMU takes the fds with the bytes they came with (its chardev keeps the last ones received)."""
        sock = getattr(self._stream, "socket", None)
        if sock is None or sock.family != socket.AF_UNIX:
            raise QmpError("QMP: fds can only be passed over a unix socket")
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        return int(await sock.sendmsg([data], rights))

    def _deliver(self, message: dict[str, Any]) -> None:
        try:
            self._on_event(message)
        except Exception:  # a bad callback must not end the reader
            log.exception("QMP event handler failed on %s", message.get("event"))

    async def run(self) -> None:
        """Read until the stream ends: answers go to their `execute`, events to ``on_event``. Never raises a
        QMP error (it is kept and given to every pending and later `execute`)."""
        try:
            while True:
                message = _decode(await self._reader.readline())
                if "event" in message:
                    self._deliver(message)
                    continue
                ident = message.get("id")
                if not isinstance(ident, int) or isinstance(ident, bool) or ident not in self._waiting:
                    log.warning("QMP answer for no pending command, ignored: %s", str(message)[:120])
                    continue
                self._waiting.pop(ident).send_nowait(message)
        except QmpError as err:
            self._failure = err
        except Exception as err:  # never out of the reader: the back-end runs it as a system task
            log.exception("QMP reader failed")
            self._failure = QmpProtocolError(f"QMP reader failed: {err!r}")
        finally:
            failure = self._failure or QmpClosed("QMP connection closed")
            self._failure = failure
            for channel in self._waiting.values():
                channel.send_nowait(failure)
            self._waiting.clear()
            self.closed.set()
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)

    async def execute(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (each command has its own budget)
        *,
        fds: list[int] | None = None,
    ) -> Any:
        """Run ``command`` and return its ``return`` value; `QmpCommandError` for QEMU's error answer,
        `QmpTimeout`, `QmpClosed` or `QmpProtocolError` otherwise. ``fds`` are sent with the command
        (SCM_RIGHTS); the caller keeps its own copies and closes them."""
        if self._failure is not None:
            raise type(self._failure)(str(self._failure))
        ident = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any] | QmpError](1)
        self._waiting[ident] = send
        message: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            message["arguments"] = arguments
        try:
            with trio.move_on_after(timeout):
                await self._send(message, fds)
                answer = await receive.receive()
                if isinstance(answer, QmpError):
                    raise type(answer)(f"QMP {command}: {answer}")
                if "error" in answer:
                    error = answer["error"] if isinstance(answer["error"], dict) else {}
                    raise QmpCommandError(command, str(error.get("class", "?")), str(error.get("desc", "")))
                if "return" not in answer:
                    raise QmpProtocolError(f"QMP {command}: answer without return: {str(answer)[:120]}")
                return answer["return"]
            raise QmpTimeout(f"QMP {command}: no answer within {timeout:g} s")
        finally:
            self._waiting.pop(ident, None)

    async def pass_fd(
        self,
        name: str,
        fd: int,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 (each command has its own budget)
    ) -> None:
        """Give QEMU a copy of ``fd`` under ``name`` (QMP ``getfd``), for a later command's ``fd=<name>``
        (``netdev_add``); ``closefd`` drops one that no command used."""
        await self.execute("getfd", {"fdname": name}, timeout, fds=[fd])

    async def aclose(self) -> None:
        """Close the socket (`run` then ends)."""
        await trio.aclose_forcefully(self._stream)
