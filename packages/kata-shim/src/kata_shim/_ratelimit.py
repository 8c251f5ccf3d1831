"""A token bucket for lines the guest makes the shim log (serial console, agent log stream).

The guest decides how much it prints; the shim's log (containerd's `log` fifo) is not its to flood.
`LineRateLimit` lets ``rate`` lines a second through with bursts of ``burst``, counts what it drops and
says so once in the shim log (on ``kata_shim.ratelimit``, not on the limited logger).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

_notice = logging.getLogger("kata_shim.ratelimit")

#: Lines a second a guest source may log once its burst is spent.
LINES_PER_SECOND = 100.0
#: Lines logged back to back before the rate applies (a boot's worth of console output).
LINES_BURST = 1000


class LineRateLimit(logging.Filter):
    """Token bucket over lines; thread-safe. Use `allow()` directly or add it as a logger filter."""

    def __init__(
        self,
        what: str,
        *,
        rate: float = LINES_PER_SECOND,
        burst: int = LINES_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.what = what
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock()
        self._lock = threading.Lock()
        #: Lines dropped so far.
        self.dropped = 0

    def allow(self) -> bool:
        """Take one token: True to log the line, False to drop it (counted)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            self.dropped += 1
            first = self.dropped == 1
        if first:
            _notice.warning(
                "%s: the guest logs more than %g lines a second (bursts of %d); lines past that are"
                " dropped and counted, and this is said only once",
                self.what,
                self.rate,
                self.burst,
            )
        return False

    def filter(self, record: logging.LogRecord) -> bool:
        """logging.Filter: pass the record while tokens last."""
        return self.allow()
