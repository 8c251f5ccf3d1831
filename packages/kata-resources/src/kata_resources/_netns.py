"""Run a function inside a network namespace named by a path, without moving any other thread.

setns(2) with CLONE_NEWNET moves only the calling thread. Netlink sockets, taps and every other network
object a thread creates belong to the namespace the thread is in *when it creates them*, so a function
that opens an `IPRoute` or a tap in the namespace must run on a thread that is in it. We give each call
its own short-lived thread (`kata-netns`), which never returns to any pool: nothing else ever runs in the
sandbox's namespace by accident, and the event loop's threads stay in the shim's own namespace.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from kata_resources._errors import ResourceError
from kata_sys_util import CLONE_NEWNET, setns

T = TypeVar("T")


class NetnsError(ResourceError, OSError):
    """Raised when the network namespace cannot be opened or entered."""


def _open_netns(path: str | Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise NetnsError(err.errno, f"cannot open network namespace {path}: {err.strerror}") from err


def _enter(fd: int, path: str | Path) -> None:
    try:
        setns(fd, CLONE_NEWNET, str(path))
    except OSError as err:
        raise NetnsError(err.errno, f"setns({path}, CLONE_NEWNET): {os.strerror(err.errno or 0)}") from err


class _Call:
    """One function call on its own thread in the namespace; the outcome is kept for the caller."""

    def __init__(self, fd: int, path: str | Path, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fd, self.path, self.fn, self.args = fd, path, fn, args
        self.result: Any = None
        self.error: BaseException | None = None
        self.on_done: Callable[[], None] = lambda: None

    def run(self) -> None:
        try:
            _enter(self.fd, self.path)
            self.result = self.fn(*self.args)
        except BaseException as err:  # handed to the caller, raised there
            self.error = err
        finally:
            os.close(self.fd)
            self.on_done()

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


def _start(call: _Call, *, join: bool = True) -> threading.Thread:
    thread = threading.Thread(target=call.run, name="kata-netns", daemon=True)
    try:
        thread.start()
    except BaseException:
        os.close(call.fd)  # the thread that would have closed it never ran
        raise
    if join:
        thread.join()
    return thread


def run_in_netns(path: str | Path, fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)`` on a fresh thread inside the network namespace at ``path``; block until done.

    The thread ends with the call, so the namespace never leaks to another caller. Raises `NetnsError`
    when the namespace cannot be opened or entered, or whatever ``fn`` raised.
    """
    call = _Call(_open_netns(path), path, fn, args)
    _start(call)
    return call.outcome()  # type: ignore[no-any-return]


async def to_thread_in_netns(path: str | Path, fn: Callable[..., T], *args: Any) -> T:
    """`run_in_netns` from trio: the event loop keeps running while ``fn`` runs in the namespace.

    Not cancellable once started (netlink changes are not safely abandoned halfway), like
    `trio.to_thread.run_sync` without ``abandon_on_cancel``; callers bound the operation themselves.
    """
    call = _Call(_open_netns(path), path, fn, args)
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake() -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the caller's run is gone: nobody to tell
            token.run_sync_soon(done.set)

    call.on_done = wake
    thread = _start(call, join=False)
    with trio.CancelScope(shield=True):
        await done.wait()
    thread.join()
    return call.outcome()  # type: ignore[no-any-return]
