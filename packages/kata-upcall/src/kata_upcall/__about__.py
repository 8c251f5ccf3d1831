"""Version of kata-upcall."""

__version__ = "0.1.0"
