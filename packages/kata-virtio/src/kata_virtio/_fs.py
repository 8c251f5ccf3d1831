"""virtio-fs (virtio 1.2 §5.11): FUSE requests from the guest served by an inline passthrough server."""

from __future__ import annotations

import os
import struct

from kata_virtio._device import DeviceError, VirtioDevice
from kata_virtio._fs_server import MAX_WRITE, FsPolicy, FuseServer
from kata_virtio._queue import DescriptorChain
from kata_virtio._spec import VIRTIO_ID_FS

#: §5.11.4: the tag is a 36-byte, NUL-padded UTF-8 string.
TAG_SIZE = 36
QUEUE_SIZE = 1024
MAX_REQUEST = MAX_WRITE + 4096


class VirtioFs(VirtioDevice):
    """A virtio-fs device sharing ``shared_dir`` under ``tag``: queue 0 is hiprio, then request queues.

    ``policy`` says what the guest may do to host objects (default: the safe `FsPolicy()`).
    """

    device_type = VIRTIO_ID_FS

    def __init__(
        self,
        tag: str,
        shared_dir: str | os.PathLike[str],
        *,
        num_request_queues: int = 1,
        queue_size: int = QUEUE_SIZE,
        policy: FsPolicy | None = None,
    ) -> None:
        super().__init__()
        raw = tag.encode()
        if not raw or len(raw) > TAG_SIZE:
            raise DeviceError(f"virtio-fs tag must be 1..{TAG_SIZE} bytes of UTF-8")
        if num_request_queues < 1:
            raise DeviceError("virtio-fs needs at least one request queue")
        self.tag = tag
        self.num_request_queues = num_request_queues
        self.queue_max_sizes = (queue_size,) * (1 + num_request_queues)
        self.server = FuseServer(shared_dir, policy=policy)

    def close(self) -> None:
        """Close the server's fds."""
        self.server.close()

    @property
    def avail_features(self) -> int:
        """No device-specific features (VIRTIO_FS_F_NOTIFICATION is not offered) (§5.11.3)."""
        return 0

    def config_bytes(self) -> bytes:
        """struct virtio_fs_config: tag[36], num_request_queues (§5.11.4)."""
        return struct.pack("<36sI", self.tag.encode(), self.num_request_queues)

    def queue_notify(self, index: int) -> None:
        """Serve every request on queue ``index``: readable part is the request, writable part the reply."""
        self.drain_queue(index, self._serve)

    def _serve(self, chain: DescriptorChain) -> int:
        mem = self.memory
        assert mem is not None
        reader = chain.reader(mem)
        # A request never exceeds max_write plus its headers; a longer chain only gets its header
        # read (the length check in the server then answers EINVAL) so the guest cannot make us
        # copy gigabytes.
        request = reader.read(MAX_REQUEST) if reader.remaining <= MAX_REQUEST else reader.read(40)
        reply = self.server.handle(request, chain.writable_len)
        return 0 if reply is None else chain.writer(mem).write(reply)

    def on_reset(self) -> None:
        """A reset drops every inode and handle the guest held (as FUSE_DESTROY).

        It runs on the thread that wrote the status register (a vCPU); the server's lock
        serialises it with requests on the event thread.
        """
        self.server.reset()
