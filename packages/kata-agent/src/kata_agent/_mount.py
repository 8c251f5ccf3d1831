"""mount(2)/umount2(2) through libc and the storage handlers of CreateSandbox/CreateContainer."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
from dataclasses import dataclass
from typing import Any

from kata_proto import ttrpc

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2

_FLAGS = {
    "ro": MS_RDONLY,
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "bind": MS_BIND,
    "rbind": MS_BIND | MS_REC,
}
_CLEAR = {"rw", "suid", "dev", "exec", "atime", "defaults"}

#: Storage drivers this agent knows (reported in GetGuestDetails).
STORAGE_DRIVERS = (
    "virtio-fs",
    "blk",
    "mmioblk",
    "ephemeral",
    "local",
    "overlayfs",
    "watchable-bind",
    "bind",
    "shm",
)


@functools.cache
def _c() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def parse_options(options: list[str]) -> tuple[int, str]:
    """Split mount options into MS_* flags and the filesystem's data string."""
    flags = 0
    data = []
    for opt in options:
        if opt in _FLAGS:
            flags |= _FLAGS[opt]
        elif opt in _CLEAR or not opt:
            continue
        else:
            data.append(opt)
    return flags, ",".join(data)


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); raises OSError with the errno."""
    rc = _c().mount(source.encode(), target.encode(), fstype.encode() or None, flags, data.encode() or None)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target} ({fstype or 'bind'}): {os.strerror(err)}")


def umount(target: str) -> None:
    """Lazy umount2(2); a target that is not mounted (EINVAL, ENOENT) is fine."""
    rc = _c().umount2(target.encode(), MNT_DETACH)
    if rc != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def is_mountpoint(path: str) -> bool:
    """True when `path` appears in /proc/self/mountinfo as a mount point."""
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False


@dataclass
class MountedStorage:
    """A storage this agent mounted (or created) and must undo."""

    mount_point: str
    mounted: bool
    created_dir: bool


def _blk_source(source: str) -> str:
    # A block storage's source is a device node, or a PCI path/virtio-mmio address that
    # names one: accept a node directly and otherwise look it up under /dev/disk/by-path.
    if source.startswith("/dev/"):
        return source
    candidate = os.path.join("/dev/disk/by-path", source)
    if os.path.exists(candidate):
        return os.path.realpath(candidate)
    raise ttrpc.NotFound(f"block device for {source!r} not found")


def mount_storage(storage: Any) -> MountedStorage:
    """Set up one `grpc.Storage`; InvalidArgument for an unknown driver or missing mount point."""
    driver = storage.driver
    target = storage.mount_point
    if not target or not os.path.isabs(target):
        raise ttrpc.InvalidArgument(f"storage mount_point {target!r} is not absolute")
    if driver not in STORAGE_DRIVERS:
        raise ttrpc.InvalidArgument(f"unknown storage driver {driver!r}")
    created = not os.path.exists(target)
    flags, data = parse_options(list(storage.options))
    try:
        if driver == "local":
            mode = (
                0o777
                if not data
                else int(dict(o.split("=", 1) for o in data.split(",")).get("mode", "777"), 8)
            )
            os.makedirs(target, exist_ok=True)
            os.chmod(target, mode)
            return MountedStorage(target, False, created)
        os.makedirs(target, exist_ok=True)
        if driver == "virtio-fs":
            mount(storage.source, target, storage.fstype or "virtiofs", flags, data)
        elif driver in ("blk", "mmioblk"):
            if not storage.fstype:
                raise ttrpc.InvalidArgument("block storage has no fstype")
            mount(_blk_source(storage.source), target, storage.fstype, flags, data)
        elif driver in ("ephemeral", "shm"):
            mount(
                storage.source or "tmpfs",
                target,
                storage.fstype or "tmpfs",
                flags | MS_NOSUID | MS_NODEV,
                data,
            )
        elif driver == "overlayfs":
            mount(storage.source or "overlay", target, "overlay", flags, data)
        else:  # bind, watchable-bind: a directory already in the guest (the shared dir, say)
            mount(storage.source, target, "", flags | MS_BIND | MS_REC)
            if flags & MS_RDONLY:
                mount("", target, "", MS_BIND | MS_REMOUNT | MS_RDONLY)
    except OSError as err:
        if created:
            _rmdir(target)
        if err.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            raise ttrpc.NotFound(str(err)) from err
        raise ttrpc.InvalidArgument(str(err)) from err
    except BaseException:
        if created:
            _rmdir(target)
        raise
    return MountedStorage(target, True, created)


def _rmdir(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)


def release_storages(storages: list[MountedStorage]) -> None:
    """Undo mounts in reverse order; a directory the agent created goes too."""
    for s in reversed(storages):
        if s.mounted:
            umount(s.mount_point)
        if s.created_dir:
            _rmdir(s.mount_point)
    storages.clear()
