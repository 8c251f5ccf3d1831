"""Version of kata-agent-client."""

__version__ = "0.1.0"
