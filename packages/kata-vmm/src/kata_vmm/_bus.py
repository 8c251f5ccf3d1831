"""Port-I/O and MMIO buses: map guest addresses to device objects, as vCPU exits arrive.

A vCPU thread calls `Bus.read`/`Bus.write` directly (no hop to another thread);
each device guards its own state, since several vCPUs and the event thread may
touch it at once.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kata_vmm._errors import ConfigError


@runtime_checkable
class BusDevice(Protocol):
    """A device that answers reads and writes at offsets within its bus range."""

    def read(self, offset: int, size: int) -> bytes:
        """Return ``size`` bytes read at ``offset`` from the device's base."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Accept ``data`` written at ``offset`` from the device's base."""
        ...


@dataclass(frozen=True)
class BusRange:
    """One device's place on a bus."""

    base: int
    length: int
    device: BusDevice

    @property
    def end(self) -> int:
        """First address past the range."""
        return self.base + self.length


class Bus:
    """Non-overlapping address ranges, each owned by one device; unclaimed reads return all-ones."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ranges: list[BusRange] = []
        self._bases: list[int] = []
        self._lock = threading.Lock()  # guards changes; lookups read an immutable snapshot
        self.unhandled_reads = 0
        self.unhandled_writes = 0

    def insert(self, device: BusDevice, base: int, length: int) -> BusRange:
        """Claim ``[base, base + length)`` for ``device``; raises `ConfigError` on overlap."""
        if length <= 0 or base < 0:
            raise ConfigError(f"{self.name} bus: invalid range {base:#x}+{length:#x}")
        with self._lock:
            for r in self._ranges:
                if base < r.end and r.base < base + length:
                    raise ConfigError(
                        f"{self.name} bus: {base:#x}+{length:#x} overlaps {r.base:#x}+{r.length:#x}"
                    )
            new = BusRange(base, length, device)
            ranges = sorted([*self._ranges, new], key=lambda r: r.base)
            self._ranges, self._bases = ranges, [r.base for r in ranges]
        return new

    def remove(self, base: int) -> BusDevice:
        """Release the range starting at ``base`` and return its device."""
        with self._lock:
            for r in self._ranges:
                if r.base == base:
                    ranges = [x for x in self._ranges if x is not r]
                    self._ranges, self._bases = ranges, [x.base for x in ranges]
                    return r.device
        raise ConfigError(f"{self.name} bus: nothing at {base:#x}")

    def find(self, addr: int) -> BusRange | None:
        """The range holding ``addr``, if any."""
        ranges, bases = self._ranges, self._bases
        i = bisect.bisect_right(bases, addr) - 1
        if i >= 0 and addr < ranges[i].end:
            return ranges[i]
        return None

    def read(self, addr: int, size: int) -> bytes:
        """Dispatch a guest read; unclaimed addresses read as 0xff bytes (an absent ISA/PCI device)."""
        r = self.find(addr)
        if r is None:
            self.unhandled_reads += 1
            return b"\xff" * size
        return r.device.read(addr - r.base, size)

    def write(self, addr: int, data: bytes) -> None:
        """Dispatch a guest write; writes to unclaimed addresses are dropped."""
        r = self.find(addr)
        if r is None:
            self.unhandled_writes += 1
            return
        r.device.write(addr - r.base, data)

    def devices(self) -> list[BusRange]:
        """Every range on the bus, by address."""
        return list(self._ranges)
