"""Version of kata-vmm."""

__version__ = "0.1.0"
