"""Errors of the agent; each maps to a ttrpc status code at the service edge."""

from __future__ import annotations

from kata_proto import ttrpc


class AgentError(Exception):
    """Base of every error the agent raises itself."""


class RuntimeFailed(AgentError):
    """Raised when the OCI runtime binary (crun/runc) exits non-zero."""

    def __init__(self, command: str, message: str) -> None:
        super().__init__(f"{command}: {message}")
        self.command = command


def not_found(what: str) -> ttrpc.NotFound:
    """A NotFound status error for `what`."""
    return ttrpc.NotFound(f"{what} not found")
