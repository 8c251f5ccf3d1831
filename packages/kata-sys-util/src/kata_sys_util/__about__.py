"""Version of kata-sys-util."""

__version__ = "0.1.0"
