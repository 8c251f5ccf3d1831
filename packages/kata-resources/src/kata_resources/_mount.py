"""mount(2)/umount2(2) for trusted host paths: kata-sys-util's calls, failing with this package's MountError.

Paths the guest could have written never go through `bind`/`mount`/`umount` here: `MountLedger` mounts and
unmounts through fds opened beneath the sandbox directory (kata_sys_util.open_beneath).
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

import kata_sys_util as sys_util
from kata_resources._errors import MountError
from kata_sys_util import MNT_DETACH, MS_BIND, MS_RDONLY, MS_REC, MS_REMOUNT, UMOUNT_NOFOLLOW, is_mountpoint

__all__ = ["bind", "mount", "umount"]


def _wrap(err: OSError) -> MountError:
    text = f"{err.strerror}: {err.filename}" if err.filename else str(err)
    return MountError(err.errno, text)


def mount(source: str, target: str | Path, fstype: str = "", flags: int = 0, data: str = "") -> None:
    """mount(2) on a trusted host path; `MountError` with the errno on failure."""
    try:
        sys_util.mount(source or None, target, fstype, flags, data)
    except OSError as err:
        raise _wrap(err) from err


def umount(target: str | Path, *, detach: bool = True) -> bool:
    """umount2(2) of a trusted host path, lazily (MNT_DETACH) by default, never following a symlink there.

    False only when mountinfo confirms nothing is mounted at `target`; an ENOENT/EINVAL while mountinfo
    still lists a mount there raises `MountError` (a mangled or moved path is not "not mounted").
    """
    try:
        sys_util.umount(target, (MNT_DETACH if detach else 0) | UMOUNT_NOFOLLOW)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.ENOENT) and not is_mountpoint(target):
            return False
        raise _wrap(err) from err
    return True


def bind(source: str | Path, target: str | Path, *, readonly: bool = False, recursive: bool = True) -> None:
    """Bind `source` on `target` (trusted host paths, both must exist); read-only takes a second call."""
    mount(str(source), target, "", MS_BIND | (MS_REC if recursive else 0))
    if readonly:
        try:
            mount("", target, "", MS_BIND | MS_REMOUNT | MS_RDONLY)
        except MountError:
            with contextlib.suppress(MountError):
                umount(target)
            raise
