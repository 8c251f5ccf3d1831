"""virtio-fs with an inline FUSE passthrough server, split as virtiofsd is.

- `server`: `FuseServer`, the FUSE protocol (in-header and per-opcode decoding, checks on guest lengths,
  reply encoding) over one share;
- `device`: `VirtioFs`, the virtio device (request queues, worker threads for blocking operations).
"""

from kata_virtio.fs.device import VirtioFs
from kata_virtio.fs.server import MAX_WRITE, UNLOCKED_OPCODES, FsPolicy, FsServerError, FuseServer

__all__ = ["MAX_WRITE", "UNLOCKED_OPCODES", "FsPolicy", "FsServerError", "FuseServer", "VirtioFs"]
