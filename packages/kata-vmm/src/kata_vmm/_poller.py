"""The device poller: every device's host fds on the VMM's event thread, through kata-virtio's protocols.

A device that has host fds (vsock's sockets, the tap) implements `kata_virtio.EventSource`; one with
periodic work (connection expiry) implements `kata_virtio.Ticking`. The poller checks each device against
those runtime-checkable Protocols once, when it is made, and never probes for methods afterwards.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable, Sequence

from kata_virtio import EventSource, Ticking
from kata_vmm._event_loop import EventLoop

TICK_SECONDS = 1.0
"""How often `Ticking.tick` runs."""

_log = logging.getLogger(__name__)


class DevicePoller:
    """Keeps the event loop's epoll set equal to the union of every device's `watched()`.

    One map for all devices, so an fd number one device closes and another reuses in the same round
    goes to its new owner. Runs as an event-loop ticker: after each round of events, and at least
    every loop tick; calls `tick()` of devices that have one about once a second.

    Devices are served through kata_virtio's `EventSource` and `Ticking` protocols. Errors stay with
    the fd (or device) they belong to: an fd epoll refuses (closed, a regular file, O_PATH) is logged
    once, handed back to its device as ``POLLNVAL`` (which drops that connection), and every other fd
    of every device is still watched; a device whose `watched()` or `tick()` raises is logged and
    skipped for that round.
    """

    def __init__(self, loop: EventLoop, devices: Sequence[object]) -> None:
        self.loop = loop
        self.sources = [d for d in devices if isinstance(d, EventSource)]
        self.tickers = [d for d in devices if isinstance(d, Ticking)]
        self._owner: dict[int, EventSource] = {}
        self._events: dict[int, int] = {}
        self._unpollable: dict[int, EventSource] = {}  # fds epoll refused, reported once while listed
        self._next_tick = time.monotonic() + TICK_SECONDS
        loop.add_ticker(self.sync)

    def add_device(self, device: object) -> None:
        """Serve a hot-plugged device's fds and ticks too (on the event thread)."""
        if isinstance(device, EventSource) and device not in self.sources:
            self.sources.append(device)
        if isinstance(device, Ticking) and device not in self.tickers:
            self.tickers.append(device)
        self.sync()

    def remove_device(self, device: object) -> None:
        """Stop serving ``device`` and drop its fds from epoll now, before it closes them (on the event
        thread), so a reused fd number never reaches it."""
        self.sources = [s for s in self.sources if s is not device]
        self.tickers = [t for t in self.tickers if t is not device]
        self.sync()

    def sync(self) -> None:
        """Re-read every device's interest set and update epoll; run the 1 s ticks when due."""
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + TICK_SECONDS
            for ticker in self.tickers:
                try:
                    ticker.tick()
                except Exception:
                    _log.exception("%s.tick failed", type(ticker).__name__)
        wanted: dict[int, tuple[EventSource, int]] = {}
        for src in self.sources:
            try:
                interest = src.watched()
            except Exception:
                _log.exception("%s.watched failed; its fds are skipped this round", type(src).__name__)
                continue
            for fd, events in interest.items():
                wanted[fd] = (src, _epoll_mask(events))
        for fd in [fd for fd in self._owner if fd not in wanted]:
            self.loop.remove_reader(fd)
            del self._owner[fd], self._events[fd]
        for fd in [fd for fd in self._unpollable if fd not in wanted]:
            del self._unpollable[fd]  # its device let it go: a later fd with this number is new
        for fd, (src, mask) in wanted.items():
            if self._owner.get(fd) is src and self._events[fd] == mask:
                continue
            try:
                self.loop.watch(fd, self._dispatch(fd), mask)
            except (OSError, ValueError) as err:
                self._refused(fd, src, err)
                continue
            self._owner[fd], self._events[fd] = src, mask
            self._unpollable.pop(fd, None)

    def _refused(self, fd: int, src: EventSource, err: Exception) -> None:
        """epoll will not take ``fd``: forget it, say so once, and let its device drop it."""
        self.loop.remove_reader(fd)
        self._owner.pop(fd, None)
        self._events.pop(fd, None)
        if self._unpollable.get(fd) is not src:
            _log.warning("%s: fd %d cannot be polled (%s); dropping it", type(src).__name__, fd, err)
            self._unpollable[fd] = src
        try:
            src.handle_event(fd, select.POLLNVAL)
        except Exception:
            _log.exception("%s.handle_event(POLLNVAL) failed", type(src).__name__)

    def _dispatch(self, fd: int) -> Callable[[int], None]:
        def ready(mask: int) -> None:
            src = self._owner.get(fd)
            if src is not None:
                src.handle_event(fd, _poll_mask(mask))

        return ready

    def close(self) -> None:
        """Forget every fd (the loop is stopped or the devices are closing)."""
        for fd in list(self._owner):
            self.loop.remove_reader(fd)
        self._owner.clear()
        self._events.clear()
        self._unpollable.clear()


# poll(2) and epoll(7) share the values of IN/OUT/ERR/HUP; map explicitly so that stays checked
_BITS = (
    (select.POLLIN, select.EPOLLIN),
    (select.POLLOUT, select.EPOLLOUT),
    (select.POLLERR, select.EPOLLERR),
    (select.POLLHUP, select.EPOLLHUP),
    (select.POLLPRI, select.EPOLLPRI),
)


def _epoll_mask(poll_events: int) -> int:
    return sum(e for p, e in _BITS if poll_events & p)


def _poll_mask(epoll_events: int) -> int:
    return sum(p for p, e in _BITS if epoll_events & e)
