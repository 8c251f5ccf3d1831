"""What the back-ends share: the kernel parameters every guest gets, the serial console sink, netns paths."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from pathlib import Path

from kata_shim._ratelimit import LineRateLimit

BASE_CMDLINE = "console=ttyS0 reboot=k panic=1"
"""Kernel parameters every guest gets; `quiet` is added unless `enable_debug` (each console byte is a VM
exit, which costs ~1 ms under nested virtualisation), then `kernel_params` from the config."""
CONSOLE_TAIL_BYTES = 8192


class ConsoleSink:
    """Receives serial output on VMM threads: logs whole lines, keeps the last bytes for error messages.

    Lines are logged at most at `LineRateLimit`'s rate (the guest decides how much it prints); dropped
    lines are counted (``rate_limit.dropped``) and still reach the tail kept for error messages.
    """

    def __init__(
        self, logger: logging.Logger, limit: int = CONSOLE_TAIL_BYTES, rate_limit: LineRateLimit | None = None
    ) -> None:
        self._log = logger
        self._limit = limit
        self.rate_limit = rate_limit or LineRateLimit("guest console")
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_size = 0
        self._partial = bytearray()
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self._lock:
            self._tail.append(bytes(data))
            self._tail_size += len(data)
            while self._tail_size > self._limit and len(self._tail) > 1:
                self._tail_size -= len(self._tail.popleft())
            self._partial += data
            *done, rest = self._partial.split(b"\n")
            lines = [bytes(line) for line in done]
            self._partial = bytearray(rest)
            if len(self._partial) > self._limit:  # a guest that never ends a line
                lines.append(bytes(self._partial))
                self._partial.clear()
        for line in lines:
            if self.rate_limit.allow():
                self._log.info("guest console: %s", line.rstrip(b"\r").decode(errors="replace"))

    def tail(self, max_lines: int = 40) -> str:
        """The last console lines (at most ``max_lines``), for an error message."""
        with self._lock:
            text = b"".join(self._tail)[-self._limit :].decode(errors="replace")
        return "\n".join(text.replace("\r", "").splitlines()[-max_lines:])


def netns_path(netns: str) -> Path:
    """A netns given by name (as ``ip netns`` names them, under /run/netns) or by path."""
    return Path(netns) if netns.startswith("/") else Path("/run/netns") / netns


def boot_report(vcpu_tids: list[int], console_tail: str, started: float) -> str:
    """Why a guest may be late, for the error when its agent does not answer: the seconds since start, the
    host's load, the CPU seconds each vCPU thread used (near the wall time: the guest ran and is slow or
    stuck; near zero: it was starved or blocked), and the console's last lines."""
    tick = os.sysconf("SC_CLK_TCK")
    cpus = []
    for tid in vcpu_tids:
        try:
            fields = Path(f"/proc/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            cpus.append(f"{tid} gone")
            continue
        cpus.append(f"{tid} {(int(fields[11]) + int(fields[12])) / tick:.1f} s")
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    since = time.monotonic() - started
    lines = [
        f"{since:.0f} s since the VM started; host load {load} on {os.cpu_count()} CPUs; "
        f"vCPU threads' CPU time: {', '.join(cpus) or 'none known'}",
        f"guest console (last lines):\n{console_tail}" if console_tail else "the guest console is empty",
    ]
    return "\n".join(lines)
