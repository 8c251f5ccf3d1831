"""Errors of the agent client."""

from __future__ import annotations


class AgentError(Exception):
    """Base of the client's own errors (ttrpc status errors come as `kata_proto.ttrpc.TtrpcError`)."""


class AgentTimeout(AgentError, TimeoutError):
    """Raised when the agent did not become ready (Health.Check SERVING) within the deadline."""


class BadAddress(AgentError, ValueError):
    """Raised for an agent address that is not unix:, hvsock: or vsock:."""


class HandshakeFailed(AgentError, ConnectionError):
    """Raised when the hybrid vsock muxer did not answer `OK <port>` to `CONNECT <port>`."""
