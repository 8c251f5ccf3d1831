"""Path operations confined beneath a directory fd, never following a symlink.

`open_beneath` is openat2(2) with RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS; where the
kernel has no openat2 (ENOSYS, Linux < 5.6) it walks the path one component at a time with
O_PATH|O_NOFOLLOW|O_DIRECTORY. Either way a symlink anywhere in the path, ``..`` or an absolute path fails
(ELOOP, EXDEV or EINVAL): no guest-planted link can point a host mount, unmount or delete elsewhere.
Mounts and binds target ``/proc/self/fd/N`` of an O_PATH fd opened that way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterator

from kata_sys_util._fsops import (
    AT_EMPTY_PATH,
    AT_SYMLINK_NOFOLLOW,
    RESOLVE_BENEATH,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    openat2,
)
from kata_sys_util._libc import check, libc
from kata_sys_util._mount import MS_BIND, MS_REC, MS_REMOUNT, mount, proc_fd_path, umount_fd

# <linux/stat.h>
STATX_MNT_ID = 0x1000

_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
_openat2 = {"missing": False}
"""Set once the kernel answered ENOSYS: the walk is used from then on."""


class statx(ctypes.Structure):
    """struct statx, <linux/stat.h> (the fields before stx_mnt_id at 0x90 kept as padding)."""

    _fields_ = [
        ("stx_mask", ctypes.c_uint32),  # 0x00
        ("_head", ctypes.c_uint8 * 0x8C),  # 0x04
        ("stx_mnt_id", ctypes.c_uint64),  # 0x90
        ("_tail", ctypes.c_uint8 * 0x68),  # 0x98
    ]


def _components(rel: str | os.PathLike[str]) -> list[str]:
    text = os.fspath(rel)
    if text.startswith("/"):
        raise OSError(errno.EXDEV, "absolute path where one beneath a root was expected", text)
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.EXDEV, "'..' in a path beneath a root", text)
    return parts


def _openat2_call(root: int, rel: str, flags: int, mode: int) -> int:
    return openat2(root, rel or ".", flags, mode, _RESOLVE)


def _walk(root: int, parts: list[str], flags: int, mode: int) -> int:
    # O_NOFOLLOW stops at a symlink in the last component only: open every component by itself.
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        if not parts:
            return os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=fd)
        last = os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)
    if flags & os.O_PATH and stat.S_ISLNK(os.fstat(last).st_mode):
        os.close(last)
        raise OSError(errno.ELOOP, "symlink beneath a root", "/".join(parts))
    return last


def open_beneath(root: int, rel: str | os.PathLike[str], flags: int = os.O_PATH, mode: int = 0) -> int:
    """Open `rel` beneath the directory fd `root` without following any symlink; a new fd (O_CLOEXEC)."""
    parts = _components(rel)
    if not _openat2["missing"]:
        try:
            return _openat2_call(root, "/".join(parts), flags, mode)
        except OSError as err:
            if err.errno != errno.ENOSYS:
                raise
            _openat2["missing"] = True
    return _walk(root, parts, flags, mode)


@contextlib.contextmanager
def opened_beneath(root: int, rel: str | os.PathLike[str], flags: int = os.O_PATH) -> Iterator[int]:
    """`open_beneath` as a context manager that closes the fd."""
    fd = open_beneath(root, rel, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def mount_id(fd: int) -> int:
    """The id of the mount `fd` is on (mountinfo's first field): statx STATX_MNT_ID, else fdinfo."""
    buf = statx()
    try:
        rc = libc().statx(fd, b"", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_MNT_ID, ctypes.byref(buf))
    except AttributeError:  # glibc before 2.28 has no statx wrapper
        rc = -1
    if rc == 0 and buf.stx_mask & STATX_MNT_ID:
        return int(buf.stx_mnt_id)
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "no mount id for fd", proc_fd_path(fd))


def mkdir_beneath(root: int, rel: str | os.PathLike[str], mode: int = 0o755) -> None:
    """Create `rel` and any missing parents beneath `root` (like ``mkdir -p``); a symlink anywhere fails."""
    parts = _components(rel)
    for i in range(len(parts)):
        parent_path = "/".join(parts[:i])
        with (
            opened_beneath(root, parent_path, os.O_PATH | os.O_DIRECTORY) as parent,
            contextlib.suppress(FileExistsError),
        ):
            os.mkdir(parts[i], mode, dir_fd=parent)
    with opened_beneath(root, "/".join(parts), os.O_PATH | os.O_DIRECTORY):
        pass  # what exists there is a real directory, not a link


def create_file_beneath(root: int, rel: str | os.PathLike[str], mode: int = 0o644) -> None:
    """Create an empty regular file at `rel` beneath `root` (parents must exist; an existing file is kept)."""
    parts = _components(rel)
    if not parts:
        raise OSError(errno.EINVAL, "empty path", os.fspath(rel))
    with opened_beneath(root, "/".join(parts[:-1]), os.O_PATH | os.O_DIRECTORY) as parent:
        fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EEXIST, "not a regular file", os.fspath(rel))
        finally:
            os.close(fd)


def mount_beneath(
    source: str | os.PathLike[str] | None,
    root: int,
    rel: str | os.PathLike[str],
    fstype: str = "",
    flags: int = 0,
    *,
    data: str = "",
) -> None:
    """mount(2) on `rel` beneath `root`, through an O_PATH fd of the target (never a path the guest wrote)."""
    with opened_beneath(root, rel) as target:
        mount(source, proc_fd_path(target), fstype, flags, data)


