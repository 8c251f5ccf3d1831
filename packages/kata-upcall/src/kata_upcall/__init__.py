"""dbs-upcall message codec and client state machine (VMM -> guest kernel hotplug channel)."""

from kata_upcall.__about__ import __version__

__all__ = ["__version__"]
