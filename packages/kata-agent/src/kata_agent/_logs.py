"""JSON log lines, and a broadcaster that streams them to whoever connects to port 1025."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import trio

from kata_agent._guest import kernel_param
from kata_proto.agent import LOG_CMDLINE_PARAM

_STD = set(vars(logging.makeLogRecord({})))


# Upstream's agent logs through slog: its JSON lines name levels with these four letters, and
# runtime-rs's log forwarder reads them back (log_forwarder.rs parse_agent_log_level).
_SLOG_LEVELS = {logging.DEBUG: "DEBG", logging.INFO: "INFO", logging.WARNING: "WARN", logging.ERROR: "ERRO"}


#: Upstream's level names (slog's) and ours, as logging's names.
LOG_LEVELS = {
    "TRACE": "DEBUG",
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "WARN": "WARNING",
    "WARNING": "WARNING",
    "ERROR": "ERROR",
    "CRITICAL": "CRITICAL",
}


def log_level_from_cmdline(cmdline: str) -> str:
    """The level `agent.log=LEVEL` on a kernel command line names (the last one wins), else info."""
    level = kernel_param(cmdline, LOG_CMDLINE_PARAM)
    return "info" if level is None else level


def agent_loggers() -> tuple[logging.Logger, ...]:
    """The loggers whose records the agent writes and streams: its own and its ttrpc server's."""
    return logging.getLogger("kata_agent"), logging.getLogger("kata_proto")


class JsonFormatter(logging.Formatter):
    """One JSON object per line as upstream's agent writes them: msg, level, ts, pid, name, source, extras."""

    def format(self, record: logging.LogRecord) -> str:
        level = _SLOG_LEVELS.get(record.levelno, "CRIT" if record.levelno > logging.ERROR else "TRCE")
        entry: dict[str, object] = {
            "msg": record.getMessage(),
            "level": level,
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "pid": str(os.getpid()),
            "name": "kata-agent",
            "source": "agent",
            "subsystem": record.name.removeprefix("kata_agent").lstrip(".") or "root",
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
