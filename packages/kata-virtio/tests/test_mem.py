"""virtio-mem: plug/unplug/state requests, the spec's answers, discards only inside the region."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kata_virtio import DeviceError, VirtioMem
from kata_virtio._mem import (
    VIRTIO_MEM_REQ_PLUG,
    VIRTIO_MEM_REQ_STATE,
    VIRTIO_MEM_REQ_UNPLUG,
    VIRTIO_MEM_REQ_UNPLUG_ALL,
    VIRTIO_MEM_RESP_ACK,
    VIRTIO_MEM_RESP_ERROR,
    VIRTIO_MEM_RESP_NACK,
    VIRTIO_MEM_STATE_MIXED,
    VIRTIO_MEM_STATE_PLUGGED,
    VIRTIO_MEM_STATE_UNPLUGGED,
)
from kata_virtio.testing import DriverQueue, FakeGuestMemory, activate

MiB = 1 << 20
BLOCK = 2 * MiB


class SparseMemory(FakeGuestMemory):
    """RAM for the rings at 0 plus a virtio-mem region that only records discards (no 128 MiB bytearray)."""

    def __init__(self, region: tuple[int, int]) -> None:
        super().__init__(1 << 20)
        self.region = region

    def discard(self, addr: int, size: int) -> None:
        start, length = self.region
        if addr % 4096 or size % 4096 or addr < start or addr + size > start + length:
            super().discard(addr, size)  # raises unless in the ring RAM
            return
        self.discarded.append((addr, size))


REGION = (256 * MiB, 256 * MiB)


def _device() -> tuple[VirtioMem, SparseMemory, DriverQueue, object]:
    dev = VirtioMem(*REGION)
    mem = SparseMemory(REGION)
    (dq,), irq = activate(dev, mem)
    return dev, mem, dq, irq


def _req(dq: DriverQueue, dev: VirtioMem, kind: int, addr: int = 0, nb: int = 0) -> tuple[int, int]:
    head = dq.add_chain([(struct.pack("<H6xQH6x", kind, addr, nb), False), (10, True)])
    dev.notify(0)
    assert dq.get_used() == [(head, 10)]
    resp, state = struct.unpack("<H6xH", dq.written(head))
    return resp, state


def test_config_space_layout() -> None:
    dev, _mem, _dq, _irq = _device()
    dev.set_requested_size(64 * MiB)
    cfg = dev.read_config(0, 56)
    assert struct.unpack("<QH6xQQQQQ", cfg) == (BLOCK, 0, 256 * MiB, 256 * MiB, 256 * MiB, 0, 64 * MiB)


def test_requested_size_change_interrupts_and_is_checked() -> None:
    dev, _mem, _dq, irq = _device()
    dev.set_requested_size(BLOCK)
    assert irq.config_changes == 1  # type: ignore[attr-defined]
    for bad in (BLOCK + 1, 512 * MiB, -BLOCK):
        with pytest.raises(DeviceError):
            dev.set_requested_size(bad)


def test_region_must_be_aligned_to_linux_memory_blocks() -> None:
    with pytest.raises(DeviceError):
        VirtioMem(64 * MiB, 128 * MiB)
    with pytest.raises(DeviceError):
        VirtioMem(128 * MiB, 64 * MiB)
    with pytest.raises(DeviceError):
        VirtioMem(128 * MiB, 128 * MiB, block_size=3 * MiB)


def test_plug_up_to_requested_then_nack() -> None:
    dev, _mem, dq, _irq = _device()
    dev.set_requested_size(4 * BLOCK)
    assert _req(dq, dev, VIRTIO_MEM_REQ_PLUG, REGION[0], 3) == (VIRTIO_MEM_RESP_ACK, 0)
    assert dev.plugged_size == 3 * BLOCK
    assert _req(dq, dev, VIRTIO_MEM_REQ_PLUG, REGION[0] + 3 * BLOCK, 2) == (VIRTIO_MEM_RESP_NACK, 0)
    assert _req(dq, dev, VIRTIO_MEM_REQ_PLUG, REGION[0] + 3 * BLOCK, 1) == (VIRTIO_MEM_RESP_ACK, 0)
    assert dev.plugged_ranges() == [(REGION[0], 4 * BLOCK)]
    assert struct.unpack_from("<Q", dev.read_config(40, 8))[0] == 4 * BLOCK


def test_plug_of_a_plugged_block_and_unplug_of_an_unplugged_one_are_errors() -> None:
    dev, mem, dq, _irq = _device()
    dev.set_requested_size(8 * BLOCK)
    _req(dq, dev, VIRTIO_MEM_REQ_PLUG, REGION[0] + BLOCK, 1)
    assert _req(dq, dev, VIRTIO_MEM_REQ_PLUG, REGION[0], 2)[0] == VIRTIO_MEM_RESP_ERROR
    assert _req(dq, dev, VIRTIO_MEM_REQ_UNPLUG, REGION[0], 2)[0] == VIRTIO_MEM_RESP_ERROR
    assert dev.plugged_size == BLOCK and mem.discarded == []


def test_unplug_discards_the_blocks() -> None:
    dev, mem, dq, _irq = _device()
    dev.set_requested_size(8 * BLOCK)
    _req(dq, dev, VIRTIO_MEM_REQ_PLUG, REGION[0], 4)
    assert _req(dq, dev, VIRTIO_MEM_REQ_UNPLUG, REGION[0] + BLOCK, 2) == (VIRTIO_MEM_RESP_ACK, 0)
    assert mem.discarded == [(REGION[0] + BLOCK, 2 * BLOCK)]
    assert dev.plugged_ranges() == [(REGION[0], BLOCK), (REGION[0] + 3 * BLOCK, BLOCK)]


def test_unplug_all_discards_the_region() -> None:
    dev, mem, dq, _irq = _device()
    dev.set_requested_size(8 * BLOCK)
    _req(dq, dev, VIRTIO_MEM_REQ_PLUG, REGION[0], 4)
    assert _req(dq, dev, VIRTIO_MEM_REQ_UNPLUG_ALL) == (VIRTIO_MEM_RESP_ACK, 0)
    assert mem.discarded == [REGION] and dev.plugged_size == 0


def test_state_reports_plugged_unplugged_mixed() -> None:
    dev, _mem, dq, _irq = _device()
    dev.set_requested_size(8 * BLOCK)
    _req(dq, dev, VIRTIO_MEM_REQ_PLUG, REGION[0], 2)
    assert _req(dq, dev, VIRTIO_MEM_REQ_STATE, REGION[0], 2) == (
        VIRTIO_MEM_RESP_ACK,
        VIRTIO_MEM_STATE_PLUGGED,
    )
    assert _req(dq, dev, VIRTIO_MEM_REQ_STATE, REGION[0], 3) == (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_MIXED)
    assert _req(dq, dev, VIRTIO_MEM_REQ_STATE, REGION[0] + 4 * BLOCK, 9) == (
        VIRTIO_MEM_RESP_ACK,
        VIRTIO_MEM_STATE_UNPLUGGED,
    )


@pytest.mark.parametrize(
    ("addr", "nb"),
    [
        (REGION[0] - BLOCK, 1),  # below the region
        (REGION[0] + REGION[1] - BLOCK, 2),  # crosses its end
        (REGION[0] + 4096, 1),  # unaligned
        (REGION[0], 0),  # no blocks
        (REGION[0], 0xFFFF),  # more blocks than the region has
        (0xFFFF_FFFF_FFFF_F000, 0xFFFF),  # wraps
    ],
)
def test_ranges_outside_the_region_are_errors_for_every_request(addr: int, nb: int) -> None:
    dev, mem, dq, irq = _device()
    dev.set_requested_size(REGION[1])
    for kind in (VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG, VIRTIO_MEM_REQ_STATE):
        assert _req(dq, dev, kind, addr, nb)[0] == VIRTIO_MEM_RESP_ERROR
    assert mem.discarded == [] and dev.plugged_size == 0
    assert not dev.broken and irq.needs_reset == []  # type: ignore[attr-defined]


def test_unknown_request_and_short_buffers_get_error_or_nothing() -> None:
    dev, _mem, dq, _irq = _device()
    assert _req(dq, dev, 7, REGION[0], 1)[0] == VIRTIO_MEM_RESP_ERROR
    head = dq.add_chain([(b"\0\0", False), (10, True)])  # truncated request
    dev.notify(0)
    assert dq.get_used() == [(head, 10)]
    assert struct.unpack_from("<H", dq.written(head))[0] == VIRTIO_MEM_RESP_ERROR
    head = dq.add_chain([(struct.pack("<H6xQH6x", 0, REGION[0], 1), False)])  # no room for an answer
    dev.notify(0)
    assert dq.get_used() == [(head, 0)]
    assert dev.plugged_size == 0 and not dev.broken


def test_save_and_restore_state() -> None:
    dev, _mem, dq, _irq = _device()
    dev.set_requested_size(8 * BLOCK)
    _req(dq, dev, VIRTIO_MEM_REQ_PLUG, REGION[0] + 2 * BLOCK, 3)
    other = VirtioMem(*REGION)
    other.restore_state(dev.save_state())
    assert other.plugged_ranges() == dev.plugged_ranges() and other.requested_size == 8 * BLOCK
    with pytest.raises(DeviceError):
        other.restore_state({"plugged": [[0, BLOCK]]})


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    requested=st.integers(0, REGION[1] // BLOCK),
    requests=st.lists(
        st.tuples(
            st.integers(0, 4),
            st.integers(0, 1 << 64 - 1) | st.integers(REGION[0] - 4 * BLOCK, sum(REGION) + BLOCK),
            st.integers(0, 0xFFFF) | st.integers(0, 8),
        ),
        max_size=30,
    ),
)
def test_hostile_requests_keep_the_bitmap_consistent_and_discards_inside(
    requested: int, requests: list[tuple[int, int, int]]
) -> None:
    dev, mem, dq, irq = _device()
    dev.set_requested_size(requested * BLOCK)
    for kind, addr, nb in requests:
        _req(dq, dev, kind, addr, nb)
        assert dev.plugged_size <= dev.requested_size
        assert sum(n for _a, n in dev.plugged_ranges()) == dev.plugged_size
    for addr, size in mem.discarded:
        assert REGION[0] <= addr and addr + size <= sum(REGION)
    assert not dev.broken and irq.needs_reset == []  # type: ignore[attr-defined]
