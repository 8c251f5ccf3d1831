"""The exceptions kata-vmm raises: one base class, subclasses named for what failed."""

from __future__ import annotations

import errno as _errno
import os

from kata_virtio import GuestAddressError


class VmmError(Exception):
    """Base class of every error kata-vmm raises."""


class KvmError(VmmError):
    """Raised when a KVM ioctl (or another system call on a KVM fd) fails; carries the operation and errno."""

    def __init__(self, op: str, errno: int, detail: str = "") -> None:
        self.op = op
        self.errno = errno
        name = _errno.errorcode.get(errno, str(errno))
        message = f"{op} failed: {name} ({os.strerror(errno)})"
        super().__init__(f"{message}: {detail}" if detail else message)


class GuestMemoryError(VmmError, GuestAddressError):
    """Raised when a guest-physical range is not wholly inside guest RAM."""


class ConfigError(VmmError):
    """Raised when a VM configuration is invalid (memory size, vCPU count, paths, command line)."""


class KernelLoadError(VmmError):
    """Raised when a kernel or initrd is missing, unreadable, corrupt or does not fit in guest memory."""


class VmStateError(VmmError):
    """Raised when an operation is not allowed in the VM's current state (e.g. pause before start)."""


class GuestCrashError(VmmError):
    """Raised (or reported) when the guest stops abnormally: triple fault, failed entry, internal error."""


class SnapshotError(VmmError):
    """Raised when a snapshot cannot be written, or a snapshot directory is missing, corrupt, of another
    format version, or does not fit the VM it is restored into."""
