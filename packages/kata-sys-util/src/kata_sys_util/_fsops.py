"""File-system calls the standard library lacks, for a server that works on directory fds (virtio-fs):
openat2 with any resolve flags, chown of an O_PATH fd, renameat2, fallocate with a mode, getdents64."""

from __future__ import annotations

import ctypes
import os
import struct

from kata_sys_util._libc import check, libc

# <linux/openat2.h>, Linux 6.1
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
SYS_openat2 = 437  # same number on every architecture (asm-generic/unistd.h)
SYS_getdents64 = 217  # x86-64
# <fcntl.h>
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000


class open_how(ctypes.Structure):
    """struct open_how, <linux/openat2.h>."""

    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_DIRENT64 = struct.Struct("<QqHB")  # d_ino d_off d_reclen d_type, then the NUL-terminated name


def openat2(dirfd: int, name: str, flags: int, mode: int = 0, resolve: int = RESOLVE_BENEATH) -> int:
    """openat2(2) of `name` relative to `dirfd` with `resolve` flags (O_CLOEXEC added); raises OSError."""
    how = open_how(flags | os.O_CLOEXEC, mode, resolve)
    fd = libc().syscall(SYS_openat2, dirfd, os.fsencode(name), ctypes.byref(how), ctypes.sizeof(how))
    return int(check(fd, "openat2", name))


def fchownat_empty(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", uid, gid, AT_EMPTY_PATH|AT_SYMLINK_NOFOLLOW): chown the inode behind an O_PATH fd."""
    check(libc().fchownat(fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")


def renameat2(olddir: int, old: str, newdir: int, new: str, flags: int) -> None:
    """renameat2(2) (RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT)."""
    check(libc().renameat2(olddir, os.fsencode(old), newdir, os.fsencode(new), flags), "renameat2")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with any mode (punch hole, zero range...)."""
    fn = libc().fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    check(fn(fd, mode, offset, length), "fallocate")


def getdents64(fd: int, size: int) -> list[tuple[bytes, int, int, int]]:
    """One getdents64(2) batch from the directory fd's position: (name, ino, d_off, d_type) tuples."""
    # Into a bytearray, through a c_char over its first byte: create_string_buffer would look up a
    # `c_char * size` type, which ctypes caches only weakly, so a call built a new one (a few KiB) whenever
    # the collector had taken the last, and what a READDIR allocated depended on when the GC last ran.
    buf = bytearray(size)
    start = ctypes.c_char.from_buffer(buf)
    n = int(check(libc().syscall(SYS_getdents64, fd, ctypes.byref(start), size), "getdents64"))
    data = bytes(buf[:n])
    entries = []
    pos = 0
    while pos < n:
        ino, off, reclen, dtype = _DIRENT64.unpack_from(data, pos)
        name_end = data.index(b"\0", pos + _DIRENT64.size, pos + reclen)
        entries.append((data[pos + _DIRENT64.size : name_end], ino, off & 0xFFFFFFFFFFFFFFFF, dtype))
        pos += reclen
    return entries
