"""Copying between containerd's stdio fifos and the agent's ReadStdout/ReadStderr/WriteStdin, on trio tasks.

Fifos are opened non-blocking so no open(2) ever blocks the trio thread:
- output fifos O_RDWR (never ENXIO when containerd's reader is not there yet; containerd's own shims keep
  both ends too), written through a `trio.lowlevel.FdStream`;
- the stdin fifo O_RDONLY, read only after epoll reports it readable: a fifo that never had a writer
  reads as EOF at once, but polls readable only once a writer has come (and gone).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

import trio

from kata_agent_client import AgentError

log = logging.getLogger("kata_shim.virt_container")

CHUNK = 64 * 1024
#: Errors that mean the agent (or the VM) is gone: a copy ends as if at EOF.
AGENT_GONE = (AgentError, OSError)
"""What ends a stdio copy: the agent refused or went away, or the fifo did."""


def open_output_fifo(path: str) -> int:
    """Open a stdout/stderr fifo for writing without blocking; returns the fd."""
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


async def copy_output(read: Callable[[], Awaitable[bytes]], fd: int | None, *, name: str = "stdout") -> None:
    """Read from the agent until EOF and write to `fd` (closed at the end); no fd: discard.

    A reader that went away does not stop the draining: the process must not block on a full pipe.
    """
    out = trio.lowlevel.FdStream(fd) if fd is not None else None
    try:
        while True:
            try:
                chunk = await read()
            except AGENT_GONE as err:
                log.debug("%s copy ends: %s", name, err)
                break
            if not chunk:
                break
            if out is not None:
                try:
                    await out.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await out.aclose()
                    out = None
    finally:
        if out is not None:
            with trio.CancelScope(shield=True):
                await out.aclose()


class StdinCopy:
    """Copies containerd's stdin fifo to WriteStdin; EOF (or `close`) sends the empty write that closes
    the process's stdin."""

    def __init__(self, path: str, write: Callable[[bytes], Awaitable[int]]) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._write = write
        self._wait_scope: trio.CancelScope | None = None
        self._closing = False
        self.started = False
        self.done = trio.Event()

    def discard(self) -> None:
        """Close the fifo of a copy that never ran."""
        if not self.started:
            self.started = True
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self.done.set()

    def close(self) -> None:
        """Finish: forward what is readable now, then close the process's stdin (CloseIO)."""
        self._closing = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()

    async def run(self) -> None:
        """Copy until EOF or `close`; always ends with the empty write and the fd closed."""
        if self.started:
            return
        self.started = True
        fd = self._fd
        try:
            eof = False
            while not eof and not self._closing:
                with trio.CancelScope() as self._wait_scope:
                    await trio.lowlevel.wait_readable(fd)
                self._wait_scope = None
                eof = await self._drain(fd)
            if not eof:
                await self._drain(fd)
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self._write(b"")
        except AGENT_GONE as err:
            log.debug("stdin copy ends: %s", err)
        finally:
            with contextlib.suppress(OSError):
                trio.lowlevel.notify_closing(fd)
                os.close(fd)
            self.done.set()

    async def _drain(self, fd: int) -> bool:
        """Forward what can be read now; True at EOF."""
        while True:
            try:
                data = os.read(fd, CHUNK)
            except BlockingIOError:
                return False
            if not data:
                return True
            view = memoryview(data)
            while view:
                n = await self._write(bytes(view))
                view = view[n if n > 0 else len(view) :]
