"""The storage handlers of CreateSandbox/CreateContainer (mount(2), option parsing: kata-sys-util)."""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from typing import Any

import kata_sys_util as sys_util
from kata_agent._devices import guest_block_node
from kata_proto import ttrpc
from kata_sys_util import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    is_mountpoint,
    parse_options,
)

__all__ = [
    "MS_BIND",
    "MS_NODEV",
    "MS_RDONLY",
    "MS_REC",
    "STORAGE_DRIVERS",
    "MountedStorage",
    "is_mountpoint",
    "mount",
    "mount_storage",
    "parse_options",
    "release_storages",
    "umount",
]

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


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); raises OSError with the errno."""
    sys_util.mount(source or None, target, fstype, flags, data)


def umount(target: str) -> None:
    """Lazy umount2(2); a target that is not mounted (EINVAL, ENOENT) is fine (in the guest, its own)."""
    try:
        sys_util.umount(target, MNT_DETACH)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOENT):
            raise


@dataclass
class MountedStorage:
    """A storage this agent mounted (or created) and must undo."""

    mount_point: str
    mounted: bool
    created_dir: bool


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
            mount(guest_block_node(storage.source), target, storage.fstype, flags, data)
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
