"""containerd-shim-kata-v2: the containerd shim v2 for runtime io.containerd.kata.v2."""

from kata_shim.__about__ import __version__

__all__ = ["__version__"]
