"""gRPC status codes and the typed errors a ttrpc call raises."""

from __future__ import annotations

import enum
from collections.abc import Iterable

import trio
from google.protobuf import any_pb2

from kata_proto._gen.google.rpc import status_pb2


class Code(enum.IntEnum):
    """gRPC status codes (google/rpc/code.proto); ttrpc carries them in Response.status.code."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(Exception):
    """Base of every kata_proto.ttrpc error: a gRPC status code, a message and optional details.

    Raise a subclass from a server handler to answer with its code; a client call raises
    the subclass that matches the status the server sent (see `error_for_status`).
    """

    code: Code = Code.UNKNOWN

    def __init__(self, message: str = "", *, details: Iterable[any_pb2.Any] = (), code: Code | None = None):
        super().__init__(message)
        if code is not None:
            self.code = Code(code)
        self.message = message
        self.details: list[any_pb2.Any] = list(details)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}" if self.message else self.code.name

    def to_status(self) -> status_pb2.Status:
        """This error as the google.rpc.Status a server puts in its Response."""
        return status_pb2.Status(code=int(self.code), message=self.message, details=self.details)


class Canceled(TtrpcError):
    """The call was cancelled (usually by the caller)."""

    code = Code.CANCELLED


class Unknown(TtrpcError):
    """The handler failed with an error that carries no status code."""

    code = Code.UNKNOWN


class InvalidArgument(TtrpcError):
    """The request was malformed or named something invalid."""

    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(TtrpcError):
    """The call's deadline passed before a response arrived."""

    code = Code.DEADLINE_EXCEEDED


class NotFound(TtrpcError):
    """The requested object does not exist."""

    code = Code.NOT_FOUND


class AlreadyExists(TtrpcError):
    """The object a call tried to create exists already."""

    code = Code.ALREADY_EXISTS


class PermissionDenied(TtrpcError):
    """The caller may not do this."""

    code = Code.PERMISSION_DENIED


class ResourceExhausted(TtrpcError):
    """A limit was hit, for instance a frame larger than 4 MiB."""

    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(TtrpcError):
    """The system is not in a state where the call can run."""

    code = Code.FAILED_PRECONDITION


class Aborted(TtrpcError):
    """The call was aborted, typically by a concurrency conflict."""

    code = Code.ABORTED


class OutOfRange(TtrpcError):
    """The call went past a valid range."""

    code = Code.OUT_OF_RANGE


class Unimplemented(TtrpcError):
    """The server does not know the service or method, or does not support it."""

    code = Code.UNIMPLEMENTED


class Internal(TtrpcError):
    """An invariant broke on the other side, for instance a payload that did not decode."""

    code = Code.INTERNAL


class Unavailable(TtrpcError):
    """The service cannot be reached now; retrying may work."""

    code = Code.UNAVAILABLE


class DataLoss(TtrpcError):
    """Data was lost or corrupted."""

    code = Code.DATA_LOSS


class Unauthenticated(TtrpcError):
    """The caller is not authenticated."""

    code = Code.UNAUTHENTICATED


class ProtocolError(TtrpcError):
    """The peer broke the ttrpc framing; the connection cannot be used any more."""

    code = Code.INTERNAL


class ConnectionClosed(Unavailable, trio.BrokenResourceError):
    """The connection dropped (or broke) while a call was pending, or before it was sent.

    It is both an `Unavailable` ttrpc error and a `trio.BrokenResourceError`, so either
    `except` clause catches it.
    """


_BY_CODE: dict[Code, type[TtrpcError]] = {
    cls.code: cls
    for cls in (
        Canceled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_for_status(status: status_pb2.Status) -> TtrpcError:
    """The typed error for a non-OK google.rpc.Status (a code we do not know becomes `Unknown`)."""
    try:
        code = Code(status.code)
    except ValueError:
        return Unknown(f"unknown status code {status.code}: {status.message}", details=status.details)
    if code is Code.OK:
        raise ValueError("status OK is not an error")
    return _BY_CODE[code](status.message, details=status.details)
