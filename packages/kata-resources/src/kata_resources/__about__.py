"""Version of kata-resources."""

__version__ = "0.1.0"
