"""How long each step of a sandbox's start took, for the shim log at debug level (issue 16's lean start path).

`Steps` marks the end of each named step of one operation and renders them as one line
("total 24.31 s: shared-dir 0.01, network 0.32, vm 1.40, agent 22.43, create-sandbox 0.15");
`process_age` is how long ago this process was exec'd (the interpreter's start-up and imports before
any of our code ran), read from /proc/self/stat. Standard library only: `start` imports it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

from kata_shim._proc import start_ticks


class Steps:
    """Wall time of the named steps of one operation, in order; a step's time runs from the previous mark."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._start = self._last = clock()
        self._steps: list[tuple[str, float]] = []

    def mark(self, name: str) -> float:
        """End step ``name`` now; its seconds."""
        now = self._clock()
        took = now - self._last
        self._steps.append((name, took))
        self._last = now
        return took

    def items(self) -> list[tuple[str, float]]:
        """The marked steps and their seconds, in order."""
        return list(self._steps)

    def elapsed(self) -> float:
        """Seconds from creation to now (the step under way included)."""
        return self._clock() - self._start

    def total(self) -> float:
        """Seconds from creation to the last mark."""
        return self._last - self._start

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {took:.2f}" for name, took in self._steps)
        return f"total {self.total():.2f} s: {parts}" if parts else "no step"


ENV_STARTED_AT = "KATA_SHIM_STARTED_AT"
"""Set in a zygote's fork that runs a command for a client process: when that client was exec'd
(boot-time clock, seconds), which `process_age` then counts from."""


def process_age(stat_path: str = "/proc/self/stat") -> float | None:
    """Seconds since this process was exec'd (boot-time clock against its start time), or since the
    client it stands in for was (`ENV_STARTED_AT`), or None when /proc does not say."""
    started_at = os.environ.get(ENV_STARTED_AT)
    if started_at and stat_path == "/proc/self/stat":
        with contextlib.suppress(ValueError):
            return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - float(started_at))
    try:
        started = start_ticks(stat_path) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
