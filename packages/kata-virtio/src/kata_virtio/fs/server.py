"""A FUSE passthrough server for one host directory, confined to it (the heart of inline virtio-fs).

Every inode the guest knows is an ``O_PATH`` fd opened *beneath* its parent's fd, one name at a
time, never following a symlink; every later operation goes through that fd (or the parent fd and
one checked name). A path is never re-resolved from the shared directory, so ``..``, absolute
symlinks and a symlink swapped in after lookup cannot lead outside it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import struct
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

_log = logging.getLogger("kata_virtio.fs")

#: How long the guest may cache entries and attributes (seconds).
TIMEOUT = 1
MAX_WRITE = 128 * 1024
MAX_PAGES = MAX_WRITE // 4096
#: Open flags passed through from the guest; anything else (O_PATH, O_TMPFILE, O_NOFOLLOW, kernel-internal
#: FMODE bits) is dropped. O_CREAT/O_EXCL are added only by CREATE.
_OPEN_FLAGS = (
    os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_DSYNC | os.O_SYNC | os.O_DIRECT | os.O_LARGEFILE
    | os.O_NOATIME | os.O_TRUNC | os.O_DIRECTORY
)  # fmt: skip


class FsServerError(VirtioError):
    """Raised when the shared directory cannot be served (missing, not a directory)."""


class _Reply(Exception):
    """Internal: finish a request with -errno."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


#: getdents64 batch size of one READDIR (bytes): a fuse_dirent is never smaller than a linux_dirent64,
#: so a batch of the reply's size fills it; READDIRPLUS stops early and the guest asks again.
READDIR_BUFFER = 32768
#: The smallest batch: one linux_dirent64 with a 255-byte name is 280 bytes.
READDIR_MIN_BUFFER = 1024


def _dirents(batch: list[tuple[bytes, int, int, int]], size: int) -> bytes:
    """fuse_dirent records for a getdents64 batch, as many as fit in ``size`` bytes."""
    out = bytearray()
    for raw, ino, off, dtype in batch:
        reclen = F.FUSE_DIRENT_HEAD.size + len(raw)
        if len(out) + F.dirent_align(reclen) > size:
            break
        out += F.FUSE_DIRENT_HEAD.pack(0 if raw == b".." else ino, off, len(raw), dtype) + raw
        out += bytes(F.dirent_align(reclen) - reclen)
    return bytes(out)


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


@dataclass(slots=True)
class _Inode:
    fd: int  # O_PATH, O_NOFOLLOW
    key: tuple[int, int]  # (st_dev, st_ino)
    mode: int
    nlookup: int = 0


