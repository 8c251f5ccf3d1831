"""Former home of the FUSE server, now `kata_virtio.fs`: this module re-exports its names."""

from kata_virtio.fs.server import (
    MAX_PAGES,
    MAX_WRITE,
    READDIR_BUFFER,
    READDIR_MIN_BUFFER,
    TIMEOUT,
    UNLOCKED_OPCODES,
    FsPolicy,
    FsServerError,
    FuseServer,
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
]
