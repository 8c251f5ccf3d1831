"""Former home of the virtio-fs device, now `kata_virtio.fs.device`: this module re-exports its names."""

from kata_virtio.fs.device import VirtioFs

__all__ = ["VirtioFs"]
