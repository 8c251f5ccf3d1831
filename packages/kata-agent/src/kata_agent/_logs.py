"""JSON log lines, and a broadcaster that streams them to whoever connects to port 1025."""

from __future__ import annotations

import contextlib
import json
import logging
import time

import trio

_STD = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, source, msg and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "source": "agent",
            "name": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and key not in entry:
                entry[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class LogBroadcaster(logging.Handler):
    """A logging handler that queues formatted lines for every connected log reader.

    Lines logged before anyone connects are kept (up to `backlog`) and sent to the first reader;
    a reader that falls behind by more than `backlog` lines loses the oldest.
    """

    def __init__(self, backlog: int = 1000) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self._token = trio.lowlevel.current_trio_token()
        self._readers: list[trio.MemorySendChannel[bytes]] = []
        self._early: list[bytes] = []
        self._backlog = backlog

    def emit(self, record: logging.LogRecord) -> None:
        line = (self.format(record) + "\n").encode()
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._push, line)

    def _push(self, line: bytes) -> None:
        if not self._readers:
            self._early = [*self._early[-self._backlog + 1 :], line]
        for send in list(self._readers):
            try:
                send.send_nowait(line)
            except trio.WouldBlock:
                pass
            except trio.BrokenResourceError:
                self._readers.remove(send)

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Send log lines to one reader until it goes away."""
        send, receive = trio.open_memory_channel[bytes](self._backlog)
        for line in self._early:
            send.send_nowait(line)
        self._early = []
        self._readers.append(send)
        try:
            async with stream, receive:
                async for line in receive:
                    await stream.send_all(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if send in self._readers:
                self._readers.remove(send)
