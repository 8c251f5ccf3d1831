"""Linux system calls used by several layers (like runtime-rs's kata-sys-util): stdlib and ctypes only.

root = os.open("/run/kata-containers/shared/sandboxes/sb1", os.O_PATH | os.O_DIRECTORY)
mkdir_beneath(root, "mounts/c1/rootfs")                 # fails on a symlink anywhere in the path
bind_beneath("/srv/data", root, "mounts/c1/rootfs", flags=MS_RDONLY | MS_NOSUID | MS_NODEV)
with opened_beneath(root, "mounts/c1/rootfs") as fd:
    mid = mount_id(fd)                                  # statx STATX_MNT_ID (fdinfo on old kernels)
    if find_mount(mid) is not None:
        umount_fd(fd)                                   # umount2 of /proc/self/fd/N, MNT_DETACH
refused = remove_beneath(root, "mounts/c1")             # never deletes through a mount
"""

from kata_sys_util.__about__ import __version__
from kata_sys_util._beneath import (
    RESOLVE_BENEATH,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    RESOLVE_NO_XDEV,
    bind_beneath,
    create_file_beneath,
    mkdir_beneath,
    mount_beneath,
    mount_id,
    open_beneath,
    opened_beneath,
    remove_beneath,
    write_atomic,
)
from kata_sys_util._libc import libc
from kata_sys_util._mount import (
    MNT_DETACH,
    MNT_FORCE,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_SHARED,
    MS_SLAVE,
    MS_UNBINDABLE,
    PROPAGATION,
    UMOUNT_NOFOLLOW,
    mount,
    parse_options,
    proc_fd_path,
    umount,
    umount_fd,
)
from kata_sys_util._mountinfo import (
    MountInfo,
    escape,
    find_mount,
    is_mountpoint,
    mountinfo,
    mounts_below,
    parse_line,
    parse_mountinfo,
    unescape,
)

__all__ = [
    "MNT_DETACH",
    "MNT_FORCE",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "MS_SHARED",
    "MS_SLAVE",
    "MS_UNBINDABLE",
    "PROPAGATION",
    "RESOLVE_BENEATH",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "RESOLVE_NO_XDEV",
    "UMOUNT_NOFOLLOW",
    "MountInfo",
    "__version__",
    "bind_beneath",
    "create_file_beneath",
    "escape",
    "find_mount",
    "is_mountpoint",
    "libc",
    "mkdir_beneath",
    "mount",
    "mount_beneath",
    "mount_id",
    "mountinfo",
    "mounts_below",
    "open_beneath",
    "opened_beneath",
    "parse_line",
    "parse_mountinfo",
    "parse_options",
    "proc_fd_path",
    "remove_beneath",
    "umount",
    "umount_fd",
    "unescape",
    "write_atomic",
]
