"""Former home of the vsock device, now `kata_virtio.vsock`: this module re-exports its names."""

from kata_virtio.vsock import *  # noqa: F403
from kata_virtio.vsock import __all__  # noqa: F401
