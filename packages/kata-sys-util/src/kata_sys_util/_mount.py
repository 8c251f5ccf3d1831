"""mount(2) and umount2(2); errors are OSError carrying the errno and the path.

A host path the guest could have written is never passed here as a path: open it beneath its root
(`open_beneath`) and pass ``proc_fd_path(fd)``, or use `bind_beneath`/`mount_beneath`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from kata_sys_util._libc import check, fspath_bytes, libc

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
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
# umount2(2) flags, <sys/mount.h>
MNT_FORCE = 0x1
MNT_DETACH = 0x2
MNT_EXPIRE = 0x4
UMOUNT_NOFOLLOW = 0x8

Path_ = str | os.PathLike[str] | bytes

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


def parse_options(options: Iterable[str]) -> tuple[int, str]:
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


def proc_fd_path(fd: int) -> str:
    """``/proc/self/fd/<fd>``: a mount source or target that names exactly what `fd` refers to."""
    return f"/proc/self/fd/{fd}"


def mount(source: Path_ | None, target: Path_, fstype: str = "", flags: int = 0, data: str = "") -> None:
    """mount(2); `OSError` naming the target on failure."""
    src = fspath_bytes(source) if source else None
    rc = libc().mount(src, fspath_bytes(target), fstype.encode() or None, flags, data.encode() or None)
    what = f"mount {os.fsdecode(source) if source else '-'} ({fstype or 'bind'}, flags {flags:#x})"
    check(rc, what, target)


def umount(target: Path_, flags: int = MNT_DETACH | UMOUNT_NOFOLLOW) -> None:
    """umount2(2), lazily and without following a symlink at `target` by default.

    Every failure raises: ENOENT or EINVAL does NOT prove that nothing is mounted (the path may have
    been renamed or mangled); decide that from mount ids (`mount_id`, `mountinfo`).
    """
    check(libc().umount2(fspath_bytes(target), flags), "umount2", target)


def umount_fd(fd: int, flags: int = MNT_DETACH) -> None:
    """Unmount the mount whose root `fd` (an O_PATH fd opened beneath a trusted root) refers to.

    The /proc/self/fd magic link must be followed, so UMOUNT_NOFOLLOW is not allowed here.
    """
    check(libc().umount2(proc_fd_path(fd).encode(), flags & ~UMOUNT_NOFOLLOW), "umount2", proc_fd_path(fd))
