"""The upcall session of one running VM (dragonball hot-plug), and what its failures mean to the shim.

The back-end has no nursery of its own (the `Hypervisor` protocol has no ``async with``), so the kata-upcall
client's connection task runs in a trio *system task*, started on the first hot-plug and ended by
`UpcallSession.aclose` when the VM stops. A request in flight then fails (connection lost or client closed).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

import trio

from kata_shim.hypervisor._base import HypervisorError
from kata_upcall import (
    Handshake,
    StreamConnector,
    UpcallClient,
    UpcallError,
    UpcallRequestFailed,
    UpcallTimeout,
    open_upcall_client,
)

log = logging.getLogger("kata_shim.hypervisor.dragonball")


class UpcallSession:
    """One VM's upcall client, started by `client` on first use, ended by `aclose` (idempotent)."""

    def __init__(
        self, name: str, open_stream: Callable[[], tuple[StreamConnector, Handshake]], timeout: float
    ) -> None:
        self.name = name
        self.timeout = timeout
        """Seconds one request may take (connecting to the guest's server included)."""
        self._open_stream = open_stream
        self._client: UpcallClient | None = None
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()
        self._closed = False

    async def client(self) -> UpcallClient:
        """The running client (its connection task started on the first call); `HypervisorError` once
        closed or when it could not start. Callers serialise their calls (the back-end's hot-plug lock)."""
        if self._client is not None:
            return self._client
        if self._closed or self._scope is not None:
            raise HypervisorError("dragonball: the VM is stopping; no hot-plug")
        connect, handshake = self._open_stream()
        ready = trio.Event()
        scope = self._scope = trio.CancelScope()

        async def hold() -> None:
            # a system task: nothing may escape it
            try:
                with scope:
                    async with open_upcall_client(
                        connect, handshake=handshake, request_timeout=self.timeout
                    ) as up:
                        self._client = up
                        ready.set()
                        await trio.sleep_forever()
            except Exception as err:
                log.warning("%s: upcall client ended: %r", self.name, err)
            finally:
                self._client = None
                ready.set()
                self._done.set()

        trio.lowlevel.spawn_system_task(hold, name=f"dragonball-upcall-{self.name}")
        await ready.wait()
        if self._client is None:
            raise HypervisorError("dragonball: the upcall client did not start")
        return self._client

    async def aclose(self) -> None:
        """End the client (a request in flight fails); nothing starts again."""
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()
            with trio.CancelScope(shield=True):
                await self._done.wait()

    def error(self, what: str, err: BaseException) -> HypervisorError:
        """The shim's error for a failed hot-plug step, saying whose fault it was."""
        if isinstance(err, UpcallRequestFailed):
            code = -err.reply.result
            name = errno.errorcode.get(code, str(code))
            return HypervisorError(f"dragonball: {what}: the guest refused it ({name}: {os.strerror(code)})")
        if isinstance(err, UpcallTimeout):
            return HypervisorError(
                f"dragonball: {what}: no answer from the guest's upcall server within {self.timeout:g} s "
                f"(is the kata_upcall_srv module loaded in the guest?): {err}"
            )
        if isinstance(err, UpcallError):
            return HypervisorError(f"dragonball: {what}: upcall failed: {err}")
        if isinstance(err, trio.ClosedResourceError):
            return HypervisorError(f"dragonball: {what}: the VM is stopping")
        return HypervisorError(f"dragonball: {what}: {err}")
