"""The FUSE server's filesystem operations on one host directory, confined to it (virtiofsd's passthrough).

Every inode the guest knows is an ``O_PATH`` fd opened *beneath* its parent's fd, one name at a
time, never following a symlink; every later operation goes through that fd (or the parent fd and
one checked name). A path is never re-resolved from the shared directory, so ``..``, absolute
symlinks and a symlink swapped in after lookup cannot lead outside it.

The operations take decoded arguments and return host values (stat results, node ids, handles, bytes);
the FUSE wire format is `kata_virtio.fs.server`'s job. An operation refuses with `ReplyErrno` (or lets an
``OSError`` through); the server turns either into the reply's -errno.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from kata_sys_util import (
    RESOLVE_BENEATH,
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    fallocate,
    fchownat_empty,
    getdents64,
    openat2,
    renameat2,
)
from kata_virtio import _fuse as F
from kata_virtio._memory import VirtioError

#: Open flags passed through from the guest; anything else (O_PATH, O_TMPFILE, O_NOFOLLOW, kernel-internal
#: FMODE bits) is dropped. O_CREAT/O_EXCL are added only by CREATE.
_OPEN_FLAGS = (
    os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_DSYNC | os.O_SYNC | os.O_DIRECT | os.O_LARGEFILE
    | os.O_NOATIME | os.O_TRUNC | os.O_DIRECTORY
)  # fmt: skip
#: getdents64 batch size of one READDIR (bytes): a fuse_dirent is never smaller than a linux_dirent64,
#: so a batch of the reply's size fills it; READDIRPLUS stops early and the guest asks again.
READDIR_BUFFER = 32768
#: The smallest batch: one linux_dirent64 with a 255-byte name is 280 bytes.
READDIR_MIN_BUFFER = 1024
_PRIVILEGED_XATTRS = (b"security.", b"trusted.", b"system.")

#: One getdents64 record: name, inode number, offset cookie of the next record, d_type.
Dirent = tuple[bytes, int, int, int]
#: The caller's uid and gid (fuse_in_header).
Cred = tuple[int, int]


class FsServerError(VirtioError):
    """Raised when the shared directory cannot be served (missing, not a directory)."""


class ReplyErrno(Exception):
    """Raised by an operation to finish its request with -``errno``."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _name(raw: bytes) -> str:
    """One path component from the guest, checked: no '/', no NUL, not '.' or '..'."""
    if not raw or b"/" in raw or raw in (b".", b".."):
        raise ReplyErrno(errno.EINVAL if raw not in (b".", b"..") else errno.EPERM)
    return os.fsdecode(raw)


@dataclass(slots=True)
class _Inode:
    fd: int  # O_PATH, O_NOFOLLOW
    key: tuple[int, int]  # (st_dev, st_ino)
    mode: int
    nlookup: int = 0


class _Handle:
    """An open file or directory fd, closed when it is released *and* no request still uses it.

    A request takes a reference (`PassthroughFs._use`) under the lock and may then run its
    syscall without the lock; RELEASE, DESTROY and a device reset only remove the handle from its
    table and drop the table's reference. So the fd number cannot be reused for another file while a
    request still holds it: a WRITE in flight during a reset lands in its own file or nowhere.
    A directory handle also has a lock for its position (lseek + getdents64 go together).
    """

    __slots__ = ("fd", "position", "refs")

    def __init__(self, fd: int, *, directory: bool = False) -> None:
        self.fd = fd
        self.refs = 1  # the handle table's reference
        self.position = threading.Lock() if directory else None

    def unref(self) -> None:
        """Drop one reference (caller holds the lock); the last one closes the fd."""
        self.refs -= 1
        if self.refs == 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True, slots=True)
