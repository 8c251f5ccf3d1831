"""trio client for the Kata agent API (grpc.AgentService, grpc.Health) over hybrid vsock."""

from kata_agent_client.__about__ import __version__

__all__ = ["__version__"]
