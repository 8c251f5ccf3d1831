"""Thin ctypes access to the libc calls Python's standard library does not offer: ``ioctl`` and ``eventfd``.

``ioctl`` goes through ctypes rather than ``fcntl.ioctl``: ctypes releases the
GIL for the call (a vCPU thread blocks in KVM_RUN for a long time), takes
unsigned request and argument values (KVM_SET_TSS_ADDR's 0xfffbd000 overflows
``fcntl``'s C int) and has no 1024-byte buffer limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any, Self

from kata_sys_util import set_thread_name
from kata_vmm._errors import KvmError

_libc = ctypes.CDLL(None, use_errno=True)

_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int

_eventfd = _libc.eventfd
_eventfd.argtypes = [ctypes.c_uint, ctypes.c_int]
_eventfd.restype = ctypes.c_int

EFD_CLOEXEC = 0o2000000
EFD_NONBLOCK = 0o4000
EFD_SEMAPHORE = 1


def ioctl(fd: int, request: int, arg: Any = 0, *, op: str) -> int:
    """Issue ``ioctl(fd, request, arg)`` and return its non-negative result.

    ``arg`` is an integer passed by value or a ctypes object passed by reference.
    Raises `KvmError` naming ``op`` with the errno on failure.
    """
    if isinstance(arg, int):
        ptr: Any = arg
    else:
        ptr = ctypes.byref(arg)
    ret = _ioctl(fd, request, ptr)
    if ret < 0:
        raise KvmError(op, ctypes.get_errno())
    return int(ret)


class NamedThread(threading.Thread):
    """A daemon thread whose OS name is its Python name by the time `start` returns.

    The thread names itself first thing, and `start` waits for that, so nobody listing
    /proc/<pid>/task right after start sees the creator's name on it.
    """

    def __init__(self, target: Callable[[], None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._body = target
        self._named = threading.Event()

    def start(self) -> None:
        super().start()
        self._named.wait()

    def run(self) -> None:
        try:
            # Python's `threading` names stay inside Python; without this the thread shows the name of
            # whichever thread created it (an asyncio or trio worker) in ps, top and /proc
            with contextlib.suppress(OSError):
                set_thread_name(self.name)
        finally:
            self._named.set()
        self._body()


def eventfd(initval: int = 0, flags: int = EFD_CLOEXEC | EFD_NONBLOCK) -> int:
    """Create an eventfd and return its descriptor (close-on-exec and non-blocking by default)."""
    fd = _eventfd(initval, flags)
    if fd < 0:
        err = ctypes.get_errno()
        raise KvmError("eventfd", err) from OSError(err, os.strerror(err))
    return int(fd)


class FdHandle:
    """Owns one file descriptor: `close` closes it once (then ``fd`` is -1), as does leaving a ``with``."""

    fd: int

    def fileno(self) -> int:
        """The descriptor (for epoll/select)."""
        return self.fd

    def close(self) -> None:
        """Close the descriptor; closing twice is harmless."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
