"""eventfd wrappers: a plain `EventFd`, an `IrqFd` (interrupt line) and an `IoEventFd` (guest doorbell)."""

from __future__ import annotations

import contextlib
import os

from kata_vmm._errors import KvmError
from kata_vmm._kvm import Vm
from kata_vmm._sys import FdHandle, eventfd


class EventFd(FdHandle):
    """A non-blocking, close-on-exec eventfd counter."""

    def __init__(self, initval: int = 0) -> None:
        self.fd = eventfd(initval)

    def write(self, value: int = 1) -> None:
        """Add ``value`` to the counter."""
        # a saturated counter means the reader will wake anyway
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.fd, value)

    def read(self) -> int:
        """Take and reset the counter; 0 when nothing was signalled."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0


class IrqFd(EventFd):
    """An eventfd bound to a GSI of the in-kernel irqchip; satisfies ``kata_virtio.InterruptTrigger``."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        super().__init__()
        self.vm = vm
        self.gsi = gsi
        try:
            vm.irqfd(self.fd, gsi)
        except KvmError:
            super().close()
            raise

    def trigger(self) -> None:
        """Raise the interrupt (edge); safe from any thread, never blocks, no VM exit."""
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        """Unbind from the GSI and close."""
        if self.fd >= 0:
            try:
                if self.vm.fd >= 0:
                    self.vm.irqfd(self.fd, self.gsi, deassign=True)
            finally:
                super().close()


class IoEventFd(EventFd):
    """An eventfd KVM signals when the guest writes a (PIO or MMIO) address, without a userspace exit."""

    def __init__(
        self, vm: Vm, addr: int, length: int, *, datamatch: int | None = None, pio: bool = False
    ) -> None:
        super().__init__()
        self.vm = vm
        self._args = (addr, length, datamatch, pio)
        try:
            vm.ioeventfd(self.fd, addr, length, datamatch=datamatch, pio=pio)
        except KvmError:
            super().close()
            raise

    def close(self) -> None:
        """Unregister and close."""
        if self.fd >= 0:
            addr, length, datamatch, pio = self._args
            try:
                if self.vm.fd >= 0:
                    self.vm.ioeventfd(self.fd, addr, length, datamatch=datamatch, pio=pio, deassign=True)
            finally:
                super().close()