class _Handle:
    """An open file or directory fd, closed when it is released *and* no request still uses it.

    A request takes a reference (`FuseServer._use`) under the server lock and may then run its
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
        """Drop one reference (caller holds the server lock); the last one closes the fd."""
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
            raise _Reply(errno.EPERM)

    def check_mknod(self, mode: int, rdev: int) -> None:
        """Refuse (EPERM) a device node; a 0:0 character device is an overlayfs whiteout and allowed."""
        if self.allow_device_nodes:
            return
        if stat.S_ISBLK(mode) or (stat.S_ISCHR(mode) and rdev != 0):
            raise _Reply(errno.EPERM)


_PRIVILEGED_XATTRS = (b"security.", b"trusted.", b"system.")


def _name(raw: bytes) -> str:
    """One path component from the guest, checked: no '/', no NUL, not '.' or '..'."""
    if not raw or b"/" in raw or raw in (b".", b".."):
        raise _Reply(errno.EINVAL if raw not in (b".", b"..") else errno.EPERM)
    return os.fsdecode(raw)


def _split_names(body: bytes, count: int) -> list[bytes]:
    """``count`` NUL-terminated strings from the start of ``body``."""
    parts = body.split(b"\0")
    if len(parts) < count + 1:
        raise _Reply(errno.EINVAL)
    return parts[:count]


def _attr(st: os.stat_result) -> bytes:
    return F.FUSE_ATTR.pack(
        st.st_ino,
        st.st_size,
        st.st_blocks,
        int(st.st_atime_ns // 10**9) & 0xFFFFFFFFFFFFFFFF,
        int(st.st_mtime_ns // 10**9) & 0xFFFFFFFFFFFFFFFF,
        int(st.st_ctime_ns // 10**9) & 0xFFFFFFFFFFFFFFFF,
        st.st_atime_ns % 10**9,
        st.st_mtime_ns % 10**9,
        st.st_ctime_ns % 10**9,
        st.st_mode,
        min(st.st_nlink, 0xFFFFFFFF),
        st.st_uid,
        st.st_gid,
        st.st_rdev & 0xFFFFFFFF,
        st.st_blksize,
        0,
    )


class FuseServer:
    """Serves FUSE requests (as raw bytes) on one host directory.

    `handle(request, reply_space)` returns the reply bytes, or None for requests that get no
    reply (FORGET, BATCH_FORGET). It never raises for anything the guest sends.
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
        # Lock order: the transport's lock (a reset from a vCPU thread) -> FuseServer._lock. The server
        # lock is a leaf: nothing else is taken while it is held. It guards the inode and handle
        # tables and every fd in them; blocking I/O on a handle runs outside it, holding a reference.
        self._lock = threading.Lock()
        self._inodes: dict[int, _Inode] = {F.FUSE_ROOT_ID: self._root}
        self._by_key: dict[tuple[int, int], int] = {self._root.key: F.FUSE_ROOT_ID}
        self._next_node = 2
        self._files: dict[int, _Handle] = {}
        self._dirs: dict[int, _Handle] = {}
        self._next_fh = 1
        self.minor = F.FUSE_KERNEL_MINOR_VERSION
        # Root runs chown new nodes to the caller's uid/gid, as virtiofsd does with fsuid/fsgid.
        self.set_owner = os.geteuid() == 0 if set_owner is None else set_owner

    def close(self) -> None:
        """Close every fd the server holds (FUSE_DESTROY does the same but keeps the root)."""
        with self._lock:
            self._release_all()
            if self._root.fd >= 0:
                os.close(self._root.fd)
                self._root.fd = -1

    def reset(self) -> None:
        """Drop every inode and handle the guest held (a device reset); safe from any thread.

        A request still running keeps its handle's fd open until it finishes (see `_Handle`).
        """
        with self._lock:
            self._release_all()

    @property
    def inode_count(self) -> int:
        """Inodes the guest holds references to, the root included."""
        return len(self._inodes)

    @property
    def open_handles(self) -> int:
        """Open file and directory handles."""
        return len(self._files) + len(self._dirs)

    # -- entry point -------------------------------------------------------------------------------

    def handle(self, request: bytes, reply_space: int = 1 << 20) -> bytes | None:
        """Serve one request; reply_space is how many bytes the guest gave for the reply."""
        if len(request) < F.FUSE_IN_HEADER.size:
            _log.warning("FUSE request shorter than its header (%d bytes)", len(request))
            return None
        length, opcode, unique, nodeid, uid, gid, _pid, extlen, _ = F.FUSE_IN_HEADER.unpack_from(request)
        body = request[F.FUSE_IN_HEADER.size :]
        if opcode in (F.FUSE_FORGET, F.FUSE_BATCH_FORGET):
            with contextlib.suppress(_Reply, struct.error):
                self._forget(opcode, nodeid, body)
            return None
        room = reply_space - F.FUSE_OUT_HEADER.size
        try:
            if length != len(request) or extlen:
                raise _Reply(errno.EINVAL)
            handler = self._handlers.get(opcode)
            if handler is None:
                raise _Reply(errno.ENOSYS)
            if opcode in UNLOCKED_OPCODES:
                payload = handler(self, nodeid, body, (uid, gid), room)  # takes the lock itself
            else:
                with self._lock:
                    payload = handler(self, nodeid, body, (uid, gid), room)
            if len(payload) > room:
                raise _Reply(errno.ERANGE)
            error = 0
        except _Reply as r:
            payload, error = b"", -r.errno
        except OSError as err:
            payload, error = b"", -(err.errno or errno.EIO)
        except (struct.error, ValueError, UnicodeError, OverflowError):
            payload, error = b"", -errno.EINVAL
        except Exception:  # a server bug must never reach the VMM event thread
            _log.exception("FUSE opcode %d failed", opcode)
            payload, error = b"", -errno.EIO
        return F.FUSE_OUT_HEADER.pack(F.FUSE_OUT_HEADER.size + len(payload), error, unique) + payload

    # -- inode table -------------------------------------------------------------------------------

    def _inode(self, nodeid: int) -> _Inode:
        inode = self._inodes.get(nodeid)
        if inode is None:
            raise _Reply(errno.ENOENT)
        return inode

    def _dir(self, nodeid: int) -> _Inode:
        inode = self._inode(nodeid)
        if not stat.S_ISDIR(inode.mode):
            raise _Reply(errno.ENOTDIR)
        return inode

    def _lookup_fd(self, parent: _Inode, name: str) -> tuple[int, os.stat_result]:
        # openat2 RESOLVE_BENEATH|NO_MAGICLINKS with O_NOFOLLOW: one component, beneath the parent.
        fd = openat2(parent.fd, name, os.O_PATH | os.O_NOFOLLOW, 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        try:
            return fd, os.fstat(fd)
        except OSError:
            os.close(fd)
            raise

    def _entry(self, parent: _Inode, name: str) -> bytes:
        """Look ``name`` up under ``parent`` and return a fuse_entry_out, taking one lookup reference."""
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
                raise _Reply(errno.ENFILE)
            nodeid, self._next_node = self._next_node, self._next_node + 1
            inode = _Inode(fd, key, st.st_mode)
            self._inodes[nodeid] = inode
            self._by_key[key] = nodeid
        inode.nlookup += 1
        return F.FUSE_ENTRY_OUT_HEAD.pack(nodeid, 0, TIMEOUT, TIMEOUT, 0, 0) + _attr(st)

    def _unref(self, nodeid: int, count: int) -> None:
        inode = self._inodes.get(nodeid)
        if inode is None or nodeid == F.FUSE_ROOT_ID:
            return
        inode.nlookup -= min(count, inode.nlookup)
        if inode.nlookup == 0:
            del self._inodes[nodeid]
            del self._by_key[inode.key]
            os.close(inode.fd)

    def _forget(self, opcode: int, nodeid: int, body: bytes) -> None:
        with self._lock:
            if opcode == F.FUSE_FORGET:
                self._unref(nodeid, F.FUSE_FORGET_IN.unpack_from(body)[0])
                return
            count, _ = F.FUSE_BATCH_FORGET_IN.unpack_from(body)
            count = min(count, (len(body) - 8) // F.FUSE_FORGET_ONE.size)
            for i in range(count):
                node, nlookup = F.FUSE_FORGET_ONE.unpack_from(body, 8 + 16 * i)
                self._unref(node, nlookup)

    def _new_fh(self) -> int:
        if len(self._files) + len(self._dirs) >= self.max_handles:
            raise _Reply(errno.ENFILE)
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    def _reopen(self, inode: _Inode, flags: int) -> int:
        """A real fd for an inode: reopen its O_PATH fd through /proc (never a path walk)."""
        if stat.S_ISLNK(inode.mode):
            raise _Reply(errno.ELOOP)
        if not (stat.S_ISREG(inode.mode) or stat.S_ISDIR(inode.mode)):
            # The guest opens FIFOs, sockets and device nodes itself (the kernel never sends OPEN for
            # them); a host open could block the event thread (FIFO) or reach a host device.
            raise _Reply(errno.EPERM)
        return os.open(_proc(inode.fd), (flags & _OPEN_FLAGS) | os.O_CLOEXEC)

    def _set_owner(self, parent: _Inode, name: str, cred: tuple[int, int]) -> None:
        if self.set_owner:
            os.chown(name, cred[0], cred[1], dir_fd=parent.fd, follow_symlinks=False)

    def _attr_out(self, st: os.stat_result) -> bytes:
        return F.FUSE_ATTR_OUT_HEAD.pack(TIMEOUT, 0, 0) + _attr(st)

    # -- opcodes -----------------------------------------------------------------------------------

    def _init(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        major, minor, max_readahead, flags = F.FUSE_INIT_IN.unpack_from(body)
        if major < F.FUSE_KERNEL_VERSION:
            raise _Reply(errno.EPROTO)
        if major > F.FUSE_KERNEL_VERSION:
            # The kernel retries INIT with our major when it sees a bare major in the reply.
            return F.FUSE_INIT_OUT.pack(F.FUSE_KERNEL_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, *[0] * 7)
        self.minor = min(minor, F.FUSE_KERNEL_MINOR_VERSION)
        wanted = (
            F.FUSE_ASYNC_READ
            | F.FUSE_ATOMIC_O_TRUNC
            | F.FUSE_BIG_WRITES
            | F.FUSE_DO_READDIRPLUS
            | F.FUSE_READDIRPLUS_AUTO
            | F.FUSE_PARALLEL_DIROPS
            | F.FUSE_MAX_PAGES
        )
        return F.FUSE_INIT_OUT.pack(
            F.FUSE_KERNEL_VERSION,
            self.minor,
            max_readahead,
            flags & wanted,
            16,  # max_background
            12,  # congestion_threshold
            MAX_WRITE,
            1,  # time_gran: nanoseconds
            MAX_PAGES,
            0,
            0,
            *[0] * 7,
        )

    def _destroy(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        self._release_all()
        return b""

    def _release_all(self) -> None:
        # Caller holds the lock.
        for handle in (*self._files.values(), *self._dirs.values()):
            handle.unref()
        self._files.clear()
        self._dirs.clear()
        for node, inode in list(self._inodes.items()):
            if node != F.FUSE_ROOT_ID:
                os.close(inode.fd)
                del self._inodes[node]
        self._by_key = {self._root.key: F.FUSE_ROOT_ID}

    def _lookup(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        return self._entry(self._dir(nodeid), _name(body.split(b"\0")[0]))

    def _getattr(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        return self._attr_out(os.fstat(self._inode(nodeid).fd))

    def _setattr(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        inode = self._inode(nodeid)
        (valid, _, fh, size, _lo, atime, mtime, _ct, atimens, mtimens, _ctn, mode, _, uid, gid, _) = (
            F.FUSE_SETATTR_IN.unpack_from(body)
        )
        is_link = stat.S_ISLNK(inode.mode)
        if valid & (F.FATTR_UID | F.FATTR_GID) and not self.policy.allow_chown:
            st = os.fstat(inode.fd)
            if (valid & F.FATTR_UID and uid != st.st_uid) or (valid & F.FATTR_GID and gid != st.st_gid):
                raise _Reply(errno.EPERM)  # checked before anything changes: no half-applied SETATTR
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
                    raise _Reply(errno.EINVAL if not stat.S_ISDIR(inode.mode) else errno.EISDIR)
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
                a = now if valid & F.FATTR_ATIME_NOW else atime * 10**9 + atimens
            if valid & F.FATTR_MTIME:
                m = now if valid & F.FATTR_MTIME_NOW else mtime * 10**9 + mtimens
            os.utime(_proc(inode.fd), ns=(a, m))
        return self._attr_out(os.fstat(inode.fd))

    def _readlink(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        inode = self._inode(nodeid)
        if not stat.S_ISLNK(inode.mode):
            raise _Reply(errno.EINVAL)
        return os.fsencode(os.readlink("", dir_fd=inode.fd))

    def _symlink(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        parent = self._dir(nodeid)
        name_raw, target = _split_names(body, 2)
        name = _name(name_raw)
        if not target:
            raise _Reply(errno.ENOENT)
        os.symlink(os.fsdecode(target), name, dir_fd=parent.fd)
        self._set_owner(parent, name, cred)
        return self._entry(parent, name)

    def _mknod(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        parent = self._dir(nodeid)
        mode, rdev, umask, _ = F.FUSE_MKNOD_IN.unpack_from(body)
        name = _name(body[F.FUSE_MKNOD_IN.size :].split(b"\0")[0])
        self.policy.check_mknod(mode, rdev)
        os.mknod(name, self.policy.mode(mode & ~umask & 0o177777), rdev, dir_fd=parent.fd)
        self._set_owner(parent, name, cred)
        return self._entry(parent, name)

    def _mkdir(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        parent = self._dir(nodeid)
        mode, umask = F.FUSE_MKDIR_IN.unpack_from(body)
        name = _name(body[F.FUSE_MKDIR_IN.size :].split(b"\0")[0])
        perm = self.policy.mode(stat.S_IMODE(mode & ~umask))
        os.mkdir(name, perm, dir_fd=parent.fd)
        self._set_owner(parent, name, cred)
        entry = self._entry(parent, name)
        # mkdirat applied the VMM's umask too: set the mode the guest asked for, through the new inode's fd.
        nodeid = F.FUSE_ENTRY_OUT_HEAD.unpack_from(entry)[0]
        os.chmod(_proc(self._inodes[nodeid].fd), perm)
        return entry

    def _unlink(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        os.unlink(_name(body.split(b"\0")[0]), dir_fd=self._dir(nodeid).fd)
        return b""

    def _rmdir(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        os.rmdir(_name(body.split(b"\0")[0]), dir_fd=self._dir(nodeid).fd)
        return b""

    def _rename(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        (newdir,) = F.FUSE_RENAME_IN.unpack_from(body)
        old, new = _split_names(body[F.FUSE_RENAME_IN.size :], 2)
        renameat2(self._dir(nodeid).fd, _name(old), self._dir(newdir).fd, _name(new), 0)
        return b""

    def _rename2(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        newdir, flags, _ = F.FUSE_RENAME2_IN.unpack_from(body)
        old, new = _split_names(body[F.FUSE_RENAME2_IN.size :], 2)
        renameat2(self._dir(nodeid).fd, _name(old), self._dir(newdir).fd, _name(new), flags)
        return b""

    def _link(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        (old,) = F.FUSE_LINK_IN.unpack_from(body)
        inode = self._inode(old)
        if stat.S_ISDIR(inode.mode):
            raise _Reply(errno.EPERM)
        parent = self._dir(nodeid)
        name = _name(body[F.FUSE_LINK_IN.size :].split(b"\0")[0])
        # linkat(fd, "", ..., AT_EMPTY_PATH) via the fd's /proc magic link: links the very inode we hold.
        os.link(_proc(inode.fd), name, dst_dir_fd=parent.fd, follow_symlinks=True)
        return self._entry(parent, name)

    def _open(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        flags, _ = F.FUSE_OPEN_IN.unpack_from(body)
        inode = self._inode(nodeid)
        if stat.S_ISDIR(inode.mode) and flags & os.O_ACCMODE != os.O_RDONLY:
            raise _Reply(errno.EISDIR)
        fh = self._new_fh()
        self._files[fh] = _Handle(self._reopen(inode, flags))
        return F.FUSE_OPEN_OUT.pack(fh, 0, 0)

    def _create(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        parent = self._dir(nodeid)
        flags, mode, umask, _ = F.FUSE_CREATE_IN.unpack_from(body)
        name = _name(body[F.FUSE_CREATE_IN.size :].split(b"\0")[0])
        fh = self._new_fh()
        try:
            existing = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing is not None and not stat.S_ISREG(existing.st_mode) and not flags & os.O_EXCL:
            raise _Reply(errno.EPERM)  # never open an existing FIFO or device node on the host
        wanted = (flags & (_OPEN_FLAGS | os.O_EXCL) & ~os.O_DIRECTORY) | os.O_CREAT | os.O_NOFOLLOW
        perm = self.policy.mode(stat.S_IMODE(mode & ~umask))
        # O_NONBLOCK until we know it is a regular file: something swapped in meanwhile must not block us.
        fd = openat2(parent.fd, name, wanted | os.O_NONBLOCK, perm, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _Reply(errno.EPERM)
            os.set_blocking(fd, not wanted & os.O_NONBLOCK)
            if existing is None:
                os.fchmod(fd, perm)
                self._set_owner(parent, name, cred)
            entry = self._entry(parent, name)
        except BaseException:
            os.close(fd)
            raise
        self._files[fh] = _Handle(fd)
        return entry + F.FUSE_OPEN_OUT.pack(fh, 0, 0)

    def _file(self, fh: int) -> int:
        handle = self._files.get(fh)
        if handle is None:
            raise _Reply(errno.EBADF)
        return handle.fd

    @contextlib.contextmanager
    def _use(self, fh: int, table: dict[int, _Handle] | None = None) -> Iterator[_Handle]:
        """Handle ``fh``, its fd kept open (a reference) until the block ends; called without the lock."""
        with self._lock:
            handle = (self._files if table is None else table).get(fh)
            if handle is None:
                raise _Reply(errno.EBADF)
            handle.refs += 1
        try:
            yield handle
        finally:
            with self._lock:
                handle.unref()

    # READ, WRITE, FSYNC, FSYNCDIR, FALLOCATE, LSEEK and READDIR(PLUS) run without the server lock (`_use`).

    def _read(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        fh, offset, size, *_ = F.FUSE_READ_IN.unpack_from(body)
        with self._use(fh) as handle:
            fd = handle.fd
            # max_pages (MAX_PAGES) bounds the kernel's reads too: a bigger READ is the guest's problem
            return os.pread(fd, min(size, room, MAX_WRITE), offset)

    def _write(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        fh, offset, size, *_ = F.FUSE_WRITE_IN.unpack_from(body)
        data = body[F.FUSE_WRITE_IN.size : F.FUSE_WRITE_IN.size + size]
        if len(data) != size:
            raise _Reply(errno.EINVAL)
        with self._use(fh) as handle:
            fd = handle.fd
            written = os.pwrite(fd, data, offset)
            if not self.policy.allow_setid:
                _kill_priv(fd)
        return F.FUSE_WRITE_OUT.pack(written, 0)

    def _statfs(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        s = os.statvfs(self._inode(nodeid).fd)
        return F.FUSE_KSTATFS.pack(
            s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, s.f_namemax, s.f_frsize, 0,
            *[0] * 6,
        )  # fmt: skip

    def _release(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        handle = self._files.pop(F.FUSE_RELEASE_IN.unpack_from(body)[0], None)
        if handle is not None:
            handle.unref()
        return b""

    def _flush(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        self._file(F.FUSE_FLUSH_IN.unpack_from(body)[0])
        return b""

    def _fsync(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        fh, flags, _ = F.FUSE_FSYNC_IN.unpack_from(body)
        with self._use(fh) as handle:
            fd = handle.fd
            (os.fdatasync if flags & F.FUSE_FSYNC_FDATASYNC else os.fsync)(fd)
        return b""

    def _xattr_path(self, nodeid: int) -> str:
        inode = self._inode(nodeid)
        if stat.S_ISLNK(inode.mode):
            raise _Reply(errno.ENOTSUP)  # no user xattrs on symlinks; never follow one
        return _proc(inode.fd)

    def _setxattr(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        size, flags = F.FUSE_SETXATTR_IN.unpack_from(body)
        rest = body[F.FUSE_SETXATTR_IN.size :]
        nul = rest.find(b"\0")
        if nul <= 0 or len(rest) - nul - 1 < size:
            raise _Reply(errno.EINVAL)
        value = rest[nul + 1 : nul + 1 + size]
        self.policy.check_xattr_write(rest[:nul])
        os.setxattr(self._xattr_path(nodeid), os.fsdecode(rest[:nul]), value, flags)
        return b""

    def _getxattr(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        size, _ = F.FUSE_GETXATTR_IN.unpack_from(body)
        name = body[F.FUSE_GETXATTR_IN.size :].split(b"\0")[0]
        if not name:
            raise _Reply(errno.EINVAL)
        value = os.getxattr(self._xattr_path(nodeid), os.fsdecode(name))
        if size == 0:
            return F.FUSE_GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise _Reply(errno.ERANGE)
        return value

    def _listxattr(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        size, _ = F.FUSE_GETXATTR_IN.unpack_from(body)
        names = b"".join(os.fsencode(n) + b"\0" for n in os.listxattr(self._xattr_path(nodeid)))
        if size == 0:
            return F.FUSE_GETXATTR_OUT.pack(len(names), 0)
        if len(names) > size:
            raise _Reply(errno.ERANGE)
        return names

    def _removexattr(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        name = body.split(b"\0")[0]
        if not name:
            raise _Reply(errno.EINVAL)
        self.policy.check_xattr_write(name)
        os.removexattr(self._xattr_path(nodeid), os.fsdecode(name))
        return b""

    def _opendir(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        inode = self._dir(nodeid)
        fh = self._new_fh()
        fd = os.open(_proc(inode.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs[fh] = _Handle(fd, directory=True)
        return F.FUSE_OPEN_OUT.pack(fh, 0, 0)

    def _readdir_common(self, nodeid: int, body: bytes, room: int, plus: bool) -> bytes:
        # Streamed: each request seeks the directory fd to the guest's offset (a d_off cookie we
        # returned) and reads one bounded getdents64 batch; nothing is kept between requests. Runs on
        # a worker: the server lock is taken only to check the node and, for READDIRPLUS, to look
        # entries up. Lock order: handle.position -> server lock.
        fh, offset, size, *_ = F.FUSE_READ_IN.unpack_from(body)
        if offset >= 1 << 63:
            raise _Reply(errno.EINVAL)
        size = min(size, room)
        with self._lock:
            self._dir(nodeid)
        with self._use(fh, self._dirs) as handle:
            assert handle.position is not None
            with handle.position:
                os.lseek(handle.fd, offset, os.SEEK_SET)
                batch = getdents64(handle.fd, max(READDIR_MIN_BUFFER, min(size, READDIR_BUFFER)))
        if not plus:
            return _dirents(batch, size)
        with self._lock:
            return self._dirents_plus(self._dir(nodeid), batch, size)

    def _dirents_plus(self, parent: _Inode, batch: list[tuple[bytes, int, int, int]], size: int) -> bytes:
        out = bytearray()
        for raw, ino, off, dtype in batch:
            reclen = F.FUSE_DIRENT_HEAD.size + len(raw)
            if len(out) + F.dirent_align(reclen) + F.FUSE_ENTRY_OUT_SIZE > size:
                break
            if raw in (b".", b".."):
                entry = bytes(F.FUSE_ENTRY_OUT_SIZE)  # nodeid 0: the kernel skips these
            else:
                try:
                    entry = self._entry(parent, os.fsdecode(raw))
                except OSError:
                    continue  # gone since getdents
            out += entry + F.FUSE_DIRENT_HEAD.pack(0 if raw == b".." else ino, off, len(raw), dtype) + raw
            out += bytes(F.dirent_align(reclen) - reclen)
        return bytes(out)

    def _readdir(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        return self._readdir_common(nodeid, body, room, plus=False)

    def _readdirplus(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        return self._readdir_common(nodeid, body, room, plus=True)

    def _releasedir(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        handle = self._dirs.pop(F.FUSE_RELEASE_IN.unpack_from(body)[0], None)
        if handle is not None:
            handle.unref()
        return b""

    def _fsyncdir(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        fh, flags, _ = F.FUSE_FSYNC_IN.unpack_from(body)
        with self._use(fh, self._dirs) as handle:
            fd = handle.fd
            (os.fdatasync if flags & F.FUSE_FSYNC_FDATASYNC else os.fsync)(fd)
        return b""

    def _access(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        mask, _ = F.FUSE_ACCESS_IN.unpack_from(body)
        st = os.fstat(self._inode(nodeid).fd)
        uid, gid = cred
        mask &= 7
        if uid == 0:
            # root: everything but execute of a file with no x bit at all
            if mask & os.X_OK and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111:
                raise _Reply(errno.EACCES)
            return b""
        bits = st.st_mode >> 6 if st.st_uid == uid else st.st_mode >> 3 if st.st_gid == gid else st.st_mode
        if mask & ~bits & 7:
            raise _Reply(errno.EACCES)
        return b""

    def _fallocate(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        fh, offset, length, mode, _ = F.FUSE_FALLOCATE_IN.unpack_from(body)
        if offset >= 1 << 63 or length >= 1 << 63:
            raise _Reply(errno.EINVAL)
        with self._use(fh) as handle:
            fd = handle.fd
            fallocate(fd, mode, offset, length)
        return b""

    def _lseek(self, nodeid: int, body: bytes, cred: tuple[int, int], room: int) -> bytes:
        fh, offset, whence, _ = F.FUSE_LSEEK_IN.unpack_from(body)
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise _Reply(errno.EINVAL)
        if offset >= 1 << 63:
            raise _Reply(errno.EINVAL)
        with self._use(fh) as handle:
            fd = handle.fd
            return F.FUSE_LSEEK_OUT.pack(os.lseek(fd, offset, whence))

    _handlers = {
        F.FUSE_INIT: _init,
        F.FUSE_DESTROY: _destroy,
        F.FUSE_LOOKUP: _lookup,
        F.FUSE_GETATTR: _getattr,
        F.FUSE_SETATTR: _setattr,
        F.FUSE_READLINK: _readlink,
        F.FUSE_SYMLINK: _symlink,
        F.FUSE_MKNOD: _mknod,
        F.FUSE_MKDIR: _mkdir,
        F.FUSE_UNLINK: _unlink,
        F.FUSE_RMDIR: _rmdir,
        F.FUSE_RENAME: _rename,
        F.FUSE_RENAME2: _rename2,
        F.FUSE_LINK: _link,
        F.FUSE_OPEN: _open,
        F.FUSE_CREATE: _create,
        F.FUSE_READ: _read,
        F.FUSE_WRITE: _write,
        F.FUSE_STATFS: _statfs,
        F.FUSE_RELEASE: _release,
        F.FUSE_FLUSH: _flush,
        F.FUSE_FSYNC: _fsync,
        F.FUSE_SETXATTR: _setxattr,
        F.FUSE_GETXATTR: _getxattr,
        F.FUSE_LISTXATTR: _listxattr,
        F.FUSE_REMOVEXATTR: _removexattr,
        F.FUSE_OPENDIR: _opendir,
        F.FUSE_READDIR: _readdir,
        F.FUSE_READDIRPLUS: _readdirplus,
        F.FUSE_RELEASEDIR: _releasedir,
        F.FUSE_FSYNCDIR: _fsyncdir,
        F.FUSE_ACCESS: _access,
        F.FUSE_FALLOCATE: _fallocate,
        F.FUSE_LSEEK: _lseek,
    }


#: Opcodes whose handler takes the server lock itself and runs its syscall outside it: the ones that may
#: block on the host disk, which `VirtioFs` hands to its worker threads.
UNLOCKED_OPCODES = frozenset(
    {
        F.FUSE_READ,
        F.FUSE_WRITE,
        F.FUSE_FSYNC,
        F.FUSE_FSYNCDIR,
        F.FUSE_FALLOCATE,
        F.FUSE_LSEEK,
        F.FUSE_READDIR,
        F.FUSE_READDIRPLUS,
    }
)


def _kill_priv(fd: int) -> None:
    """Clear setuid, and setgid with group-exec, after a write (the server's CAP_FSETID kept them)."""
    mode = os.fstat(fd).st_mode
    kill = mode & stat.S_ISUID | (mode & stat.S_ISGID if mode & stat.S_IXGRP else 0)
    if kill:
        os.fchmod(fd, stat.S_IMODE(mode) & ~kill)
