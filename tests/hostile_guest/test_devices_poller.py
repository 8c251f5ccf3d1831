"""One bad host fd never stops the other devices (issue 11, finding 9, the device poller's half).

The VMM's DevicePoller keeps epoll equal to every device's `watched()`. A regular file, a closed fd or an
O_PATH fd cannot be polled: it is reported once, handed back to its device as POLLNVAL, and every other fd
of every device stays watched, round after round.
"""

from __future__ import annotations

import logging
import os
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_virtio import VirtioVsock
from kata_virtio._vsock import (
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VSOCK_HDR,
)
from kata_virtio.testing import FakeGuestMemory, activate
from kata_vmm._event_loop import EventLoop
from kata_vmm._virtio import DevicePoller


class OddSource:
    """A device whose one host fd cannot be polled; it drops the fd when told (POLLNVAL)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.events: list[tuple[int, int]] = []
        self.drop_on_nval = True

    def watched(self) -> dict[int, int]:
        return {self.fd: select.POLLIN} if self.fd >= 0 else {}

    def handle_event(self, fd: int, events: int) -> None:
        self.events.append((fd, events))
        if events & select.POLLNVAL and self.drop_on_nval:
            self.fd = -1


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    ev = EventLoop(tick=0.01)  # never started: the test runs the poller's rounds itself
    yield ev
    ev.stop()


def _odd_fd(kind: str, tmp_path: Path) -> int:
    (tmp_path / "f").write_bytes(b"x")
    if kind == "regular_file":
        return os.open(tmp_path / "f", os.O_RDONLY | os.O_CLOEXEC)
    if kind == "o_path":
        return os.open(tmp_path / "f", os.O_PATH | os.O_CLOEXEC)
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)
    return fd  # closed


@pytest.mark.parametrize("kind", ["regular_file", "o_path", "closed"])
def test_an_unpollable_fd_is_reported_once_and_other_devices_stay_served(
    loop: EventLoop, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    vsock = VirtioVsock(tmp_path / "kata.hvsock")
    fd = _odd_fd(kind, tmp_path)
    odd = OddSource(fd)
    odd.drop_on_nval = False  # a device that keeps listing it must not make the poller raise or spam
    try:
        poller = DevicePoller(loop, [odd, vsock])
        with caplog.at_level(logging.WARNING):
            for _ in range(5):
                poller.sync()  # on main: PermissionError / FileNotFoundError on every round
        assert set(vsock.watched()) <= set(loop._callbacks)  # the good device is watched
        assert fd not in loop._callbacks
        assert len([r for r in caplog.records if "cannot be polled" in r.getMessage()]) == 1
        assert all(ev & select.POLLNVAL for _, ev in odd.events) and odd.events
        odd.drop_on_nval = True
        poller.sync()
        poller.sync()
        assert odd.fd == -1 and fd not in poller._unpollable
    finally:
        if kind != "closed":
            os.close(fd)
        vsock.close()


def test_devices_without_host_fds_are_skipped_and_a_raising_source_is_isolated(
    loop: EventLoop, tmp_path: Path
) -> None:
    class Raising:
        def watched(self) -> dict[int, int]:
            raise RuntimeError("bug")

        def handle_event(self, fd: int, events: int) -> None:
            raise AssertionError("never called")

        def tick(self) -> None:
            raise RuntimeError("bug")

    vsock = VirtioVsock(tmp_path / "kata.hvsock")
    try:
        poller = DevicePoller(loop, [object(), Raising(), vsock])
        poller._next_tick = 0.0  # a tick is due this round
        poller.sync()
        assert set(vsock.watched()) <= set(loop._callbacks)
    finally:
        vsock.close()


def test_vsock_drops_only_the_connection_whose_fd_is_unpollable(tmp_path: Path) -> None:
    """POLLNVAL for one connection's fd: RST to the guest for it alone; the device stays healthy."""
    dev = VirtioVsock(tmp_path / "kata.hvsock")
    mem = FakeGuestMemory(4 << 20)
    (rx, tx, _), irq = activate(dev, mem, [64, 64, 16])
    for _ in range(16):
        rx.add_chain([(VSOCK_HDR.size, True), (4096, True)])
    dev.notify(0)
    clients = []
    try:
        for _ in range(2):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(dev.uds_path)
            c.sendall(b"CONNECT 1024\n")
            c.settimeout(10)
            clients.append(c)
        for _ in range(20):
            poller = select.poll()
            for fd, ev in dev.watched().items():
                poller.register(fd, ev)
            for fd, ev in poller.poll(50):
                dev.handle_event(fd, ev)
        reqs = [VSOCK_HDR.unpack_from(rx.written(h, n)) for h, n in rx.get_used()]
        reqs = [h for h in reqs if h[6] == VIRTIO_VSOCK_OP_REQUEST]
        assert len(reqs) == 2
        for hdr in reqs:
            raw = VSOCK_HDR.pack(3, 2, hdr[3], hdr[2], 0, 1, VIRTIO_VSOCK_OP_RESPONSE, 0, 1 << 20, 0)
            tx.add_chain([(raw, False)])
        dev.notify(1)
        assert dev.connection_count == 2
        victim = next(c for c in dev._conns.values() if c.local_port == reqs[0][2])
        dev.handle_event(victim.sock.fileno(), select.POLLNVAL)
        assert dev.connection_count == 1 and not dev.broken and irq.needs_reset == []
        ops = [VSOCK_HDR.unpack_from(rx.written(h, n))[6] for h, n in rx.get_used()]
        assert VIRTIO_VSOCK_OP_RST in ops
    finally:
        for c in clients:
            c.close()
        dev.close()
