"""Host resources for a sandbox: network, shared fs, rootfs, volumes, cgroups."""

from kata_resources.__about__ import __version__

__all__ = ["__version__"]