class FsPolicy:
    """What the guest may do to host objects through one share; the default is the safe one.

    By default (much as a ``nodev,nosuid`` mount would): MKNOD of
    a character or block device is refused with EPERM (FIFOs, sockets and overlayfs whiteouts, a
    0:0 character device, are allowed); setuid/setgid bits are stripped from SETATTR, CREATE,
    MKDIR and MKNOD modes, and a WRITE clears them from the file it writes (killpriv); SETXATTR
    and REMOVEXATTR of ``security.*``, ``trusted.*`` and ``system.*`` (POSIX ACLs included) are
    refused with EPERM; SETATTR may not change a file's owner or group (EPERM), only repeat them.
    """

    #: Allow MKNOD of character and block devices.
    allow_device_nodes: bool = False
    #: Keep setuid/setgid bits the guest asks for.
    allow_setid: bool = False
    #: Allow writing and removing security.*, trusted.* and system.* xattrs.
    allow_privileged_xattrs: bool = False
    #: Allow SETATTR to change owner and group to any id.
    allow_chown: bool = False

    def mode(self, mode: int) -> int:
        """``mode`` with setuid/setgid stripped unless the share allows them."""
        return mode if self.allow_setid else mode & ~(stat.S_ISUID | stat.S_ISGID)

    def check_xattr_write(self, name: bytes) -> None:
        """Refuse (EPERM) a write or removal of a privileged xattr."""
        if not self.allow_privileged_xattrs and name.startswith(_PRIVILEGED_XATTRS):
            raise ReplyErrno(errno.EPERM)

    def check_mknod(self, mode: int, rdev: int) -> None:
        """Refuse (EPERM) a device node; a 0:0 character device is an overlayfs whiteout and allowed."""
        if self.allow_device_nodes:
            return
        if stat.S_ISBLK(mode) or (stat.S_ISCHR(mode) and rdev != 0):
            raise ReplyErrno(errno.EPERM)


def _kill_priv(fd: int) -> None:
    """Clear setuid, and setgid with group-exec, after a write (the server's CAP_FSETID kept them)."""
    mode = os.fstat(fd).st_mode
    kill = mode & stat.S_ISUID | (mode & stat.S_ISGID if mode & stat.S_IXGRP else 0)
    if kill:
        os.fchmod(fd, stat.S_IMODE(mode) & ~kill)


