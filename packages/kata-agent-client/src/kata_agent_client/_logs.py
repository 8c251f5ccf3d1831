"""The log forwarder: the agent's JSON lines from port 1025 re-emitted on a Python logger."""

from __future__ import annotations

import json
import logging

import trio

from kata_agent_client._connect import LOG_PORT, AgentAddress, connect

# Upstream's agent writes slog's four-letter levels (TRCE, DEBG, INFO, WARN, ERRO, CRIT).
_LEVELS = {
    "trce": logging.DEBUG,
    "debg": logging.DEBUG,
    "erro": logging.ERROR,
    "crit": logging.CRITICAL,
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "critical": logging.CRITICAL,
}
_MAX_LINE = 1 << 20


def forward_line(line: bytes, logger: logging.Logger) -> None:
    """Log one agent line: JSON objects at their level with their fields as `agent` extra; text as is."""
    text = line.decode(errors="replace").rstrip("\r\n")
    if not text:
        return
    try:
        entry = json.loads(text)
    except (ValueError, RecursionError):  # the guest writes this port: nesting past the limit is text too
        entry = None
    if not isinstance(entry, dict):
        logger.info("%s", text, extra={"agent": {}})
        return
    level = _LEVELS.get(str(entry.get("level", "info")).lower(), logging.INFO)
    logger.log(level, "%s", entry.get("msg", ""), extra={"agent": entry})


async def forward_logs(
    address: str | AgentAddress,
    logger: logging.Logger | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Connect to the agent's log port and forward every line to `logger` until the stream ends."""
    addr = AgentAddress.parse(address) if isinstance(address, str) else address
    if (addr.kind != "unix" and addr.port != LOG_PORT) or (
        addr.kind == "unix" and not addr.path.endswith(".log")
    ):
        addr = addr.with_port(LOG_PORT)
    logger = logger or logging.getLogger("kata_agent_client.agent")
    stream = await connect(addr)
    task_status.started()
    buf = b""
    async with stream:
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                forward_line(line, logger)
            if len(buf) > _MAX_LINE:
                forward_line(buf, logger)
                buf = b""
    if buf:
        forward_line(buf, logger)
