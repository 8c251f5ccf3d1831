"""Constants of the virtio 1.2 specification (names kept as in the spec and Linux uapi headers)."""

from __future__ import annotations

# virtio 1.2 §2.1: device status field
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# virtio 1.2 §6: reserved feature bits
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35

# virtio 1.2 §5: device ids
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_RNG = 4
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_VSOCK = 19
VIRTIO_ID_MEM = 24
VIRTIO_ID_FS = 26

# virtio 1.2 §2.7.5: split virtqueue descriptor flags
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# virtio 1.2 §2.7.6 / §2.7.8: ring flags
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# virtio 1.2 §4.2.2: virtio-mmio interrupt status bits
VIRTIO_MMIO_INT_VRING = 1
VIRTIO_MMIO_INT_CONFIG = 2


def bit(n: int) -> int:
    """The feature mask of feature bit ``n``."""
    return 1 << n
