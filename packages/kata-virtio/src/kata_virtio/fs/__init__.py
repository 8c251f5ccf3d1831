"""virtio-fs with an inline FUSE passthrough server, split as virtiofsd is.

- `server`: `FuseServer`, the FUSE protocol (in-header and per-opcode decoding, checks on guest lengths,
  reply encoding), like virtiofsd's ``server.rs``;
- `passthrough`: `PassthroughFs`, the operations on one share (inode and handle tables of O_PATH fds,
  openat2 confinement, `FsPolicy`), like virtiofsd's ``passthrough/``; no FUSE wire format;
- `device`: `VirtioFs`, the virtio device (request queues, worker threads for blocking operations).
"""

from kata_virtio.fs.device import VirtioFs
from kata_virtio.fs.passthrough import FsPolicy, FsServerError, PassthroughFs, ReplyErrno
from kata_virtio.fs.server import MAX_WRITE, UNLOCKED_OPCODES, FuseServer, FuseStatistics

__all__ = [
    "MAX_WRITE",
    "UNLOCKED_OPCODES",
    "FsPolicy",
    "FsServerError",
    "FuseServer",
    "FuseStatistics",
    "PassthroughFs",
    "ReplyErrno",
    "VirtioFs",
]
