"""Virtio devices: split virtqueue, virtio-mmio transport, vsock/block/net/fs/rng devices (no KVM code)."""

from kata_virtio.__about__ import __version__

__all__ = ["__version__"]
