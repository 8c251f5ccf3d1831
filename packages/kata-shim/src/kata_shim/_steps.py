"""How long ago this process was exec'd, for the shim log at debug level (issue 16's lean start path).

`process_age` is how long ago this process was exec'd (the interpreter's start-up and imports before
any of our code ran), read from /proc/self/stat. Standard library only: `start` imports it. The steps of
one operation are `kata_sys_util.Steps`.
"""

from __future__ import annotations

import contextlib
import os
import time

from kata_shim._proc import start_ticks

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
