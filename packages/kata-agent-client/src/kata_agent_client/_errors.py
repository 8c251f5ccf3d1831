"""Errors of the agent client: every call raises one of these, never a transport or ttrpc error.

`AgentCallError` and its subclasses: the agent answered with an error status (`code`, `method`).
`AgentDisconnected`: the connection is gone (the call may or may not have run); `AgentConnectionLost` when
the client has given up on it for good.
"""

from __future__ import annotations

import trio

from kata_proto import ttrpc


class AgentError(Exception):
    """Base of every error the client raises."""


class AgentTimeout(AgentError, TimeoutError):
    """Raised when the agent did not become ready (Health.Check SERVING) within the deadline."""


class BadAddress(AgentError, ValueError):
    """Raised for an agent address that is not unix:, hvsock: or vsock:."""


class HandshakeFailed(AgentError, ConnectionError):
    """Raised when the hybrid vsock muxer did not answer `OK <port>` to `CONNECT <port>`."""


class BadSpec(AgentError, ValueError):
    """Raised before any call for a request the client cannot build (an OCI spec that does not convert)."""


class AgentCallError(AgentError):
    """The agent answered `method` with an error status."""

    def __init__(self, method: str, code: ttrpc.Code, message: str) -> None:
        super().__init__(f"{method}: {code.name}: {message}" if message else f"{method}: {code.name}")
        self.method = method
        self.code = code
        self.message = message


class AgentNotFound(AgentCallError):
    """NOT_FOUND: no such container or process."""


class AgentAlreadyExists(AgentCallError):
    """ALREADY_EXISTS."""


class AgentInvalidArgument(AgentCallError):
    """INVALID_ARGUMENT: the agent refused the request as malformed."""


class AgentFailedPrecondition(AgentCallError):
    """FAILED_PRECONDITION: not possible in the current state (not running, already started...)."""


class AgentUnimplemented(AgentCallError):
    """UNIMPLEMENTED: the agent does not offer this call."""


class AgentDeadlineExceeded(AgentCallError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's timeout passed (here or in the agent)."""


class AgentDisconnected(AgentError, ConnectionError):
    """The connection to the agent broke or was closed; the call's outcome is unknown."""


class AgentConnectionLost(AgentDisconnected):
    """The agent is gone for good: no reconnect, or it did not come back within the budget."""


_TRANSPORT = (ttrpc.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError)

_BY_CODE: dict[ttrpc.Code, type[AgentCallError]] = {
    ttrpc.Code.NOT_FOUND: AgentNotFound,
    ttrpc.Code.ALREADY_EXISTS: AgentAlreadyExists,
    ttrpc.Code.INVALID_ARGUMENT: AgentInvalidArgument,
    ttrpc.Code.FAILED_PRECONDITION: AgentFailedPrecondition,
    ttrpc.Code.UNIMPLEMENTED: AgentUnimplemented,
    ttrpc.Code.DEADLINE_EXCEEDED: AgentDeadlineExceeded,
}


def agent_error(err: BaseException, method: str) -> AgentError | None:
    """The client's error for what a ttrpc call to `method` raised; None for anything else (a bug, a
    cancellation) that must pass through unchanged."""
    if isinstance(err, AgentError):
        return err
    if isinstance(err, _TRANSPORT):
        return AgentDisconnected(f"{method}: {err}")
    if isinstance(err, ttrpc.TtrpcError):
        return _BY_CODE.get(err.code, AgentCallError)(method, err.code, err.message)
    return None
