"""Version of kata-shim."""

__version__ = "0.1.0"
