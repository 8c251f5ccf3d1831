"""The guest-memory and interrupt interfaces kata-virtio needs from a VMM.

kata-virtio has no KVM code: a VMM (kata-vmm, or a vhost-user back-end) hands a
device an object satisfying `GuestMemory` and one `InterruptTrigger` per
interrupt line, and the device logic works the same on any transport.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class VirtioError(Exception):
    """Base class of every error kata-virtio raises."""


class GuestAddressError(VirtioError):
    """Raised when a guest-physical range is not wholly inside guest memory."""


DISCARD_ALIGN = 4096
"""`GuestMemory.discard` works on whole 4 KiB pages (the balloon's PFN unit, x86's page size)."""


@runtime_checkable
class GuestMemory(Protocol):
    """Bounds-checked access to guest-physical memory.

    Every method raises `GuestAddressError` (or a subclass) when any byte of
    ``[addr, addr + size)`` lies outside guest RAM; it never touches memory
    outside the guest's regions.
    """

    def read(self, addr: int, size: int) -> bytes:
        """Copy ``size`` bytes starting at guest-physical ``addr``."""
        ...

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at guest-physical ``addr``."""
        ...

    def view(self, addr: int, size: int) -> memoryview:
        """A writable zero-copy view of ``[addr, addr + size)``; the range must lie in one region."""
        ...

    def discard(self, addr: int, size: int) -> None:
        """Give the host memory behind ``[addr, addr + size)`` back (MADV_DONTNEED/MADV_REMOVE).

        ``addr`` and ``size`` must be multiples of `DISCARD_ALIGN` and the whole range guest RAM, else
        `GuestAddressError` and nothing is discarded. Afterwards the range reads as zeros (or, for RAM
        mapped copy-on-write from a snapshot file, as the file); the guest may use it again at once.
        Used by virtio-balloon (inflate, free page reporting) and virtio-mem (unplug).
        """
        ...


@runtime_checkable
class InterruptTrigger(Protocol):
    """One interrupt line into the guest (an irqfd in kata-vmm)."""

    def trigger(self) -> None:
        """Raise the interrupt (edge); safe to call from any thread."""
        ...
