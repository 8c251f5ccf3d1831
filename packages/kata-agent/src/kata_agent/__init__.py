"""The in-guest Kata agent: ttrpc server on vsock port 1024 running containers with crun."""

from kata_agent.__about__ import __version__

__all__ = ["__version__"]
