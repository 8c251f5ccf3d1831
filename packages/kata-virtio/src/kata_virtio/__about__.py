"""Version of kata-virtio."""

__version__ = "0.1.0"
