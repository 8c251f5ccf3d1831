"""The agent process: ttrpc on port 1024 (or a unix path), logs on port 1025, sandbox state."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from functools import partial

import trio

from kata_agent._listen import open_listener
from kata_agent._logs import LogBroadcaster, agent_loggers
from kata_agent._passfd import open_passfd_listener
from kata_agent._service import AgentConfig, AgentService, HealthService, become_subreaper
from kata_proto import ttrpc
from kata_proto.agent import AGENT_SERVICE, HEALTH_SERVICE


@asynccontextmanager
async def open_agent(
    listen: str, config: AgentConfig, *, log_listen: str | None = None, subreaper: bool = True
) -> AsyncIterator[AgentService]:
    """Serve the agent API on `listen` (and logs on `log_listen`) while the block runs.

    On exit every container is destroyed and every storage unmounted.
    """
    if subreaper:
        become_subreaper()
    loggers = agent_loggers()
    broadcaster: LogBroadcaster | None = None
    listener, path = await open_listener(listen)
    log_listener = log_path = None
    try:
        if log_listen:
            log_listener, log_path = await open_listener(log_listen)
            broadcaster = LogBroadcaster()
            for logger in loggers:
                logger.addHandler(broadcaster)
                if logger.level == logging.NOTSET:
                    logger.setLevel(logging.INFO)
        async with trio.open_nursery() as nursery:
            service = AgentService(config, nursery)
            server = ttrpc.TtrpcServer()
            server.register(AGENT_SERVICE, service)
            server.register(HEALTH_SERVICE, HealthService())
            await nursery.start(partial(trio.serve_listeners, server.serve_stream, [listener]))
            if log_listener is not None and broadcaster is not None:
                await nursery.start(partial(trio.serve_listeners, broadcaster.serve_stream, [log_listener]))
            if config.passfd_port:
                passfd_listener = await open_passfd_listener(config.passfd_port)
                await nursery.start(service.passfd.serve, passfd_listener)
            loggers[0].info("agent ready", extra={"listen": listen})
            try:
                yield service
            finally:
                await service.close()
                nursery.cancel_scope.cancel()
    finally:
        if broadcaster is not None:
            for logger in loggers:
                logger.removeHandler(broadcaster)
        for p in (path, log_path):
            if p:
                with suppress(FileNotFoundError):
                    os.unlink(p)
