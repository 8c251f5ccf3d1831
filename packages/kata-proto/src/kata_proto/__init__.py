"""Protocol layer: Kata agent and containerd protobuf messages, and ttrpc over trio."""

from kata_proto.__about__ import __version__

__all__ = ["__version__"]
