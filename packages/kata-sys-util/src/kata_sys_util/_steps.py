"""How long each step of one operation took, for a debug log line (the shim's sandbox start, the agent's
CreateContainer).

`Steps` marks the end of each named step and renders them as one line
("total 24.31 s: shared-dir 0.01, network 0.32, vm 1.40, agent 22.43, create-sandbox 0.15").
"""

from __future__ import annotations

import time
from collections.abc import Callable


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
