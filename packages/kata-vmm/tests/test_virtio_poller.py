"""DevicePoller: the event loop's epoll set follows every device's `watched()`, round after round."""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from pathlib import Path

from kata_virtio import VirtioFs
from kata_virtio import _fuse as F
from kata_virtio.testing import FakeGuestMemory, activate, fuse_reply, fuse_request
from kata_vmm._event_loop import EventLoop
from kata_vmm._virtio import DevicePoller


class PipeDevice:
    """A device reading a pipe while ``wanted``; records what it was handed and its ticks."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.wanted = True
        self.got = bytearray()
        self.events: list[int] = []
        self.ticks = 0
        self.fired = threading.Event()

    def watched(self) -> dict[int, int]:
        return {self.r: select.POLLIN} if self.wanted and self.r >= 0 else {}

    def handle_event(self, fd: int, events: int) -> None:
        assert fd == self.r
        self.events.append(events)
        with contextlib.suppress(BlockingIOError):
            self.got += os.read(fd, 4096)
        self.fired.set()

    def tick(self) -> None:
        self.ticks += 1

    def close(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1


def wait_for(cond: object, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_poller_delivers_poll_masks_and_follows_the_interest_set() -> None:
    loop = EventLoop(tick=0.01)
    dev = PipeDevice()
    DevicePoller(loop, [dev])  # type: ignore[list-item]
    loop.start()
    try:
        os.write(dev.w, b"one")
        assert dev.fired.wait(5)
        wait_for(lambda: bytes(dev.got) == b"one")
        assert dev.events[0] & select.POLLIN
        dev.wanted = False  # e.g. the guest has no receive buffers: stop reading
        time.sleep(0.1)  # a few rounds: the fd leaves the epoll set
        dev.fired.clear()
        os.write(dev.w, b"two")
        assert not dev.fired.wait(0.2)
        dev.wanted = True
        wait_for(lambda: bytes(dev.got) == b"onetwo")
    finally:
        loop.stop()
        dev.close()


def test_poller_hands_a_reused_fd_number_to_its_new_owner_and_ticks_each_second() -> None:
    loop = EventLoop(tick=0.01)
    first, second = PipeDevice(), PipeDevice()
    second.wanted = False
    DevicePoller(loop, [first, second])  # type: ignore[list-item]
    loop.start()
    try:
        time.sleep(0.05)
        # the first device closes its pipe; the second opens one that gets the same fd number
        reused = first.r
        first.close()
        second.close()
        second.r, second.w = os.pipe()
        if second.r != reused:  # keep the test meaningful: move the read end onto the old number
            os.dup2(second.r, reused)
            os.close(second.r)
            second.r = reused
        os.set_blocking(second.r, False)
        second.wanted = True
        os.write(second.w, b"x")
        wait_for(lambda: bytes(second.got) == b"x")
        assert first.events == []
        wait_for(lambda: second.ticks >= 1, timeout=3)
    finally:
        loop.stop()
        second.close()


def test_poller_brings_virtio_fs_worker_answers_back_to_the_event_thread(tmp_path: Path) -> None:
    """An FSYNC served by a kata-fs worker reaches the used ring through the eventfd the poller watches."""
    (tmp_path / "f").write_bytes(b"x")
    dev = VirtioFs("tag", tmp_path)
    mem = FakeGuestMemory(1 << 20)
    (_, req), irq = activate(dev, mem, [16, 16])
    loop = EventLoop(tick=0.01)
    DevicePoller(loop, [dev])
    loop.start()
    try:
        look = fuse_request(F.FUSE_LOOKUP, 1, b"f\0", unique=2)
        head = req.add_chain([(look, False), (144, True)])
        loop.call_soon(lambda: dev.notify(1))
        wait_for(lambda: irq.used, timeout=60)
        node = F.FUSE_ENTRY_OUT_HEAD.unpack_from(fuse_reply(req.written(head))[1])[0]
        req.get_used()
        opened = req.add_chain(
            [
                (fuse_request(F.FUSE_OPEN, node, F.FUSE_OPEN_IN.pack(os.O_RDWR, 0), unique=4), False),
                (32, True),
            ]
        )
        loop.call_soon(lambda: dev.notify(1))
        wait_for(lambda: len(irq.used) >= 2, timeout=60)
        fh = F.FUSE_OPEN_OUT.unpack_from(fuse_reply(req.written(opened))[1])[0]
        req.get_used()
        body = F.FUSE_FSYNC_IN.pack(fh, 0, 0)
        fsync = req.add_chain([(fuse_request(F.FUSE_FSYNC, node, body, unique=6), False), (16, True)])
        loop.call_soon(lambda: dev.notify(1))
        wait_for(lambda: len(irq.used) >= 3, timeout=60)
        assert req.get_used() == [(fsync, 16)]
        assert any(t.name == "kata-fs-0" for t in threading.enumerate())
    finally:
        loop.stop()
        dev.close()
    assert not any(t.name.startswith("kata-fs-") for t in threading.enumerate())
