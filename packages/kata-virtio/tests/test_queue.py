"""The split virtqueue against well-behaved and hostile drivers."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kata_virtio import (
    AvailRingError,
    DescriptorChainTooLong,
    DescriptorIndexError,
    DescriptorLengthError,
    DescriptorOrderError,
    GuestAddressError,
    IndirectDescriptorError,
    Queue,
    QueueConfigError,
    VirtioError,
)
from kata_virtio._spec import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT
from kata_virtio.testing import DriverQueue, FakeGuestMemory


def setup(size: int = 16, mem_size: int = 1 << 20) -> tuple[FakeGuestMemory, DriverQueue, Queue]:
    mem = FakeGuestMemory(mem_size, base=0x1000)
    dq = DriverQueue(mem, size)
    return mem, dq, dq.device_queue()


def test_pop_returns_readable_then_writable_buffers() -> None:
    mem, dq, q = setup()
    head = dq.add_chain([(b"hello", False), (b" world", False), (8, True)])
    chain = q.pop(mem)
    assert chain is not None and chain.head_index == head
    assert chain.reader(mem).read_all() == b"hello world"
    assert chain.writable_len == 8
    assert q.pop(mem) is None


def test_writer_spans_descriptors_and_used_ring_reports_length() -> None:
    mem, dq, q = setup()
    head = dq.add_chain([(3, True), (4, True)])
    chain = q.pop(mem)
    assert chain is not None
    w = chain.writer(mem)
    assert w.write(b"abcdefghij") == 7
    q.add_used(mem, chain.head_index, w.written)
    assert dq.get_used() == [(head, 7)]
    assert dq.written(head) == b"abcdefg"


def test_indirect_table_is_followed() -> None:
    mem, dq, q = setup()
    head = dq.add_chain([(b"req", False), (5, True)], indirect=True)
    chain = q.pop(mem)
    assert chain is not None and chain.head_index == head
    assert chain.reader(mem).read_all() == b"req" and chain.writable_len == 5


def _indirect_not_negotiated(mem: FakeGuestMemory, dq: DriverQueue, q: Queue) -> None:
    q.indirect = False
    dq.add_chain([(b"req", False)], indirect=True)


def _nested_indirect(mem: FakeGuestMemory, dq: DriverQueue, q: Queue) -> None:
    table = dq.alloc(16)
    mem.write(table, struct.pack("<QIHH", table, 16, VIRTQ_DESC_F_INDIRECT, 0))
    dq.write_desc(0, table, 16, VIRTQ_DESC_F_INDIRECT)
    dq.publish(0)


def _descriptor_loop(mem: FakeGuestMemory, dq: DriverQueue, q: Queue) -> None:
    buf = dq.alloc(8)
    dq.write_desc(0, buf, 8, VIRTQ_DESC_F_NEXT, 1)
    dq.write_desc(1, buf, 8, VIRTQ_DESC_F_NEXT, 0)
    dq.publish(0)


def _loop_inside_indirect_table(mem: FakeGuestMemory, dq: DriverQueue, q: Queue) -> None:
    table = dq.alloc(32)
    mem.write(table, struct.pack("<QIHH", 0x1000, 1, VIRTQ_DESC_F_NEXT, 1))
    mem.write(table + 16, struct.pack("<QIHH", 0x1000, 1, VIRTQ_DESC_F_NEXT, 0))
    dq.write_desc(0, table, 32, VIRTQ_DESC_F_INDIRECT)
    dq.publish(0)


def _head_out_of_range(mem: FakeGuestMemory, dq: DriverQueue, q: Queue) -> None:
    dq.publish(8)


def _next_out_of_range(mem: FakeGuestMemory, dq: DriverQueue, q: Queue) -> None:
    dq.write_desc(0, dq.alloc(4), 4, VIRTQ_DESC_F_NEXT, 9)
    dq.publish(0)


def _readable_after_writable(mem: FakeGuestMemory, dq: DriverQueue, q: Queue) -> None:
    dq.add_chain([(4, True), (b"late", False)])


def _chain_longer_than_4gib(mem: FakeGuestMemory, dq: DriverQueue, q: Queue) -> None:
    dq.write_desc(0, 0x1000, 0xFFFFFFFF, VIRTQ_DESC_F_NEXT, 1)
    dq.write_desc(1, 0x1000, 2, 0)
    dq.publish(0)


def _avail_index_too_far_ahead(mem: FakeGuestMemory, dq: DriverQueue, q: Queue) -> None:
    dq.set_avail_idx(9)


HOSTILE_DRIVERS = [
    # (what the driver does, queue size, the typed error pop raises, its message)
    (_indirect_not_negotiated, 16, IndirectDescriptorError, None),
    (_nested_indirect, 16, IndirectDescriptorError, "nested"),
    (_descriptor_loop, 16, DescriptorChainTooLong, None),
    (_loop_inside_indirect_table, 16, DescriptorChainTooLong, None),
    (_head_out_of_range, 8, DescriptorIndexError, None),
    (_next_out_of_range, 8, DescriptorIndexError, None),
    (_readable_after_writable, 16, DescriptorOrderError, None),
    (_chain_longer_than_4gib, 16, DescriptorLengthError, None),
    (_avail_index_too_far_ahead, 8, AvailRingError, None),
]


@pytest.mark.parametrize(
    ("driver", "size", "error", "match"),
    HOSTILE_DRIVERS,
    ids=[d.__name__.strip("_") for d, *_ in HOSTILE_DRIVERS],
)
def test_queue_rejects_hostile_driver(
    driver: Callable[[FakeGuestMemory, DriverQueue, Queue], None], size: int, error: type[VirtioError],
    match: str | None,
) -> None:  # fmt: skip
    """Each hostile ring layout gets its typed error from `pop`."""
    mem, dq, q = setup(size=size)
    driver(mem, dq, q)
    with pytest.raises(error, match=match):
        q.pop(mem)


@pytest.mark.parametrize(("length", "flags"), [(0, 0), (24, 0), (16, VIRTQ_DESC_F_NEXT)])
def test_queue_rejects_bad_indirect_descriptor(length: int, flags: int) -> None:
    mem, dq, q = setup()
    dq.write_desc(0, dq.alloc(32), length, VIRTQ_DESC_F_INDIRECT | flags, 1)
    dq.publish(0)
    with pytest.raises(IndirectDescriptorError):
        q.pop(mem)


def test_buffer_outside_guest_memory_raises_typed_error() -> None:
    mem, dq, q = setup()
    dq.write_desc(0, 0x7FFF_0000, 64, 0)
    dq.publish(0)
    chain = q.pop(mem)
    assert chain is not None
    with pytest.raises(GuestAddressError):
        chain.reader(mem).read_all()


def test_descriptor_table_outside_memory_is_refused_at_validation() -> None:
    mem, dq, q = setup()
    q.desc_table = 0x10_0000_0000
    with pytest.raises(QueueConfigError):
        q.validate(mem)
    q.desc_table, q.size = dq.desc_table, 12
    with pytest.raises(QueueConfigError, match="power of two"):
        q.validate(mem)
    q.size, q.used_ring = 16, dq.used_ring + 2
    with pytest.raises(QueueConfigError, match="misaligned"):
        q.validate(mem)


def test_avail_index_wraps_at_65536() -> None:
    mem, dq, q = setup(size=4)
    dq.set_avail_idx(0xFFFE)
    q.next_avail = 0xFFFE
    q.next_used = 0xFFFE
    dq.last_used = 0xFFFE
    heads = [dq.add_chain([(b"x", False)]) for _ in range(3)]
    popped = []
    while (c := q.pop(mem)) is not None:
        popped.append(c.head_index)
        q.add_used(mem, c.head_index, 0)
    assert popped == heads
    assert q.next_avail == 1 and dq.used_idx() == 1
    assert [h for h, _ in dq.get_used()] == heads


def test_notification_suppressed_by_no_interrupt_flag() -> None:
    mem, dq, q = setup()
    dq.add_chain([(b"x", False)])
    c = q.pop(mem)
    assert c is not None
    q.add_used(mem, c.head_index, 0)
    dq.set_no_interrupt(True)
    assert not q.needs_notification(mem)
    dq.set_no_interrupt(False)
    q.add_used(mem, c.head_index, 0)
    assert q.needs_notification(mem)


def test_event_idx_notifies_only_when_used_event_is_crossed() -> None:
    mem, dq, q = setup()
    q.event_idx = True
    dq.set_used_event(2)  # the driver wants an interrupt once used idx passes 2
    for _ in range(2):
        dq.add_chain([(b"x", False)])
        c = q.pop(mem)
        assert c is not None
        q.add_used(mem, c.head_index, 0)
        assert not q.needs_notification(mem)
    dq.add_chain([(b"x", False)])
    c = q.pop(mem)
    assert c is not None
    q.add_used(mem, c.head_index, 0)
    assert q.needs_notification(mem)


def test_device_side_suppression_sets_flag_or_avail_event() -> None:
    mem, dq, q = setup()
    q.disable_notification(mem)
    assert dq.used_flags() == 1
    assert not q.enable_notification(mem)
    assert dq.used_flags() == 0
    dq.add_chain([(b"x", False)])
    assert q.enable_notification(mem)  # work arrived: the device must poll again
    q.event_idx = True
    q.pop(mem)
    q.enable_notification(mem)
    assert dq.avail_event() == 1


# -- hostile descriptor tables --------------------------------------------------------------------

_desc = st.tuples(
    st.sampled_from([0x0, 0x1000, 0x8000, 0x3_0000, 0xFFFF_FFFF_FFFF_FFF0, 0x10_0000])
    | st.integers(0, 1 << 64),
    st.integers(0, 0x2_0000) | st.just(0xFFFF_FFFF),
    st.integers(0, 7),
    st.integers(0, 20),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    descs=st.lists(_desc, min_size=16, max_size=16),
    heads=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=6),
    avail_idx=st.integers(0, 0xFFFF),
    indirect=st.booleans(),
)
def test_hostile_descriptor_tables_raise_only_typed_errors(
    descs: list[tuple[int, int, int, int]], heads: list[int], avail_idx: int, indirect: bool
) -> None:
    mem = FakeGuestMemory(0x4_0000, base=0x1000)
    snapshot_len = len(mem.data)
    dq = DriverQueue(mem, 16)
    q = dq.device_queue(indirect=indirect)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        dq.write_desc(i, addr % (1 << 64), length, flags, nxt)
    for h in heads:
        mem.write(dq.avail_ring + 4 + 2 * (dq.avail_idx % 16), struct.pack("<H", h))
        dq.avail_idx += 1
    dq.set_avail_idx(avail_idx)
    for _ in range(20):
        try:
            chain = q.pop(mem)
            if chain is None:
                break
            assert len(chain.readable) + len(chain.writable) <= 16 * 2
            assert chain.readable_len + chain.writable_len <= 0xFFFFFFFF
            data = chain.reader(mem).read(4096)
            w = chain.writer(mem)
            w.write(b"\xaa" * min(w.remaining, 4096))
            q.add_used(mem, chain.head_index, w.written)
            del data
        except VirtioError:
            break
    assert len(mem.data) == snapshot_len
