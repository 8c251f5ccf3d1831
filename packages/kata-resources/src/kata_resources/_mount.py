"""mount(2) and umount2(2) through libc (ctypes), and mount option parsing."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
from pathlib import Path
from typing import Any

from kata_resources._errors import MountError

# <linux/mount.h> (uapi), Linux 6.1
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2

_SET_FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
    "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC,
}
_NO_OP = {"rw", "suid", "dev", "exec", "atime", "diratime", "defaults", "async", "auto"}
PROPAGATION = {"private", "rprivate", "shared", "rshared", "slave", "rslave", "unbindable", "runbindable"}


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def parse_options(options: list[str] | tuple[str, ...]) -> tuple[int, str]:
    """Split fstab-style options into MS_* flags and the filesystem's data string.

    Propagation options (rprivate...) are dropped: they are not data and apply after the mount.
    """
    flags = 0
    data: list[str] = []
    for opt in options:
        if opt in _SET_FLAGS:
            flags |= _SET_FLAGS[opt]
        elif opt in _NO_OP or opt in PROPAGATION or not opt:
            continue
        else:
            data.append(opt)
    return flags, ",".join(data)


def mount(source: str, target: str | Path, fstype: str = "", flags: int = 0, data: str = "") -> None:
    """mount(2); `MountError` with the errno on failure."""
    rc = _libc().mount(
        source.encode() or None, str(target).encode(), fstype.encode() or None, flags, data.encode() or None
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"mount {source or '-'} on {target} ({fstype or 'bind'}): {os.strerror(err)}")


def umount(target: str | Path, *, detach: bool = True) -> bool:
    """umount2(2), lazily (MNT_DETACH) by default; False when nothing was mounted there."""
    rc = _libc().umount2(str(target).encode(), MNT_DETACH if detach else 0)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return False
        raise MountError(err, f"umount {target}: {os.strerror(err)}")
    return True


def bind(source: str | Path, target: str | Path, *, readonly: bool = False, recursive: bool = True) -> None:
    """Bind `source` on `target` (both must exist); read-only takes a second, remounting call."""
    mount(str(source), target, "", MS_BIND | (MS_REC if recursive else 0))
    if readonly:
        try:
            mount("", target, "", MS_BIND | MS_REMOUNT | MS_RDONLY | (MS_REC if recursive else 0))
        except MountError:
            with contextlib.suppress(MountError):
                umount(target)
            raise


def _unescape(text: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo.
    return text.encode().decode("unicode_escape") if "\\" in text else text


def mount_points() -> list[str]:
    """Every mount point in this mount namespace, in mountinfo order (stacked mounts appear twice)."""
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split()[4]) for line in f]


def mounts_below(directory: str | Path) -> list[str]:
    """Mount points at or below `directory`, each once, deepest first."""
    prefix = str(directory).rstrip("/")
    found = {p for p in mount_points() if p == prefix or p.startswith(prefix + "/")}
    return sorted(found, key=lambda p: (p.count("/"), len(p)), reverse=True)


def is_mountpoint(path: str | Path) -> bool:
    """True when `path` is a mount point in this mount namespace."""
    return str(path).rstrip("/") in mount_points()
