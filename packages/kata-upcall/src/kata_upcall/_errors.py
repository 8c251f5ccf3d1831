"""The exceptions kata-upcall raises: one base class, subclasses named for what failed (stdlib only)."""

from __future__ import annotations

import errno as _errno
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kata_upcall._codec import Reply, Request


class UpcallError(Exception):
    """Base class of every error kata-upcall raises."""


class UpcallProtocolError(UpcallError):
    """Raised when bytes from the guest are not valid dbs-upcall (short, long, wrong magic, unknown type,
    sizes that lie, an answer nobody asked for); the connection that carried them is unusable."""


class UpcallNotConnected(UpcallError):
    """Raised when a request is sent while the device-manager service is not connected (upstream's
    ``UpcallIsNotConnected``)."""


class UpcallBusy(UpcallError):
    """Raised when a request is sent while another one is in flight (upstream's ``UpcallIsBusy``):
    dbs-upcall carries one request at a time."""


class UpcallConnectionLost(UpcallError):
    """Raised to the caller of a request whose connection ended before its reply arrived (EOF, a transport
    error, garbage from the guest, or the request abandoned); the guest may or may not have acted on it."""


class UpcallTimeout(UpcallError):
    """Raised when a request did not complete within its budget; says which phase it was in."""


class UpcallRequestFailed(UpcallError):
    """Raised when the guest answered a request with a non-zero result (a negative errno from the guest
    kernel); ``reply`` carries it (a CPU reply says how many vCPUs were done before the failure)."""

    def __init__(self, request: Request, reply: Reply) -> None:
        self.request = request
        self.reply = reply
        result = reply.result
        name = _errno.errorcode.get(-result, "") if result < 0 else ""
        detail = f"{name} ({os.strerror(-result)})" if name else str(result)
        super().__init__(f"guest refused {request!r}: result {detail}")
