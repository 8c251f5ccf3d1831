"""The virtio-mmio v2 register file, negotiation, reset and NEEDS_RESET."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from kata_virtio import MmioTransport, VirtioRng
from kata_virtio._mmio import (
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_SHM_BASE_LOW,
    VIRTIO_MMIO_SHM_LEN_HIGH,
    VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_SHM_SEL,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_VERSION,
)
from kata_virtio._spec import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    VIRTQ_DESC_F_NEXT,
)
from kata_virtio.testing import DriverQueue, FakeGuestMemory, FakeInterrupt


def make() -> tuple[MmioTransport, FakeGuestMemory, FakeInterrupt]:
    mem = FakeGuestMemory(1 << 20)
    irq = FakeInterrupt()
    return MmioTransport(VirtioRng(), mem, irq), mem, irq


def negotiate(t: MmioTransport, features: int) -> int:
    t.write_u32(VIRTIO_MMIO_STATUS, 0)
    t.write_u32(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE)
    t.write_u32(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
    for sel in (0, 1):
        t.write_u32(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
        t.write_u32(VIRTIO_MMIO_DRIVER_FEATURES, features >> (32 * sel))
    t.write_u32(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | 8)
    return t.read_u32(VIRTIO_MMIO_STATUS)


def setup_queue(t: MmioTransport, dq: DriverQueue, index: int = 0) -> None:
    t.write_u32(VIRTIO_MMIO_QUEUE_SEL, index)
    t.write_u32(VIRTIO_MMIO_QUEUE_NUM, dq.size)
    for low, high, addr in (
        (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, dq.desc_table),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, dq.avail_ring),
        (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, dq.used_ring),
    ):
        t.write_u32(low, addr & 0xFFFFFFFF)
        t.write_u32(high, addr >> 32)
    t.write_u32(VIRTIO_MMIO_QUEUE_READY, 1)


def bring_up(t: MmioTransport, mem: FakeGuestMemory, features: int = 1 << VIRTIO_F_VERSION_1) -> DriverQueue:
    assert negotiate(t, features) & VIRTIO_CONFIG_S_FEATURES_OK
    dq = DriverQueue(mem, 16)
    setup_queue(t, dq)
    t.write_u32(VIRTIO_MMIO_STATUS, 0xF)
    return dq


def test_identity_registers() -> None:
    t, _, _ = make()
    assert t.read_u32(VIRTIO_MMIO_MAGIC_VALUE) == 0x74726976
    assert t.read_u32(VIRTIO_MMIO_VERSION) == 2
    assert t.read_u32(VIRTIO_MMIO_DEVICE_ID) == 4
    assert t.read_u32(VIRTIO_MMIO_VENDOR_ID) == 0
    t.write_u32(VIRTIO_MMIO_QUEUE_SEL, 0)
    assert t.read_u32(VIRTIO_MMIO_QUEUE_NUM_MAX) == 256
    t.write_u32(VIRTIO_MMIO_QUEUE_SEL, 1)
    assert t.read_u32(VIRTIO_MMIO_QUEUE_NUM_MAX) == 0  # §4.2.2: absent queue reads 0


def test_feature_words_are_selected() -> None:
    t, _, _ = make()
    t.write_u32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
    assert t.read_u32(VIRTIO_MMIO_DEVICE_FEATURES) & 1  # VERSION_1 is bit 32
    t.write_u32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
    assert t.read_u32(VIRTIO_MMIO_DEVICE_FEATURES) >> VIRTIO_F_EVENT_IDX & 1
    t.write_u32(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2)
    assert t.read_u32(VIRTIO_MMIO_DEVICE_FEATURES) == 0


def test_shared_memory_regions_read_as_absent() -> None:
    t, _, _ = make()
    t.write_u32(VIRTIO_MMIO_SHM_SEL, 0)
    assert t.read_u32(VIRTIO_MMIO_SHM_LEN_LOW) == 0xFFFFFFFF
    assert t.read_u32(VIRTIO_MMIO_SHM_LEN_HIGH) == 0xFFFFFFFF
    assert t.read_u32(VIRTIO_MMIO_SHM_BASE_LOW) == 0xFFFFFFFF


def test_features_ok_refused_without_version_1() -> None:
    t, _, _ = make()
    assert not negotiate(t, 0) & VIRTIO_CONFIG_S_FEATURES_OK


def test_features_ok_refused_for_unoffered_feature() -> None:
    t, _, _ = make()
    assert not negotiate(t, 1 << VIRTIO_F_VERSION_1 | 1 << 5) & VIRTIO_CONFIG_S_FEATURES_OK
    assert negotiate(t, 1 << VIRTIO_F_VERSION_1) & VIRTIO_CONFIG_S_FEATURES_OK


def test_driver_ok_without_features_ok_is_not_accepted() -> None:
    t, _, _ = make()
    t.write_u32(VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | 4)
    assert not t.read_u32(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK
    assert not t.activated


def test_queue_registers_read_back_and_activation_serves_requests() -> None:
    t, mem, irq = make()
    dq = bring_up(t, mem)
    assert t.activated
    assert t.read_u32(VIRTIO_MMIO_QUEUE_READY) == 1
    assert t.read_u32(VIRTIO_MMIO_QUEUE_NUM) == 16
    assert t.read_u32(VIRTIO_MMIO_QUEUE_DESC_LOW) == dq.desc_table
    head = dq.add_chain([(32, True)])
    t.write_u32(VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    assert dq.get_used() == [(head, 32)]
    assert irq.count == 1
    assert t.read_u32(VIRTIO_MMIO_INTERRUPT_STATUS) == 1
    t.write_u32(VIRTIO_MMIO_INTERRUPT_ACK, 1)
    assert t.read_u32(VIRTIO_MMIO_INTERRUPT_STATUS) == 0


def test_reset_clears_registers_and_device() -> None:
    t, mem, _ = make()
    bring_up(t, mem)
    t.write_u32(VIRTIO_MMIO_STATUS, 0)
    assert t.read_u32(VIRTIO_MMIO_STATUS) == 0
    assert t.read_u32(VIRTIO_MMIO_QUEUE_READY) == 0
    assert not t.activated and t.device.memory is None
    # The device comes up again after the reset.
    dq = bring_up(t, mem)
    head = dq.add_chain([(8, True)])
    t.notify(0)
    assert dq.get_used() == [(head, 8)]


def test_broken_queue_sets_needs_reset_and_config_interrupt() -> None:
    t, mem, irq = make()
    dq = bring_up(t, mem)
    gen = t.read_u32(VIRTIO_MMIO_CONFIG_GENERATION)
    buf = dq.alloc(8)
    dq.write_desc(0, buf, 8, VIRTQ_DESC_F_NEXT, 0)  # a loop
    dq.publish(0)
    t.notify(0)
    assert t.read_u32(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert t.read_u32(VIRTIO_MMIO_INTERRUPT_STATUS) & 2
    assert irq.count == 1
    assert t.read_u32(VIRTIO_MMIO_CONFIG_GENERATION) == gen
    # Further kicks are ignored until reset.
    dq.add_chain([(8, True)])
    t.notify(0)
    assert dq.get_used() == []


def test_bad_ring_address_at_driver_ok_sets_needs_reset() -> None:
    t, mem, _ = make()
    negotiate(t, 1 << VIRTIO_F_VERSION_1)
    dq = DriverQueue(mem, 16)
    dq.desc_table = 0x10_0000_0000
    setup_queue(t, dq)
    t.write_u32(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0)  # ignored: the queue is ready
    assert t.read_u32(VIRTIO_MMIO_QUEUE_DESC_HIGH) == 0x10
    t.write_u32(VIRTIO_MMIO_STATUS, 0xF)
    assert t.read_u32(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert not t.activated


def test_config_space_reads_and_generation_bump() -> None:
    mem = FakeGuestMemory(1 << 16)
    irq = FakeInterrupt()
    t = MmioTransport(_ConfigDevice(), mem, irq)
    assert t.read_u32(VIRTIO_MMIO_DEVICE_ID) == VIRTIO_ID_BLOCK
    assert t.read(0x100, 8) == struct.pack("<Q", 1234)
    assert t.read(0x101, 1) == b"\x04"
    assert t.read(0x1F0, 4) == b"\0\0\0\0"
    t.write(0x108, b"\x01")
    assert t.device.config_bytes()[8] == 1  # type: ignore[attr-defined]
    gen = t.read_u32(VIRTIO_MMIO_CONFIG_GENERATION)
    t.signal_config_change()
    assert t.read_u32(VIRTIO_MMIO_CONFIG_GENERATION) == gen + 1
    assert t.read_u32(VIRTIO_MMIO_INTERRUPT_STATUS) == 2 and irq.count == 1


def test_unaligned_register_access_is_ignored() -> None:
    t, _, _ = make()
    assert t.read(VIRTIO_MMIO_MAGIC_VALUE + 1, 2) == b"\0\0"
    t.write(VIRTIO_MMIO_STATUS, b"\x01")
    assert t.read_u32(VIRTIO_MMIO_STATUS) == 0


class _ConfigDevice(VirtioRng):
    device_type = VIRTIO_ID_BLOCK

    def __init__(self) -> None:
        super().__init__()
        self.cfg = bytearray(struct.pack("<QB", 1234, 0))

    def config_bytes(self) -> bytes:
        return bytes(self.cfg)

    def write_config(self, offset: int, data: bytes) -> None:
        self.cfg[offset : offset + len(data)] = data


_offsets = st.sampled_from(list(range(0, 0x100, 4))) | st.integers(0, 0x1FF)


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), _offsets, st.integers(0, 2**32 - 1), st.sampled_from([1, 2, 4, 8])))
)
def test_random_register_traffic_never_raises(ops: list[tuple[bool, int, int, int]]) -> None:
    t, mem, _ = make()
    DriverQueue(mem, 16).add_chain([(8, True)])  # something for a ready queue to chew on
    for is_write, offset, value, size in ops:
        if is_write:
            t.write(offset, value.to_bytes(4, "little")[:size].ljust(size, b"\0"))
        else:
            assert len(t.read(offset, size)) == size
    status = t.read_u32(VIRTIO_MMIO_STATUS)
    assert not status & VIRTIO_CONFIG_S_DRIVER_OK or status & VIRTIO_CONFIG_S_FEATURES_OK


def test_queue_notify_can_be_forwarded() -> None:
    mem = FakeGuestMemory(1 << 20)
    seen: list[int] = []
    t = MmioTransport(VirtioRng(), mem, FakeInterrupt(), on_queue_notify=seen.append)
    t.write_u32(VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    assert seen == [0]