def bind_beneath(
    source: int | str | os.PathLike[str],
    root: int,
    rel: str | os.PathLike[str],
    *,
    flags: int = 0,
    recursive: bool = True,
) -> None:
    """Bind `source` (an fd, or a trusted host path) on `rel` beneath `root` with `flags` (MS_RDONLY,
    MS_NOSUID, MS_NODEV, MS_NOEXEC) on every mount of the new tree.

    The flags are set on a detached clone (open_tree, mount_setattr) before move_mount attaches it, so the
    copies that propagation makes (a slave view of a shared directory) get them too. Kernels before 5.12
    (ENOSYS) get bind + bind-remount, which flags the top mount here only.
    """
    src = source if isinstance(source, int) else os.open(source, os.O_PATH | os.O_CLOEXEC)
    try:
        with opened_beneath(root, rel) as target:
            try:
                _bind_detached(src, target, flags, recursive)
                return
            except OSError as err:
                if err.errno != errno.ENOSYS:
                    raise
            mount(proc_fd_path(src), proc_fd_path(target), "", MS_BIND | (MS_REC if recursive else 0))
    finally:
        if not isinstance(source, int):
            os.close(src)
    if flags:
        # The target fd refers to the covered directory: reopen to reach the new mount's root.
        with opened_beneath(root, rel) as top:
            try:
                mount(None, proc_fd_path(top), "", MS_BIND | MS_REMOUNT | flags)
            except OSError:
                umount_fd(top)
                raise


# <linux/mount.h>: the new mount API (Linux 5.2; mount_setattr 5.12); same numbers on every architecture.
SYS_open_tree = 428
SYS_move_mount = 429
SYS_mount_setattr = 442
OPEN_TREE_CLONE = 0x1
AT_RECURSIVE = 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
_MS_TO_ATTR = {0x1: MOUNT_ATTR_RDONLY, 0x2: MOUNT_ATTR_NOSUID, 0x4: MOUNT_ATTR_NODEV, 0x8: MOUNT_ATTR_NOEXEC}


class mount_attr(ctypes.Structure):
    """struct mount_attr, <linux/mount.h>."""

    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _bind_detached(src: int, target: int, flags: int, recursive: bool) -> None:
    rec = AT_RECURSIVE if recursive else 0
    c = libc()
    tree = check(
        c.syscall(SYS_open_tree, src, b"", OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH | rec),
        "open_tree",
        proc_fd_path(src),
    )
    try:
        attr_set = 0
        for ms, bit in _MS_TO_ATTR.items():
            if flags & ms:
                attr_set |= bit
        if attr_set:
            how = mount_attr(attr_set, 0, 0, 0)
            check(
                c.syscall(
                    SYS_mount_setattr, tree, b"", AT_EMPTY_PATH | rec, ctypes.byref(how), ctypes.sizeof(how)
                ),
                "mount_setattr",
                proc_fd_path(src),
            )
        check(
            c.syscall(
                SYS_move_mount, tree, b"", target, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH
            ),
            "move_mount",
            proc_fd_path(target),
        )
    finally:
        os.close(tree)


def remove_beneath(root: int, rel: str | os.PathLike[str]) -> list[str]:
    """Delete `rel` beneath `root` (a file, a symlink itself, or a directory tree), never through a mount.

    Every directory is opened without following links and its mount id compared with its parent's: a
    mount point anywhere in the tree stops the removal of that branch with EBUSY. Returns the refused
    paths (relative to `root`); the rest is removed. A missing `rel` is not an error.
    """
    parts = _components(rel)
    if not parts:
        raise OSError(errno.EINVAL, "refusing to remove the root itself", os.fspath(rel))
    try:
        parent = open_beneath(root, "/".join(parts[:-1]), os.O_PATH | os.O_DIRECTORY)
    except FileNotFoundError:
        return []
    try:
        refused: list[str] = []
        _remove_entry(parent, mount_id(parent), parts[-1], "/".join(parts), refused)
        return refused
    finally:
        os.close(parent)


def _remove_entry(parent: int, parent_mnt: int, name: str, shown: str, refused: list[str]) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _remove_or_refuse(os.unlink, parent, name, shown, refused)  # EBUSY: a file bind-mounted over
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        if mount_id(fd) != parent_mnt:
            refused.append(shown)
            return
        before = len(refused)
        for entry in os.listdir(fd):
            _remove_entry(fd, parent_mnt, entry, f"{shown}/{entry}", refused)
        if len(refused) > before:
            return
    finally:
        os.close(fd)
    _remove_or_refuse(os.rmdir, parent, name, shown, refused)


def _remove_or_refuse(
    remove: Callable[..., None], parent: int, name: str, shown: str, refused: list[str]
) -> None:
    """`remove(name, dir_fd=parent)`: gone already is fine; EBUSY (a mount point) is refused and reported."""
    try:
        remove(name, dir_fd=parent)
    except FileNotFoundError:
        pass
    except OSError as err:
        if err.errno != errno.EBUSY:
            raise
        refused.append(shown)


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically: a temporary file in the same directory, fsync, rename."""
    target = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", dir=os.path.dirname(target) or ".")
    try:
        os.fchmod(fd, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
