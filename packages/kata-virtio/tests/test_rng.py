"""virtio-rng fills device-writable buffers."""

from __future__ import annotations

from kata_virtio import VirtioRng
from kata_virtio.testing import FakeGuestMemory, activate


def test_rng_fills_writable_buffers_and_interrupts() -> None:
    mem = FakeGuestMemory(1 << 20)
    dev = VirtioRng()
    (dq,), irq = activate(dev, mem)
    heads = [dq.add_chain([(64, True)]), dq.add_chain([(16, True), (16, True)], indirect=True)]
    dev.notify(0)
    assert dq.get_used() == [(heads[0], 64), (heads[1], 32)]
    assert dq.written(heads[0]) != bytes(64)
    assert irq.used == [0]


def test_rng_request_with_only_readable_buffer_completes_empty() -> None:
    mem = FakeGuestMemory(1 << 20)
    dev = VirtioRng()
    (dq,), _ = activate(dev, mem)
    head = dq.add_chain([(b"abc", False)])
    dev.notify(0)
    assert dq.get_used() == [(head, 0)]
