"""The VMM's event thread: one OS thread, one epoll set, for every device's I/O.

Devices register file descriptors (eventfds, taps, sockets, the console input)
with a callback; other threads hand work to the loop with `EventLoop.call_soon`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import select
import threading
from collections import deque
from collections.abc import Callable

from kata_vmm._eventfd import EventFd
from kata_vmm._sys import NamedThread

log = logging.getLogger(__name__)

EventCallback = Callable[[int], None]
"""Called on the event thread with the ready epoll event mask."""


class EventLoop:
    """An epoll loop on its own named thread (``kata-vmm-events``)."""

    def __init__(self, *, tick: float = 0.05, name: str = "kata-vmm-events") -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, EventCallback] = {}
        self._wakeup = EventFd()
        self._pending: deque[Callable[[], None]] = deque()
        self._tickers: list[Callable[[], None]] = []
        self._tick = tick
        self._stopping = False
        self._thread = NamedThread(self._run, name=name)
        self._epoll.register(self._wakeup.fd, select.EPOLLIN)
        self.errors: list[BaseException] = []

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def add_reader(self, fd: int, callback: EventCallback, events: int = select.EPOLLIN) -> None:
        """Call ``callback(mask)`` on the event thread whenever ``fd`` is ready."""
        self._callbacks[fd] = callback
        self._epoll.register(fd, events)

    def watch(self, fd: int, callback: EventCallback, events: int) -> None:
        """Watch ``fd`` for ``events`` with ``callback``, or change both if it is already watched."""
        self._callbacks[fd] = callback
        try:
            self._epoll.modify(fd, events)
        except FileNotFoundError:  # not (or no longer: closed and reused) in the epoll set
            self._epoll.register(fd, events)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd``."""
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def add_ticker(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` on the event thread at least every tick (e.g. to flush buffered console output)."""
        self._tickers.append(fn)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the event thread; safe from any thread."""
        self._pending.append(fn)
        self._wakeup.write(1)

    def _run(self) -> None:
        while not self._stopping:
            try:
                events = self._epoll.poll(self._tick)
            except InterruptedError:
                continue
            for fd, mask in events:
                if fd == self._wakeup.fd:
                    self._wakeup.read()
                    continue
                callback = self._callbacks.get(fd)
                if callback is not None:
                    self._guard(functools.partial(callback, mask))
            while self._pending:
                self._guard(self._pending.popleft())
            for ticker in self._tickers:
                self._guard(ticker)
        for ticker in self._tickers:
            self._guard(ticker)

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as err:  # a faulty device must not kill the loop that serves the others
            log.exception("event-thread callback failed")
            self.errors.append(err)

    @property
    def thread(self) -> threading.Thread:
        """The OS thread running the loop."""
        return self._thread

    def stop(self) -> None:
        """Stop the loop, join its thread and close the epoll set (idempotent)."""
        self._stopping = True
        if self._wakeup.fd >= 0:
            self._wakeup.write(1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        self._epoll.close()
        self._wakeup.close()
