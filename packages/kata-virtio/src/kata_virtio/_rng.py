"""virtio-rng (virtio 1.2 §5.4): entropy from the host's os.urandom."""

from __future__ import annotations

import os

from kata_virtio._device import VirtioDevice
from kata_virtio._queue import DescriptorChain
from kata_virtio._spec import VIRTIO_ID_RNG

#: Cap per request so one hostile 4 GiB buffer does not stall the event thread.
MAX_RNG_REQUEST = 64 * 1024


class VirtioRng(VirtioDevice):
    """An entropy device with one request queue; no features, no config space."""

    device_type = VIRTIO_ID_RNG
    queue_max_sizes = (256,)

    @property
    def avail_features(self) -> int:
        """No device-specific features (§5.4.3)."""
        return 0

    def config_bytes(self) -> bytes:
        """No configuration space (§5.4.4)."""
        return b""

    def queue_notify(self, index: int) -> None:
        """Fill every available device-writable buffer with random bytes (§5.4.6)."""
        self.drain_queue(0, self._fill)

    def _fill(self, chain: DescriptorChain) -> int:
        assert self.memory is not None
        writer = chain.writer(self.memory)
        writer.write(os.urandom(min(writer.remaining, MAX_RNG_REQUEST)))
        return writer.written
