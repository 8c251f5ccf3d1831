"""What an error from below becomes at the ttrpc edge: the right status code and a clear message."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import trio

from kata_proto import ttrpc
from kata_shim.hypervisor._base import HypervisorError
from kata_shim.persist import PersistError
from kata_shim.runtime._base import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RuntimeHandlerError,
)

log = logging.getLogger("kata_shim.service")

_CODES: list[tuple[type[RuntimeHandlerError], type[ttrpc.TtrpcError]]] = [
    (NotFound, ttrpc.NotFound),
    (AlreadyExists, ttrpc.AlreadyExists),
    (FailedPrecondition, ttrpc.FailedPrecondition),
    (InvalidArgument, ttrpc.InvalidArgument),
]


def to_ttrpc_error(exc: BaseException, method: str) -> ttrpc.TtrpcError | None:
    """The ttrpc error for `exc`, or None for what must propagate as it is (cancellation)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, ttrpc.TtrpcError):
        return exc
    if not isinstance(exc, Exception):
        return None
    message = str(exc) or type(exc).__name__
    for mine, theirs in _CODES:
        if isinstance(exc, mine):
            # NotFound is routine (containerd probes); the others are worth a line in containerd's log.
            log.log(logging.DEBUG if mine is NotFound else logging.WARNING, "%s failed: %s", method, message)
            return theirs(message)
    if isinstance(exc, (RuntimeHandlerError, HypervisorError, PersistError)):
        log.warning("%s failed: %s", method, message, exc_info=exc)
        return ttrpc.Internal(message)
    if isinstance(exc, (trio.TooSlowError, TimeoutError)):
        return ttrpc.DeadlineExceeded(f"{method}: {message}")
    log.error("%s failed unexpectedly", method, exc_info=exc)
    return ttrpc.Unknown(f"{method}: {type(exc).__name__}: {message}")


@contextlib.contextmanager
def status_for(method: str) -> Iterator[None]:
    """``with status_for("Create"):`` turns any error raised inside into the matching TtrpcError."""
    try:
        yield
    except Exception as exc:
        mapped = to_ttrpc_error(exc, method)
        if mapped is None or mapped is exc:
            raise
        raise mapped from exc
