"""The FUSE protocol of the inline virtio-fs server: request decoding, checks on guest lengths, replies.

`FuseServer.handle` takes one request as raw bytes from the guest: it checks the in-header (its length
against the bytes received, no extensions), decodes the opcode's body (structs, NUL-terminated names,
payload lengths, offsets), calls the operation on `PassthroughFs` (`kata_virtio.fs.passthrough`) and
encodes the reply within the space the guest gave. Nothing the guest sends makes it raise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import struct
import threading
import time
from collections import Counter

from kata_virtio import _fuse as F
from kata_virtio.fs.passthrough import (
    READDIR_BUFFER,
    READDIR_MIN_BUFFER,
    Cred,
    Dirent,
    FsPolicy,
    FsServerError,
    PassthroughFs,
    ReplyErrno,
)

__all__ = [
    "MAX_PAGES",
    "MAX_WRITE",
    "READDIR_BUFFER",
    "READDIR_MIN_BUFFER",
    "TIMEOUT",
    "UNLOCKED_OPCODES",
    "FsPolicy",
    "FsServerError",
    "FuseServer",
    "FuseStatistics",
]

_log = logging.getLogger("kata_virtio.fs")

#: How long the guest may cache entries and attributes (seconds).
TIMEOUT = 1
MAX_WRITE = 128 * 1024
MAX_PAGES = MAX_WRITE // 4096


def _cstr(body: bytes) -> bytes:
    """The NUL-terminated string at the start of ``body`` (all of it without a NUL)."""
    return body.split(b"\0")[0]


def _split_names(body: bytes, count: int) -> list[bytes]:
    """``count`` NUL-terminated strings from the start of ``body``."""
    parts = body.split(b"\0")
    if len(parts) < count + 1:
        raise ReplyErrno(errno.EINVAL)
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


def _attr_out(st: os.stat_result) -> bytes:
    return F.FUSE_ATTR_OUT_HEAD.pack(TIMEOUT, 0, 0) + _attr(st)


def _entry_out(entry: tuple[int, os.stat_result]) -> bytes:
    nodeid, st = entry
    return F.FUSE_ENTRY_OUT_HEAD.pack(nodeid, 0, TIMEOUT, TIMEOUT, 0, 0) + _attr(st)


def _dirent(raw: bytes, ino: int, off: int, dtype: int) -> bytes:
    """One fuse_dirent, padded to 8 bytes."""
    reclen = F.FUSE_DIRENT_HEAD.size + len(raw)
    head = F.FUSE_DIRENT_HEAD.pack(0 if raw == b".." else ino, off, len(raw), dtype)
    return head + raw + bytes(F.dirent_align(reclen) - reclen)


def _dirents(batch: list[Dirent], size: int) -> bytes:
    """fuse_dirent records for a getdents64 batch, as many as fit in ``size`` bytes."""
    out = bytearray()
    for raw, ino, off, dtype in batch:
        if len(out) + F.dirent_align(F.FUSE_DIRENT_HEAD.size + len(raw)) > size:
            break
        out += _dirent(raw, ino, off, dtype)
    return bytes(out)


@dataclasses.dataclass(frozen=True)
class FuseStatistics:
    """What a `FuseServer` has served: requests by opcode name, and the host seconds spent on them."""

    requests: dict[str, int]
    seconds: float

    @property
    def total(self) -> int:
        """Requests of every opcode."""
        return sum(self.requests.values())

    def __str__(self) -> str:
        ranked = sorted(self.requests.items(), key=lambda kv: (-kv[1], kv[0]))
        parts = ", ".join(f"{name} {count}" for name, count in ranked)
        return f"{self.total} requests in {self.seconds:.2f} s" + (f": {parts}" if parts else "")


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
        #: The operations and the inode and handle tables behind them.
        self.fs = PassthroughFs(
            shared_dir, set_owner=set_owner, max_inodes=max_inodes, max_handles=max_handles, policy=policy
        )
        self.minor = F.FUSE_KERNEL_MINOR_VERSION
        #: Whether a guest sent FUSE_INIT (mounted the share): its session cannot be snapshotted.
        self.initialized = False
        self._served: Counter[int] = Counter()
        self._busy_ns = 0
        self._stats_lock = threading.Lock()

    def statistics(self) -> FuseStatistics:
        """Requests served so far, by opcode, and the host time they took (for the shim's debug log)."""
        with self._stats_lock:
            served, busy = dict(self._served), self._busy_ns
        names = {op: _opcode_name(op) for op in served}
        return FuseStatistics({names[op]: count for op, count in served.items()}, busy / 1e9)

    @property
    def shared_dir(self) -> str:
        """The host directory served."""
        return self.fs.shared_dir

    @property
    def policy(self) -> FsPolicy:
        """What the guest may do to host objects (device nodes, setuid, privileged xattrs, chown)."""
        return self.fs.policy

    @policy.setter
    def policy(self, policy: FsPolicy) -> None:
        self.fs.policy = policy

    @property
    def set_owner(self) -> bool:
        """New nodes are chowned to the caller's uid/gid (root runs)."""
        return self.fs.set_owner

    @property
    def max_inodes(self) -> int:
        """Inodes the guest may hold (each holds an fd)."""
        return self.fs.max_inodes

    @property
    def max_handles(self) -> int:
        """Open handles the guest may hold (each holds an fd)."""
        return self.fs.max_handles

    def close(self) -> None:
        """Close every fd the server holds (FUSE_DESTROY does the same but keeps the root)."""
        self.fs.close()

    def reset(self) -> None:
        """Drop every inode and handle the guest held (a device reset); safe from any thread.

        A request still running keeps its handle's fd open until it finishes.
        """
        with self.fs.lock:
            self.fs.release_all()

    @property
    def inode_count(self) -> int:
        """Inodes the guest holds references to, the root included."""
        return self.fs.inode_count

    @property
    def open_handles(self) -> int:
        """Open file and directory handles."""
        return self.fs.open_handles

    # -- entry point -------------------------------------------------------------------------------

    def handle(self, request: bytes, reply_space: int = 1 << 20) -> bytes | None:
        """Serve one request; reply_space is how many bytes the guest gave for the reply."""
        started = time.perf_counter_ns()
        opcode = 0  # a request shorter than its header counts as OP0
        try:
            if len(request) < F.FUSE_IN_HEADER.size:
                _log.warning("FUSE request shorter than its header (%d bytes)", len(request))
                return None
            header = F.FUSE_IN_HEADER.unpack_from(request)
            opcode = header[1]
            return self._handle(header, request, reply_space)
        finally:
            took = time.perf_counter_ns() - started
            with self._stats_lock:
                self._served[opcode] += 1
                self._busy_ns += took

    def _handle(self, header: tuple[int, ...], request: bytes, reply_space: int) -> bytes | None:
        length, opcode, unique, nodeid, uid, gid, _pid, extlen, _ = header
        body = request[F.FUSE_IN_HEADER.size :]
        if opcode in (F.FUSE_FORGET, F.FUSE_BATCH_FORGET):
            with contextlib.suppress(ReplyErrno, struct.error):
                self._forget(opcode, nodeid, body)
            return None
        room = reply_space - F.FUSE_OUT_HEADER.size
        try:
            if length != len(request) or extlen:
                raise ReplyErrno(errno.EINVAL)
            handler = self._handlers.get(opcode)
            if handler is None:
                raise ReplyErrno(errno.ENOSYS)
            if opcode in UNLOCKED_OPCODES:
                payload = handler(self, nodeid, body, (uid, gid), room)  # the operation takes the lock
            else:
                with self.fs.lock:
                    payload = handler(self, nodeid, body, (uid, gid), room)
            if len(payload) > room:
                raise ReplyErrno(errno.ERANGE)
            error = 0
        except ReplyErrno as r:
            payload, error = b"", -r.errno
        except OSError as err:
            payload, error = b"", -(err.errno or errno.EIO)
        except (struct.error, ValueError, UnicodeError, OverflowError):
            payload, error = b"", -errno.EINVAL
        except Exception:  # a server bug must never reach the VMM event thread
            _log.exception("FUSE opcode %d failed", opcode)
            payload, error = b"", -errno.EIO
        return F.FUSE_OUT_HEADER.pack(F.FUSE_OUT_HEADER.size + len(payload), error, unique) + payload

    def _forget(self, opcode: int, nodeid: int, body: bytes) -> None:
        with self.fs.lock:
            if opcode == F.FUSE_FORGET:
                self.fs.forget(nodeid, F.FUSE_FORGET_IN.unpack_from(body)[0])
                return
            count, _ = F.FUSE_BATCH_FORGET_IN.unpack_from(body)
            count = min(count, (len(body) - 8) // F.FUSE_FORGET_ONE.size)
            for i in range(count):
                node, nlookup = F.FUSE_FORGET_ONE.unpack_from(body, 8 + 16 * i)
                self.fs.forget(node, nlookup)

    # -- opcodes: decode the body, run the operation, encode the reply --------------------------------

    def _init(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        major, minor, max_readahead, flags = F.FUSE_INIT_IN.unpack_from(body)
        if major < F.FUSE_KERNEL_VERSION:
            raise ReplyErrno(errno.EPROTO)
        if major > F.FUSE_KERNEL_VERSION:
            # The kernel retries INIT with our major when it sees a bare major in the reply.
            return F.FUSE_INIT_OUT.pack(F.FUSE_KERNEL_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, *[0] * 7)
        self.minor = min(minor, F.FUSE_KERNEL_MINOR_VERSION)
        self.initialized = True
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

    def _destroy(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        self.fs.release_all()
        return b""

    def _lookup(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        return _entry_out(self.fs.lookup(nodeid, _cstr(body)))

    def _getattr(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        return _attr_out(self.fs.getattr(nodeid))

    def _setattr(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        (valid, _, fh, size, _lo, atime, mtime, _ct, atimens, mtimens, _ctn, mode, _, uid, gid, _) = (
            F.FUSE_SETATTR_IN.unpack_from(body)
        )
        st = self.fs.setattr(
            nodeid, valid, fh=fh, size=size, atime_ns=atime * 10**9 + atimens,
            mtime_ns=mtime * 10**9 + mtimens, mode=mode, uid=uid, gid=gid,
        )  # fmt: skip
        return _attr_out(st)

    def _readlink(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        return self.fs.readlink(nodeid)

    def _symlink(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        name, target = _split_names(body, 2)
        return _entry_out(self.fs.symlink(nodeid, name, target, cred=cred))

    def _mknod(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        mode, rdev, umask, _ = F.FUSE_MKNOD_IN.unpack_from(body)
        name = _cstr(body[F.FUSE_MKNOD_IN.size :])
        return _entry_out(self.fs.mknod(nodeid, name, mode, rdev, umask=umask, cred=cred))

    def _mkdir(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        mode, umask = F.FUSE_MKDIR_IN.unpack_from(body)
        name = _cstr(body[F.FUSE_MKDIR_IN.size :])
        return _entry_out(self.fs.mkdir(nodeid, name, mode, umask=umask, cred=cred))

    def _unlink(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        self.fs.unlink(nodeid, _cstr(body))
        return b""

    def _rmdir(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        self.fs.rmdir(nodeid, _cstr(body))
        return b""

    def _rename(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        (newdir,) = F.FUSE_RENAME_IN.unpack_from(body)
        old, new = _split_names(body[F.FUSE_RENAME_IN.size :], 2)
        self.fs.rename(nodeid, old, newdir, new)
        return b""

    def _rename2(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        newdir, flags, _ = F.FUSE_RENAME2_IN.unpack_from(body)
        old, new = _split_names(body[F.FUSE_RENAME2_IN.size :], 2)
        self.fs.rename(nodeid, old, newdir, new, flags)
        return b""

    def _link(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        (old,) = F.FUSE_LINK_IN.unpack_from(body)
        return _entry_out(self.fs.link(old, nodeid, _cstr(body[F.FUSE_LINK_IN.size :])))

    def _open(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        flags, _ = F.FUSE_OPEN_IN.unpack_from(body)
        return F.FUSE_OPEN_OUT.pack(self.fs.open(nodeid, flags), 0, 0)

    def _create(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        flags, mode, umask, _ = F.FUSE_CREATE_IN.unpack_from(body)
        name = _cstr(body[F.FUSE_CREATE_IN.size :])
        node, st, fh = self.fs.create(nodeid, name, flags, mode, umask=umask, cred=cred)
        return _entry_out((node, st)) + F.FUSE_OPEN_OUT.pack(fh, 0, 0)

    # UNLOCKED_OPCODES (READ, WRITE, FSYNC, FSYNCDIR, FALLOCATE, LSEEK, READDIR[PLUS]) run without the lock.

    def _read(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        fh, offset, size, *_ = F.FUSE_READ_IN.unpack_from(body)
        # max_pages (MAX_PAGES) bounds the kernel's reads too: a bigger READ is the guest's problem
        return self.fs.read(fh, offset, min(size, room, MAX_WRITE))

    def _write(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        fh, offset, size, *_ = F.FUSE_WRITE_IN.unpack_from(body)
        data = body[F.FUSE_WRITE_IN.size : F.FUSE_WRITE_IN.size + size]
        if len(data) != size:
            raise ReplyErrno(errno.EINVAL)
        return F.FUSE_WRITE_OUT.pack(self.fs.write(fh, offset, data), 0)

    def _statfs(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        s = self.fs.statfs(nodeid)
        return F.FUSE_KSTATFS.pack(
            s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, s.f_namemax, s.f_frsize, 0,
            *[0] * 6,
        )  # fmt: skip

    def _release(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        self.fs.release(F.FUSE_RELEASE_IN.unpack_from(body)[0])
        return b""

    def _flush(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        self.fs.flush(F.FUSE_FLUSH_IN.unpack_from(body)[0])
        return b""

    def _fsync(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        fh, flags, _ = F.FUSE_FSYNC_IN.unpack_from(body)
        self.fs.fsync(fh, bool(flags & F.FUSE_FSYNC_FDATASYNC))
        return b""

    def _setxattr(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        size, flags = F.FUSE_SETXATTR_IN.unpack_from(body)
        rest = body[F.FUSE_SETXATTR_IN.size :]
        nul = rest.find(b"\0")
        if nul <= 0 or len(rest) - nul - 1 < size:
            raise ReplyErrno(errno.EINVAL)
        self.fs.setxattr(nodeid, rest[:nul], rest[nul + 1 : nul + 1 + size], flags)
        return b""

    def _getxattr(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        size, _ = F.FUSE_GETXATTR_IN.unpack_from(body)
        name = _cstr(body[F.FUSE_GETXATTR_IN.size :])
        if not name:
            raise ReplyErrno(errno.EINVAL)
        value = self.fs.getxattr(nodeid, name)
        if size == 0:
            return F.FUSE_GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise ReplyErrno(errno.ERANGE)
        return value

    def _listxattr(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        size, _ = F.FUSE_GETXATTR_IN.unpack_from(body)
        names = self.fs.listxattr(nodeid)
        if size == 0:
            return F.FUSE_GETXATTR_OUT.pack(len(names), 0)
        if len(names) > size:
            raise ReplyErrno(errno.ERANGE)
        return names

    def _removexattr(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        name = _cstr(body)
        if not name:
            raise ReplyErrno(errno.EINVAL)
        self.fs.removexattr(nodeid, name)
        return b""

    def _opendir(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        return F.FUSE_OPEN_OUT.pack(self.fs.opendir(nodeid), 0, 0)

    def _readdir_common(self, nodeid: int, body: bytes, room: int, plus: bool) -> bytes:
        # Runs on a worker: the lock is taken only to check the node and, for READDIRPLUS, to look
        # entries up.
        fh, offset, size, *_ = F.FUSE_READ_IN.unpack_from(body)
        if offset >= 1 << 63:
            raise ReplyErrno(errno.EINVAL)
        size = min(size, room)
        batch = self.fs.readdir(nodeid, fh, offset, size)
        if not plus:
            return _dirents(batch, size)
        with self.fs.lock:
            self.fs.check_dir(nodeid)
            return self._dirents_plus(nodeid, batch, size)

    def _dirents_plus(self, parent: int, batch: list[Dirent], size: int) -> bytes:
        out = bytearray()
        for raw, ino, off, dtype in batch:
            if len(out) + F.dirent_align(F.FUSE_DIRENT_HEAD.size + len(raw)) + F.FUSE_ENTRY_OUT_SIZE > size:
                break  # checked before the lookup: an entry that does not fit takes no reference
            if raw in (b".", b".."):
                entry = bytes(F.FUSE_ENTRY_OUT_SIZE)  # nodeid 0: the kernel skips these
            else:
                found = self.fs.lookup_dirent(parent, raw)
                if found is None:
                    continue  # gone since getdents
                entry = _entry_out(found)
            out += entry + _dirent(raw, ino, off, dtype)
        return bytes(out)

    def _readdir(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        return self._readdir_common(nodeid, body, room, plus=False)

    def _readdirplus(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        return self._readdir_common(nodeid, body, room, plus=True)

    def _releasedir(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        self.fs.releasedir(F.FUSE_RELEASE_IN.unpack_from(body)[0])
        return b""

    def _fsyncdir(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        fh, flags, _ = F.FUSE_FSYNC_IN.unpack_from(body)
        self.fs.fsyncdir(fh, bool(flags & F.FUSE_FSYNC_FDATASYNC))
        return b""

    def _access(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        mask, _ = F.FUSE_ACCESS_IN.unpack_from(body)
        self.fs.access(nodeid, mask, cred)
        return b""

    def _fallocate(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        fh, offset, length, mode, _ = F.FUSE_FALLOCATE_IN.unpack_from(body)
        if offset >= 1 << 63 or length >= 1 << 63:
            raise ReplyErrno(errno.EINVAL)
        self.fs.fallocate(fh, mode, offset, length)
        return b""

    def _lseek(self, nodeid: int, body: bytes, cred: Cred, room: int) -> bytes:
        fh, offset, whence, _ = F.FUSE_LSEEK_IN.unpack_from(body)
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise ReplyErrno(errno.EINVAL)
        if offset >= 1 << 63:
            raise ReplyErrno(errno.EINVAL)
        return F.FUSE_LSEEK_OUT.pack(self.fs.lseek(fh, offset, whence))

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


#: Opcodes whose operation takes the lock itself and runs its syscall outside it: the ones that may
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


def _opcode_name(opcode: int) -> str:
    """LOOKUP for FUSE_LOOKUP (the handler's name), FORGET, BATCH_FORGET; OP<n> for what we do not serve."""
    handler = FuseServer._handlers.get(opcode)
    if handler is not None:
        return handler.__name__.lstrip("_").upper()
    return {F.FUSE_FORGET: "FORGET", F.FUSE_BATCH_FORGET: "BATCH_FORGET"}.get(opcode, f"OP{opcode}")
