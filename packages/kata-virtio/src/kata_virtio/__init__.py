"""Virtio devices: split virtqueue, virtio-mmio transport, vsock/block/net/fs/rng devices (no KVM code)."""

from kata_virtio.__about__ import __version__
from kata_virtio._memory import GuestAddressError, GuestMemory, InterruptTrigger, VirtioError

__all__ = ["GuestAddressError", "GuestMemory", "InterruptTrigger", "VirtioError", "__version__"]