class PassthroughFs:
    """The inode and handle tables of one share and the operations on them.

    Locking: `lock` guards the tables and every fd in them and is a leaf (nothing else is taken while it
    is held). The caller holds it around every operation except `read`, `write`, `fsync`, `fsyncdir`,
    `fallocate`, `lseek` and `readdir`, which take it themselves to pin their handle (`_use`) and run
    their blocking syscall without it. Lock order: a transport's lock (a reset from a vCPU thread) ->
    `lock`; a directory handle's position lock -> `lock`.
    """

    def __init__(
        self,
        shared_dir: str | os.PathLike[str],
        *,
        set_owner: bool | None = None,
        max_inodes: int = 65536,
        max_handles: int = 16384,
        policy: FsPolicy | None = None,
    ) -> None:
        self.shared_dir = os.fspath(shared_dir)
        #: What the guest may do to host objects (device nodes, setuid, privileged xattrs, chown).
        self.policy = FsPolicy() if policy is None else policy
        #: Each inode and handle holds an fd: the VMM should raise RLIMIT_NOFILE above their sum.
        self.max_inodes = max_inodes
        self.max_handles = max_handles
        try:
            root = os.open(self.shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise FsServerError(f"cannot share {self.shared_dir}: {err.strerror}") from err
        st = os.fstat(root)
        self._root = _Inode(root, (st.st_dev, st.st_ino), st.st_mode, 1 << 62)
        self.lock = threading.Lock()
        self._inodes: dict[int, _Inode] = {F.FUSE_ROOT_ID: self._root}
        self._by_key: dict[tuple[int, int], int] = {self._root.key: F.FUSE_ROOT_ID}
        self._next_node = 2
        self._files: dict[int, _Handle] = {}
        self._dirs: dict[int, _Handle] = {}
        self._next_fh = 1
        # Root runs chown new nodes to the caller's uid/gid, as virtiofsd does with fsuid/fsgid.
        self.set_owner = os.geteuid() == 0 if set_owner is None else set_owner

    def close(self) -> None:
        """Close every fd, the root's included."""
        with self.lock:
            self.release_all()
            if self._root.fd >= 0:
                os.close(self._root.fd)
                self._root.fd = -1

    def release_all(self) -> None:
        """Drop every inode but the root and every handle (DESTROY, a device reset); caller holds `lock`.

        A request still running keeps its handle's fd open until it finishes (see `_Handle`).
        """
        for handle in (*self._files.values(), *self._dirs.values()):
            handle.unref()
        self._files.clear()
        self._dirs.clear()
        for node, inode in list(self._inodes.items()):
            if node != F.FUSE_ROOT_ID:
                os.close(inode.fd)
                del self._inodes[node]
        self._by_key = {self._root.key: F.FUSE_ROOT_ID}

    @property
    def inode_count(self) -> int:
        """Inodes the guest holds references to, the root included."""
        return len(self._inodes)

    @property
    def open_handles(self) -> int:
        """Open file and directory handles."""
        return len(self._files) + len(self._dirs)

    # -- inode table -------------------------------------------------------------------------------

    def _inode(self, nodeid: int) -> _Inode:
        inode = self._inodes.get(nodeid)
        if inode is None:
            raise ReplyErrno(errno.ENOENT)
        return inode

    def _dir(self, nodeid: int) -> _Inode:
        inode = self._inode(nodeid)
        if not stat.S_ISDIR(inode.mode):
            raise ReplyErrno(errno.ENOTDIR)
        return inode

    def _lookup_fd(self, parent: _Inode, name: str) -> tuple[int, os.stat_result]:
        # openat2 RESOLVE_BENEATH|NO_MAGICLINKS with O_NOFOLLOW: one component, beneath the parent.
        fd = openat2(parent.fd, name, os.O_PATH | os.O_NOFOLLOW, 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        try:
            return fd, os.fstat(fd)
        except OSError:
            os.close(fd)
            raise

    def _entry(self, parent: _Inode, name: str) -> tuple[int, os.stat_result]:
        """Look ``name`` up under ``parent``: its node id (taking one lookup reference) and its stat."""
        fd, st = self._lookup_fd(parent, name)
        key = (st.st_dev, st.st_ino)
        nodeid = self._by_key.get(key)
        if nodeid is not None:
            os.close(fd)
            inode = self._inodes[nodeid]
        else:
            if len(self._inodes) >= self.max_inodes:
                # Every inode costs an fd: a guest must not exhaust the VMM's fd table.
                os.close(fd)
                raise ReplyErrno(errno.ENFILE)
            nodeid, self._next_node = self._next_node, self._next_node + 1
            inode = _Inode(fd, key, st.st_mode)
            self._inodes[nodeid] = inode
            self._by_key[key] = nodeid
        inode.nlookup += 1
        return nodeid, st

    def forget(self, nodeid: int, count: int) -> None:
        """Drop ``count`` lookup references of ``nodeid`` (FORGET); the last one closes its fd."""
        inode = self._inodes.get(nodeid)
        if inode is None or nodeid == F.FUSE_ROOT_ID:
            return
        inode.nlookup -= min(count, inode.nlookup)
        if inode.nlookup == 0:
            del self._inodes[nodeid]
            del self._by_key[inode.key]
            os.close(inode.fd)

    def _new_fh(self) -> int:
        if len(self._files) + len(self._dirs) >= self.max_handles:
            raise ReplyErrno(errno.ENFILE)
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    def _reopen(self, inode: _Inode, flags: int) -> int:
        """A real fd for an inode: reopen its O_PATH fd through /proc (never a path walk)."""
        if stat.S_ISLNK(inode.mode):
            raise ReplyErrno(errno.ELOOP)
        if not (stat.S_ISREG(inode.mode) or stat.S_ISDIR(inode.mode)):
            # The guest opens FIFOs, sockets and device nodes itself (the kernel never sends OPEN for
            # them); a host open could block the event thread (FIFO) or reach a host device.
            raise ReplyErrno(errno.EPERM)
        return os.open(_proc(inode.fd), (flags & _OPEN_FLAGS) | os.O_CLOEXEC)

    def _set_owner(self, parent: _Inode, name: str, cred: Cred) -> None:
        if self.set_owner:
            os.chown(name, cred[0], cred[1], dir_fd=parent.fd, follow_symlinks=False)

    @contextlib.contextmanager
    def _use(self, fh: int, table: dict[int, _Handle] | None = None) -> Iterator[_Handle]:
        """Handle ``fh``, its fd kept open (a reference) until the block ends; called without the lock."""
        with self.lock:
            handle = (self._files if table is None else table).get(fh)
            if handle is None:
                raise ReplyErrno(errno.EBADF)
            handle.refs += 1
        try:
            yield handle
        finally:
            with self.lock:
                handle.unref()

    # -- operations on nodes (caller holds `lock`) ---------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> tuple[int, os.stat_result]:
        """``name`` in directory ``parent``: its node id (one more lookup reference) and stat."""
        return self._entry(self._dir(parent), _name(name))

    def getattr(self, nodeid: int) -> os.stat_result:
        """The stat of ``nodeid``."""
        return os.fstat(self._inode(nodeid).fd)

    def setattr(
        self, nodeid: int, valid: int, *, fh: int, size: int, atime_ns: int, mtime_ns: int, mode: int,
        uid: int, gid: int,
    ) -> os.stat_result:  # fmt: skip
        """Change what ``valid`` (``FATTR_*`` bits) names, within the policy; the new stat."""
        inode = self._inode(nodeid)
        is_link = stat.S_ISLNK(inode.mode)
        if valid & (F.FATTR_UID | F.FATTR_GID) and not self.policy.allow_chown:
            st = os.fstat(inode.fd)
            if (valid & F.FATTR_UID and uid != st.st_uid) or (valid & F.FATTR_GID and gid != st.st_gid):
                raise ReplyErrno(errno.EPERM)  # checked before anything changes: no half-applied SETATTR
        if valid & F.FATTR_MODE and not is_link:
            os.chmod(_proc(inode.fd), self.policy.mode(stat.S_IMODE(mode)))
        if valid & (F.FATTR_UID | F.FATTR_GID):
            fchownat_empty(
                inode.fd,
                uid if valid & F.FATTR_UID else -1 & 0xFFFFFFFF,
                gid if valid & F.FATTR_GID else -1 & 0xFFFFFFFF,
            )
        if valid & F.FATTR_SIZE:
            if valid & F.FATTR_FH and fh in self._files:
                os.ftruncate(self._files[fh].fd, size)
                if not self.policy.allow_setid:
                    _kill_priv(self._files[fh].fd)
            else:
                if not stat.S_ISREG(inode.mode):
                    raise ReplyErrno(errno.EINVAL if not stat.S_ISDIR(inode.mode) else errno.EISDIR)
                fd = self._reopen(inode, os.O_WRONLY)
                try:
                    os.ftruncate(fd, size)
                    if not self.policy.allow_setid:
                        _kill_priv(fd)
                finally:
                    os.close(fd)
        if valid & (F.FATTR_ATIME | F.FATTR_MTIME) and not is_link:
            st, now = os.fstat(inode.fd), time.time_ns()
            a, m = st.st_atime_ns, st.st_mtime_ns
            if valid & F.FATTR_ATIME:
                a = now if valid & F.FATTR_ATIME_NOW else atime_ns
            if valid & F.FATTR_MTIME:
                m = now if valid & F.FATTR_MTIME_NOW else mtime_ns
            os.utime(_proc(inode.fd), ns=(a, m))
        return os.fstat(inode.fd)

    def readlink(self, nodeid: int) -> bytes:
        """The target of symlink ``nodeid`` (EINVAL for anything else)."""
        inode = self._inode(nodeid)
        if not stat.S_ISLNK(inode.mode):
            raise ReplyErrno(errno.EINVAL)
        return os.fsencode(os.readlink("", dir_fd=inode.fd))

    def symlink(self, parent: int, name: bytes, target: bytes, *, cred: Cred) -> tuple[int, os.stat_result]:
        """A symlink ``name`` -> ``target`` in ``parent`` (never followed by the server)."""
        directory, checked = self._dir(parent), _name(name)
        if not target:
            raise ReplyErrno(errno.ENOENT)
        os.symlink(os.fsdecode(target), checked, dir_fd=directory.fd)
        self._set_owner(directory, checked, cred)
        return self._entry(directory, checked)

    def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, *, umask: int, cred: Cred
    ) -> tuple[int, os.stat_result]:
        """A FIFO, socket or (if the policy allows) device node ``name`` in ``parent``."""
        directory, checked = self._dir(parent), _name(name)
        self.policy.check_mknod(mode, rdev)
        os.mknod(checked, self.policy.mode(mode & ~umask & 0o177777), rdev, dir_fd=directory.fd)
        self._set_owner(directory, checked, cred)
        return self._entry(directory, checked)

    def mkdir(
        self, parent: int, name: bytes, mode: int, *, umask: int, cred: Cred
    ) -> tuple[int, os.stat_result]:
        """A directory ``name`` in ``parent`` with exactly the guest's mode (policy applied)."""
        directory, checked = self._dir(parent), _name(name)
        perm = self.policy.mode(stat.S_IMODE(mode & ~umask))
        os.mkdir(checked, perm, dir_fd=directory.fd)
        self._set_owner(directory, checked, cred)
        nodeid, st = self._entry(directory, checked)
        # mkdirat applied the VMM's umask too: set the mode the guest asked for, through the new inode's fd.
        os.chmod(_proc(self._inodes[nodeid].fd), perm)
        return nodeid, st

    def unlink(self, parent: int, name: bytes) -> None:
        """Remove the non-directory ``name`` from ``parent``."""
        os.unlink(_name(name), dir_fd=self._dir(parent).fd)

    def rmdir(self, parent: int, name: bytes) -> None:
        """Remove the empty directory ``name`` from ``parent``."""
        os.rmdir(_name(name), dir_fd=self._dir(parent).fd)

    def rename(self, parent: int, old: bytes, newdir: int, new: bytes, flags: int = 0) -> None:
        """renameat2 of ``parent``/``old`` to ``newdir``/``new`` (RENAME_* ``flags``)."""
        renameat2(self._dir(parent).fd, _name(old), self._dir(newdir).fd, _name(new), flags)

    def link(self, old: int, parent: int, name: bytes) -> tuple[int, os.stat_result]:
        """A hard link ``parent``/``name`` to the very inode ``old`` (never a directory)."""
        inode = self._inode(old)
        if stat.S_ISDIR(inode.mode):
            raise ReplyErrno(errno.EPERM)
        directory, checked = self._dir(parent), _name(name)
        # linkat(fd, "", ..., AT_EMPTY_PATH) via the fd's /proc magic link: links the very inode we hold.
        os.link(_proc(inode.fd), checked, dst_dir_fd=directory.fd, follow_symlinks=True)
        return self._entry(directory, checked)

    def open(self, nodeid: int, flags: int) -> int:
        """A file handle for ``nodeid`` (a regular file or directory only)."""
        inode = self._inode(nodeid)
        if stat.S_ISDIR(inode.mode) and flags & os.O_ACCMODE != os.O_RDONLY:
            raise ReplyErrno(errno.EISDIR)
        fh = self._new_fh()
        self._files[fh] = _Handle(self._reopen(inode, flags))
        return fh

    def create(
        self, parent: int, name: bytes, flags: int, mode: int, *, umask: int, cred: Cred
    ) -> tuple[int, os.stat_result, int]:
        """Create (or open an existing regular file) ``name`` in ``parent``: node id, stat, file handle."""
        directory, checked = self._dir(parent), _name(name)
        fh = self._new_fh()
        try:
            existing = os.stat(checked, dir_fd=directory.fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and not stat.S_ISREG(existing.st_mode) and not flags & os.O_EXCL:
            raise ReplyErrno(errno.EPERM)  # never open an existing FIFO or device node on the host
        wanted = (flags & (_OPEN_FLAGS | os.O_EXCL) & ~os.O_DIRECTORY) | os.O_CREAT | os.O_NOFOLLOW
        perm = self.policy.mode(stat.S_IMODE(mode & ~umask))
        # O_NONBLOCK until we know it is a regular file: something swapped in meanwhile must not block us.
        fd = openat2(
            directory.fd, checked, wanted | os.O_NONBLOCK, perm, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
        )
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ReplyErrno(errno.EPERM)
            os.set_blocking(fd, not wanted & os.O_NONBLOCK)
            if existing is None:
                os.fchmod(fd, perm)
                self._set_owner(directory, checked, cred)
            nodeid, st = self._entry(directory, checked)
        except BaseException:
            os.close(fd)
            raise
        self._files[fh] = _Handle(fd)
        return nodeid, st, fh

    def statfs(self, nodeid: int) -> os.statvfs_result:
        """statvfs of the filesystem holding ``nodeid``."""
        return os.statvfs(self._inode(nodeid).fd)

    def release(self, fh: int) -> None:
        """Forget file handle ``fh``; its fd closes once no request uses it."""
        handle = self._files.pop(fh, None)
        if handle is not None:
            handle.unref()

    def flush(self, fh: int) -> None:
        """Nothing to do but check ``fh`` (the host file has no per-open state to flush)."""
        if fh not in self._files:
            raise ReplyErrno(errno.EBADF)

    def _xattr_path(self, nodeid: int) -> str:
        inode = self._inode(nodeid)
        if stat.S_ISLNK(inode.mode):
            raise ReplyErrno(errno.ENOTSUP)  # no user xattrs on symlinks; never follow one
        return _proc(inode.fd)

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        """Set xattr ``name`` (privileged namespaces only if the policy allows)."""
        self.policy.check_xattr_write(name)
        os.setxattr(self._xattr_path(nodeid), os.fsdecode(name), value, flags)

    def getxattr(self, nodeid: int, name: bytes) -> bytes:
        """The value of xattr ``name``."""
        return os.getxattr(self._xattr_path(nodeid), os.fsdecode(name))

    def listxattr(self, nodeid: int) -> bytes:
        """The xattr names of ``nodeid``, each NUL-terminated."""
        return b"".join(os.fsencode(n) + b"\0" for n in os.listxattr(self._xattr_path(nodeid)))

    def removexattr(self, nodeid: int, name: bytes) -> None:
        """Remove xattr ``name`` (privileged namespaces only if the policy allows)."""
        self.policy.check_xattr_write(name)
        os.removexattr(self._xattr_path(nodeid), os.fsdecode(name))

    def opendir(self, nodeid: int) -> int:
        """A directory handle for ``nodeid``."""
        inode = self._dir(nodeid)
        fh = self._new_fh()
        fd = os.open(_proc(inode.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs[fh] = _Handle(fd, directory=True)
        return fh

    def releasedir(self, fh: int) -> None:
        """Forget directory handle ``fh``."""
        handle = self._dirs.pop(fh, None)
        if handle is not None:
            handle.unref()

    def check_dir(self, nodeid: int) -> None:
        """ENOENT unless the guest holds ``nodeid``, ENOTDIR unless it is a directory."""
        self._dir(nodeid)

    def lookup_dirent(self, parent: int, name: bytes) -> tuple[int, os.stat_result] | None:
        """READDIRPLUS's lookup of one listed ``name``: as `lookup`, None if it is gone since the listing."""
        try:
            return self._entry(self._dir(parent), os.fsdecode(name))
        except OSError:
            return None

    def access(self, nodeid: int, mask: int, cred: Cred) -> None:
        """EACCES unless ``cred`` may do ``mask`` (R_OK/W_OK/X_OK) to ``nodeid`` by its mode bits."""
        st = os.fstat(self._inode(nodeid).fd)
        uid, gid = cred
        mask &= 7
        if uid == 0:
            # root: everything but execute of a file with no x bit at all
            if mask & os.X_OK and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111:
                raise ReplyErrno(errno.EACCES)
            return
        bits = st.st_mode >> 6 if st.st_uid == uid else st.st_mode >> 3 if st.st_gid == gid else st.st_mode
        if mask & ~bits & 7:
            raise ReplyErrno(errno.EACCES)

    # -- operations on handles that may block (they take `lock` themselves) -------------------------

    def read(self, fh: int, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of file handle ``fh`` at ``offset``."""
        with self._use(fh) as handle:
            return os.pread(handle.fd, size, offset)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` (clearing setuid/setgid unless the policy keeps them)."""
        with self._use(fh) as handle:
            written = os.pwrite(handle.fd, data, offset)
            if not self.policy.allow_setid:
                _kill_priv(handle.fd)
        return written

    def fsync(self, fh: int, datasync: bool) -> None:
        """fsync (fdatasync with ``datasync``) a file handle."""
        with self._use(fh) as handle:
            (os.fdatasync if datasync else os.fsync)(handle.fd)

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        """fsync (fdatasync with ``datasync``) a directory handle."""
        with self._use(fh, self._dirs) as handle:
            (os.fdatasync if datasync else os.fsync)(handle.fd)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on a file handle."""
        with self._use(fh) as handle:
            fallocate(handle.fd, mode, offset, length)

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """lseek(2) on a file handle (SEEK_DATA/SEEK_HOLE included); the new offset."""
        with self._use(fh) as handle:
            return os.lseek(handle.fd, offset, whence)

    def readdir(self, nodeid: int, fh: int, offset: int, size: int) -> list[Dirent]:
        """One getdents64 batch of directory handle ``fh`` from cookie ``offset``, for a reply of ``size``.

        Streamed: the fd is seeked to the guest's offset (a d_off cookie we returned) and one bounded
        batch is read; nothing is kept between requests.
        """
        with self.lock:
            self._dir(nodeid)
        with self._use(fh, self._dirs) as handle:
            assert handle.position is not None
            with handle.position:
                os.lseek(handle.fd, offset, os.SEEK_SET)
                return getdents64(handle.fd, max(READDIR_MIN_BUFFER, min(size, READDIR_BUFFER)))
