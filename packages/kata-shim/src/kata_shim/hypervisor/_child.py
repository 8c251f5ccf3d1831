"""A child process the shim supervises (an external VMM, virtiofsd): pid, start time, exit, signals."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable

import trio

from kata_shim.persist import process_start_time


class Child:
    """A supervised child process: its pid, its start time (recorded for crash cleanup: it tells the pid
    from a reuse), and `exited` (set by the supervising task once the process has been reaped)."""

    def __init__(self, name: str, process: trio.Process) -> None:
        self.name = name
        self.process = process
        self.pid = process.pid
        self.start_time = process_start_time(process.pid) or 0
        self.exited = trio.Event()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is None:
            return f"{self.name} is running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"{self.name} killed by {signal.Signals(-code).name}"
            return f"{self.name} killed by signal {-code}"
        return f"{self.name} exited with code {code}"

    async def wait_draining(self, sink: Callable[[bytes], None]) -> None:
        """Feed the child's output to ``sink`` until it exits, then give the output `DRAIN_GRACE` seconds.

        The exit is watched apart from the output: a grandchild holding the pipe (virtiofsd's sandbox child)
        must not hide it, and the grace lets a start failure quote the child's last words."""
        stdout = self.process.stdout
        drained = trio.Event()

        async def drain() -> None:
            try:
                if stdout is not None:
                    with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError, OSError):
                        while data := await stdout.receive_some(65536):
                            sink(bytes(data))
            finally:
                drained.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await self.process.wait()
            with trio.move_on_after(DRAIN_GRACE):
                await drained.wait()
            nursery.cancel_scope.cancel()


DRAIN_GRACE = 1.0
"""Seconds a child's output may still arrive after its exit."""
