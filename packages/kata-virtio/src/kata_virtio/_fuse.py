"""FUSE wire structures (include/uapi/linux/fuse.h, protocol 7.31 as we negotiate it).

Little-endian, C layout without implicit padding: each `struct.Struct` spells its explicit
padding fields, and tests/test_fuse_abi.py pins every size against the kernel header.
"""

from __future__ import annotations

import struct

FUSE_KERNEL_VERSION = 7
#: The minor version we speak; we answer min(kernel's, ours) (fuse.h "7.31").
FUSE_KERNEL_MINOR_VERSION = 31
FUSE_ROOT_ID = 1

# enum fuse_opcode
FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_SETATTR = 4
FUSE_READLINK = 5
FUSE_SYMLINK = 6
FUSE_MKNOD = 8
FUSE_MKDIR = 9
FUSE_UNLINK = 10
FUSE_RMDIR = 11
FUSE_RENAME = 12
FUSE_LINK = 13
FUSE_OPEN = 14
FUSE_READ = 15
FUSE_WRITE = 16
FUSE_STATFS = 17
FUSE_RELEASE = 18
FUSE_FSYNC = 20
FUSE_SETXATTR = 21
FUSE_GETXATTR = 22
FUSE_LISTXATTR = 23
FUSE_REMOVEXATTR = 24
FUSE_FLUSH = 25
FUSE_INIT = 26
FUSE_OPENDIR = 27
FUSE_READDIR = 28
FUSE_RELEASEDIR = 29
FUSE_FSYNCDIR = 30
FUSE_GETLK = 31
FUSE_SETLK = 32
FUSE_SETLKW = 33
FUSE_ACCESS = 34
FUSE_CREATE = 35
FUSE_INTERRUPT = 36
FUSE_BMAP = 37
FUSE_DESTROY = 38
FUSE_IOCTL = 39
FUSE_POLL = 40
FUSE_NOTIFY_REPLY = 41
FUSE_BATCH_FORGET = 42
FUSE_FALLOCATE = 43
FUSE_READDIRPLUS = 44
FUSE_RENAME2 = 45
FUSE_LSEEK = 46
FUSE_COPY_FILE_RANGE = 47
FUSE_SETUPMAPPING = 48
FUSE_REMOVEMAPPING = 49
FUSE_SYNCFS = 50

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10

# fuse_init_in/out.flags
FUSE_ASYNC_READ = 1 << 0
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_BIG_WRITES = 1 << 5
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22

FUSE_FSYNC_FDATASYNC = 1 << 0

FUSE_IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
FUSE_OUT_HEADER = struct.Struct("<IiQ")  # len error unique
# ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid rdev blksize flags
FUSE_ATTR = struct.Struct("<6Q10I")
FUSE_ENTRY_OUT_HEAD = struct.Struct("<QQQQII")  # nodeid generation entry_valid attr_valid *_nsec
FUSE_ENTRY_OUT_SIZE = FUSE_ENTRY_OUT_HEAD.size + FUSE_ATTR.size
FUSE_ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
FUSE_FORGET_IN = struct.Struct("<Q")
FUSE_BATCH_FORGET_IN = struct.Struct("<II")  # count dummy
FUSE_FORGET_ONE = struct.Struct("<QQ")  # nodeid nlookup
FUSE_GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
# valid padding fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec mode unused4 uid gid
# unused5
FUSE_SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
FUSE_MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
FUSE_MKDIR_IN = struct.Struct("<II")  # mode umask
FUSE_RENAME_IN = struct.Struct("<Q")  # newdir
FUSE_RENAME2_IN = struct.Struct("<QII")  # newdir flags padding
FUSE_LINK_IN = struct.Struct("<Q")  # oldnodeid
FUSE_OPEN_IN = struct.Struct("<II")  # flags open_flags
FUSE_CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
FUSE_OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
FUSE_RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
FUSE_FLUSH_IN = struct.Struct("<QIIQ")  # fh unused padding lock_owner
FUSE_READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
FUSE_WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
FUSE_WRITE_OUT = struct.Struct("<II")  # size padding
FUSE_KSTATFS = struct.Struct(
    "<5Q4I6I"
)  # blocks bfree bavail files ffree bsize namelen frsize padding spare[6]
FUSE_FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
FUSE_SETXATTR_IN = struct.Struct("<II")  # size flags (FUSE_COMPAT_SETXATTR_IN_SIZE: no SETXATTR_EXT)
FUSE_GETXATTR_IN = struct.Struct("<II")  # size padding
FUSE_GETXATTR_OUT = struct.Struct("<II")  # size padding
FUSE_ACCESS_IN = struct.Struct("<II")  # mask padding
FUSE_INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (7.36 appends flags2 + unused[11])
# major minor max_readahead flags max_background congestion_threshold max_write time_gran max_pages
# map_alignment flags2 unused[7]
FUSE_INIT_OUT = struct.Struct("<IIIIHHIIHHI7I")
FUSE_FALLOCATE_IN = struct.Struct("<QQQII")  # fh offset length mode padding
FUSE_LSEEK_IN = struct.Struct("<QQII")  # fh offset whence padding
FUSE_LSEEK_OUT = struct.Struct("<Q")
FUSE_DIRENT_HEAD = struct.Struct("<QQII")  # ino off namelen type


def dirent_align(n: int) -> int:
    """FUSE_DIRENT_ALIGN: records are padded to 8 bytes."""
    return (n + 7) & ~7
