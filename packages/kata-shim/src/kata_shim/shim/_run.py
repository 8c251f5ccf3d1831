"""Run mode: the long-running shim. Serves containerd.task.v2.Task and containerd.runtime.sandbox.v1.Sandbox
on its socket, forwards events to containerd, and exits on a Shutdown that finds no container left, on
ShutdownSandbox (or on SIGTERM/SIGINT), after stopping the sandbox and removing its socket and state."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from functools import partial
from pathlib import Path
from typing import NoReturn

import trio

from kata_proto import ttrpc
from kata_proto.containerd import SANDBOX_SERVICE, TASK_SERVICE
from kata_shim._steps import process_age
from kata_shim.message import MessageDispatcher, RuntimeHandlerManager
from kata_shim.service import EventPublisher, SandboxService, TaskService
from kata_shim.shim._address import socket_address
from kata_shim.shim._delete import mark_shutting_down
from kata_shim.shim._flags import ShimFlags
from kata_shim.shim._log import setup_logging
from kata_shim.shim._start import ENV_CONFIG_PATH, ENV_LISTEN_FD, ENV_READY_FD, ENV_START_EXEC, bind_socket
from kata_shim.shim._zygote import ENV_SPAWN
from kata_shim.shim._zygote import spawn as spawn_zygote
from kata_sys_util import Steps

log = logging.getLogger("kata_shim")

EVENT_FLUSH_TIMEOUT = 2.0
"""Seconds the exiting shim waits for queued events to reach containerd."""


def _report_ready(message: str) -> None:
    fd = os.environ.pop(ENV_READY_FD, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(int(fd), (message.replace("\n", " ") + "\n").encode())
        os.close(int(fd))


async def serve(
    flags: ShimFlags, sock: socket.socket, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve until Shutdown or a termination signal."""
    path = sock.getsockname()
    address = f"unix://{path}"
    publisher = EventPublisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)
    manager = RuntimeHandlerManager(
        flags.id,
        namespace=flags.namespace,
        shim_address=address,
        default_config_path=os.environ.pop(ENV_CONFIG_PATH, ""),
    )
    dispatcher = MessageDispatcher(manager, publisher.publish)
    server = ttrpc.TtrpcServer()
    server.register(TASK_SERVICE, TaskService(dispatcher))
    server.register(SANDBOX_SERVICE, SandboxService(dispatcher))
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            await nursery.start(partial(trio.serve_listeners, server.serve_stream, [listener]))
            nursery.start_soon(_watch_signals, dispatcher)
            log.info("shim %s serving %s (namespace %s)", flags.id, address, flags.namespace)
            log.debug(
                "shim %s: %s",
                flags.id,
                startup_line(
                    os.environ.pop(ENV_START_EXEC, ""), process_age(), time.clock_gettime(time.CLOCK_BOOTTIME)
                ),
            )
            task_status.started()
            await dispatcher.shutdown_requested.wait()
            log.info("shim %s shutting down", flags.id)
            steps = Steps()
            mark_shutting_down(Path(flags.bundle or os.getcwd()))
            # Let the Shutdown reply leave before the connection goes.
            await trio.sleep(0.05)
            await manager.shutdown()
            steps.mark("sandbox")
            with trio.move_on_after(EVENT_FLUSH_TIMEOUT):
                await publisher.wait_idle()
            steps.mark("events")
            log.debug("shim %s: shut down, %s", flags.id, steps)
            nursery.cancel_scope.cancel()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def startup_line(start_exec: str, age: float | None, now: float) -> str:
    """How long this shim took to serve since its exec (``age``: interpreter start-up, imports, listening)
    and, given ``start_exec`` (`ENV_START_EXEC`, boot-time clock), since containerd ran `start`."""
    line = f"serving {age:.2f} s after its exec" if age is not None else "serving (exec time unknown)"
    with contextlib.suppress(ValueError):
        line += f", {now - float(start_exec):.2f} s after `start` was exec'd"
    return line


async def _watch_signals(dispatcher: MessageDispatcher) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("shim: %s received, stopping", signal.Signals(signum).name)
            dispatcher.shutdown_requested.set()


async def _main(flags: ShimFlags, sock: socket.socket) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, flags, sock))
        _report_ready("ok")


def run(flags: ShimFlags) -> int:
    """Run mode entry point: returns the process exit status."""
    if os.environ.pop(ENV_SPAWN, None) == "1":
        spawn_zygote()  # first: nothing runs yet, and the next `start` forks from it
    bundle = Path(flags.bundle or os.getcwd())
    setup_logging(bundle, flags.debug)
    try:
        fd = os.environ.pop(ENV_LISTEN_FD, None)
        if fd is not None:
            sock = socket.socket(fileno=int(fd))
        else:
            sock = bind_socket(socket_address(flags.address, flags.namespace, flags.id))
        sock.setblocking(False)
        sock.set_inheritable(False)  # never leak the listener into a helper process
        ready = os.environ.get(ENV_READY_FD)
        if ready is not None:
            os.set_inheritable(int(ready), False)
    except OSError as err:
        _report_ready(f"cannot listen: {err}")
        return 1
    try:
        trio.run(_main, flags, sock)
    except BaseException as err:
        log.exception("shim failed")
        _report_ready(f"shim failed: {type(err).__name__}: {err}")
        return 1
    log.debug("shim %s: exiting", flags.id)
    return 0


def exit_now(status: int) -> NoReturn:
    """Leave the run-mode process without the interpreter's teardown (collecting every object, joining
    threads): containerd's `delete` waits for the shim to be gone, and by now all it had is closed.
    Logging and stdio are flushed first."""
    with contextlib.suppress(Exception):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)
