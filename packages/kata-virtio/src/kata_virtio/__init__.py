"""Virtio devices: split virtqueue, virtio-mmio transport, vsock/block/net/fs/rng/balloon/mem; no KVM code."""

from kata_virtio.__about__ import __version__
from kata_virtio._balloon import BALLOON_PAGE_SIZE, VirtioBalloon
from kata_virtio._block import VirtioBlock
from kata_virtio._device import DeviceError, DeviceInterrupt, EventSource, Ticking, VirtioDevice
from kata_virtio._mem import VirtioMem
from kata_virtio._memory import DISCARD_ALIGN, GuestAddressError, GuestMemory, InterruptTrigger, VirtioError
from kata_virtio._mmio import MMIO_WINDOW_SIZE, VIRTIO_MMIO_QUEUE_NOTIFY, MmioTransport
from kata_virtio._net import VirtioNet, open_tap
from kata_virtio._queue import (
    AvailRingError,
    ChainReader,
    ChainWriter,
    DescriptorChain,
    DescriptorChainTooLong,
    DescriptorIndexError,
    DescriptorLengthError,
    DescriptorOrderError,
    IndirectDescriptorError,
    Queue,
    QueueConfigError,
    QueueError,
)
from kata_virtio._rng import VirtioRng
from kata_virtio.fs import FsPolicy, FsServerError, FuseServer, FuseStatistics, VirtioFs
from kata_virtio.vsock import VirtioVsock

__all__ = [
    "BALLOON_PAGE_SIZE",
    "DISCARD_ALIGN",
    "MMIO_WINDOW_SIZE",
    "VIRTIO_MMIO_QUEUE_NOTIFY",
    "AvailRingError",
    "ChainReader",
    "ChainWriter",
    "DescriptorChain",
    "DescriptorChainTooLong",
    "DescriptorIndexError",
    "DescriptorLengthError",
    "DescriptorOrderError",
    "DeviceError",
    "DeviceInterrupt",
    "EventSource",
    "FsPolicy",
    "FsServerError",
    "FuseServer",
    "FuseStatistics",
    "GuestAddressError",
    "GuestMemory",
    "IndirectDescriptorError",
    "InterruptTrigger",
    "MmioTransport",
    "Queue",
    "QueueConfigError",
    "QueueError",
    "Ticking",
    "VirtioBalloon",
    "VirtioBlock",
    "VirtioDevice",
    "VirtioError",
    "VirtioFs",
    "VirtioMem",
    "VirtioNet",
    "VirtioRng",
    "VirtioVsock",
    "__version__",
    "open_tap",
]
