"""A child process the shim supervises (an external VMM, virtiofsd): pid, start time, exit, signals."""

from __future__ import annotations

import contextlib
import signal

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
