"""Former home of the FUSE server, now `kata_virtio.fs.server`: this module re-exports its names."""

from kata_virtio.fs.server import *  # noqa: F403
from kata_virtio.fs.server import __all__  # noqa: F401
