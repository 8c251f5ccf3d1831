"""The guest's run-able time: wall time less what a VM's vCPU thread waited for a host CPU (schedstat)."""

from __future__ import annotations

import time
from pathlib import Path


class GuestClock:
    """Seconds a VM could run: wall time minus what one of its vCPU threads (the boot vCPU) spent waiting for
    a host CPU (the run-queue wait in ``/proc/<tid>/schedstat``).

    A budget on this clock is a budget on the guest's chance to make progress: it does not run out while the
    host is busy with other VMs (ten cold boots at once on one core each get a tenth of it), and it runs as
    the wall clock for a guest that is stuck, spinning or idle, on a host with CPUs to spare. Without the
    thread's schedstat (no tid, an exited thread, a kernel without CONFIG_SCHED_INFO) it is the wall clock.
    Callers that wait on it keep a wall-time cap too: a VM that never gets a CPU never spends a budget.
    """

    def __init__(self, tid: int | None, now: float | None = None, *, proc: Path = Path("/proc")) -> None:
        self._path = proc / str(tid) / "schedstat" if tid else None
        self.started = time.monotonic() if now is None else now
        self._waited_at_start = self._run_queue_wait()
        self._last_wait = self._waited_at_start

    def _run_queue_wait(self) -> float:
        if self._path is None:
            return 0.0
        try:
            return int(self._path.read_text().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def waited(self) -> float:
        """Seconds the vCPU thread waited for a CPU since the start (the last known value once it is gone)."""
        wait = self._run_queue_wait()
        self._last_wait = max(wait, self._last_wait)
        return self._last_wait - self._waited_at_start

    def elapsed(self, now: float | None = None) -> float:
        """Wall seconds since the start, less `waited`."""
        wall = (time.monotonic() if now is None else now) - self.started
        return max(0.0, wall - self.waited())

    def now(self) -> float:
        """A monotonic clock in seconds (``time.monotonic()`` at the start) that stands still while the vCPU
        waits for a CPU: deadlines taken on it are guest time, and it can replace ``time.monotonic`` for a
        timer that started before the clock did."""
        return self.started + self.elapsed()
