"""Device save/restore: a transport and its device saved mid-flight and restored into fresh ones on the
same guest memory continue the driver's queues where they were (fake driver-side queues, no VMM)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from kata_virtio import (
    DeviceError,
    MmioTransport,
    VirtioBlock,
    VirtioDevice,
    VirtioFs,
    VirtioRng,
    VirtioVsock,
)
from kata_virtio._mmio import VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_STATUS
from kata_virtio._spec import VIRTIO_F_EVENT_IDX
from kata_virtio.testing import DriverQueue, FakeGuestMemory, FakeInterrupt, mmio_bring_up
from kata_virtio.vsock.device import VIRTIO_VSOCK_EVENT_TRANSPORT_RESET

_REQ = struct.Struct("<IIQ")


def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    """What a snapshot file gives back: the state must be JSON as it is."""
    return json.loads(json.dumps(state))


def _read_sector(q: DriverQueue, sector: int) -> int:
    return q.add_chain([(_REQ.pack(0, 0, sector), False), (512, True), (1, True)])


def test_block_restored_into_a_fresh_device_continues_the_queue(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"A" * 512 + b"B" * 512)
    mem = FakeGuestMemory(1 << 20)
    old = MmioTransport(VirtioBlock(image), mem, FakeInterrupt())
    (q,) = mmio_bring_up(old, [16])
    _read_sector(q, 0)
    old.write_u32(0x050, 0)
    assert len(q.get_used()) == 1
    state = _round_trip(old.save())
    old.device.close()

    irq = FakeInterrupt()
    new = MmioTransport(VirtioBlock(image), mem, irq)
    try:
        new.restore(state)
        assert new.read_u32(VIRTIO_MMIO_STATUS) == 0xF and new.activated
        assert new.read_u32(VIRTIO_MMIO_QUEUE_NUM) == 16
        assert new.read_u32(VIRTIO_MMIO_QUEUE_DESC_LOW) == q.desc_table
        q.set_used_event(1)  # EVENT_IDX: interrupt me after the next one
        head = _read_sector(q, 1)  # the driver goes on: the second chain of the same ring
        new.write_u32(0x050, 0)
        [(used_head, n)] = q.get_used()
        assert used_head == head and q.written(head, n)[:512] == b"B" * 512
        assert q.used_idx() == 2 and irq.count == 1
    finally:
        new.device.close()


def test_saved_state_is_json_and_says_what_it_holds(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(4096))
    t = MmioTransport(VirtioBlock(image, read_only=True), FakeGuestMemory(1 << 20), FakeInterrupt())
    try:
        mmio_bring_up(t, [8])
        state = t.save()
        assert _round_trip(state) == state
        assert state["device"] == {"path": str(image), "capacity": 8, "read_only": True}
        assert state["queues"][0]["size"] == 8 and state["queues"][0]["ready"] is True
    finally:
        t.device.close()


def test_event_idx_is_restored_from_the_features(tmp_path: Path) -> None:
    mem = FakeGuestMemory(1 << 20)
    old = MmioTransport(VirtioRng(), mem, FakeInterrupt())
    mmio_bring_up(old, [8], features=old.device_features)
    new = MmioTransport(VirtioRng(), mem, FakeInterrupt())
    new.restore(_round_trip(old.save()))
    assert new.device.has_feature(VIRTIO_F_EVENT_IDX) and new.queues[0].event_idx


def test_unactivated_device_restores_as_registers_only() -> None:
    mem = FakeGuestMemory(1 << 20)
    old = MmioTransport(VirtioRng(), mem, FakeInterrupt())
    old.write_u32(VIRTIO_MMIO_STATUS, 1)
    new = MmioTransport(VirtioRng(), mem, FakeInterrupt())
    new.restore(_round_trip(old.save()))
    assert new.read_u32(VIRTIO_MMIO_STATUS) == 1 and not new.activated and new.device.memory is None


def test_vsock_restore_tells_the_guest_its_transport_was_reset(tmp_path: Path) -> None:
    mem = FakeGuestMemory(4 << 20)
    old_dev = VirtioVsock(tmp_path / "a.sock")
    old = MmioTransport(old_dev, mem, FakeInterrupt())
    _, _, ev = mmio_bring_up(old, [64, 64, 8])
    ev.add_chain([(4, True)])
    state = _round_trip(old.save())
    old_dev.close()
    assert state["device"] == {"guest_cid": 3, "uds_path": str(tmp_path / "a.sock")}

    new_dev = VirtioVsock(tmp_path / "b.sock")  # a clone listens where its own host side says
    irq = FakeInterrupt()
    new = MmioTransport(new_dev, mem, irq)
    try:
        new.restore(state)
        [(head, n)] = ev.get_used()
        assert struct.unpack("<I", ev.written(head, n)) == (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,)
        assert irq.count == 1 and new_dev.connection_count == 0
    finally:
        new_dev.close()


def test_fs_with_a_mounted_share_refuses_to_restore(tmp_path: Path) -> None:
    mem = FakeGuestMemory(4 << 20)
    old_dev = VirtioFs("share", tmp_path)
    old = MmioTransport(old_dev, mem, FakeInterrupt())
    try:
        mmio_bring_up(old, [64, 64])
        state = _round_trip(old.save())
        assert state["device"] == {"tag": "share", "fuse_session": False}
        state["device"]["fuse_session"] = True  # as after the guest's FUSE_INIT
    finally:
        old_dev.close()
    new_dev = VirtioFs("share", tmp_path)
    new = MmioTransport(new_dev, mem, FakeInterrupt())
    try:
        with pytest.raises(DeviceError, match="FUSE session"):
            new.restore(state)
        assert new.read_u32(VIRTIO_MMIO_STATUS) == 0 and not new.activated
    finally:
        new_dev.close()


def _rng_state() -> tuple[FakeGuestMemory, dict[str, Any]]:
    mem = FakeGuestMemory(1 << 20)
    t = MmioTransport(VirtioRng(), mem, FakeInterrupt())
    mmio_bring_up(t, [8])
    return mem, _round_trip(t.save())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.update(device_type=1), "device type"),
        (lambda s: s.update(queues=[]), "queues"),
        (lambda s: s.update(driver_features=1 << 60), "not offered"),
        (lambda s: s["queues"][0].update(size=6), "power of two"),
        (lambda s: s["queues"][0].update(desc_table=1 << 40), "outside guest memory"),
        (lambda s: s["queues"][0].update(next_avail=70000), "out of range"),
        (lambda s: s.update(status="F"), "u32"),
        (lambda s: s.pop("queues"), "does not fit"),
    ],
)
def test_state_that_does_not_fit_is_refused_and_leaves_the_device_reset(change: Any, match: str) -> None:
    mem, state = _rng_state()
    change(state)
    t = MmioTransport(VirtioRng(), mem, FakeInterrupt())
    with pytest.raises(DeviceError, match=match):
        t.restore(state)
    assert t.read_u32(VIRTIO_MMIO_STATUS) == 0 and not t.activated and t.device.memory is None


def test_block_of_another_size_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(bytes(4096))
    (tmp_path / "b.img").write_bytes(bytes(8192))
    mem = FakeGuestMemory(1 << 20)
    old = MmioTransport(VirtioBlock(tmp_path / "a.img"), mem, FakeInterrupt())
    mmio_bring_up(old, [8])
    state = old.save()
    old.device.close()
    dev: VirtioDevice = VirtioBlock(tmp_path / "b.img")
    t = MmioTransport(dev, mem, FakeInterrupt())
    try:
        with pytest.raises(DeviceError, match="not the saved one"):
            t.restore(state)
    finally:
        dev.close()


def test_balloon_with_two_of_four_queues_restores_its_target_and_actual() -> None:
    from kata_virtio import VirtioBalloon
    from kata_virtio._spec import VIRTIO_F_VERSION_1

    mem = FakeGuestMemory(1 << 21)
    old = MmioTransport(VirtioBalloon(stats_interval=1.0, free_page_reporting=True), mem, FakeInterrupt())
    inflate, _deflate = mmio_bring_up(old, [16, 16], features=1 << VIRTIO_F_VERSION_1)  # no optional queue
    assert isinstance(old.device, VirtioBalloon)
    old.device.set_target(8)
    old.write(0x100 + 4, struct.pack("<I", 3))  # the driver's actual
    state = _round_trip(old.save())

    new = MmioTransport(VirtioBalloon(stats_interval=1.0, free_page_reporting=True), mem, FakeInterrupt())
    new.restore(state)
    assert new.activated and isinstance(new.device, VirtioBalloon)
    assert (new.device.target_pages, new.device.actual_pages) == (8, 3)
    inflate.add_chain([(struct.pack("<I", 0x100), False)])  # the driver goes on inflating
    new.write_u32(0x050, 0)
    assert len(inflate.get_used()) == 1 and mem.discarded == [(0x100 << 12, 4096)]


def test_virtio_mem_restores_its_plugged_blocks() -> None:
    from kata_virtio import VirtioMem

    mem = FakeGuestMemory(1 << 20)
    old = MmioTransport(VirtioMem(128 << 20, 128 << 20), mem, FakeInterrupt())
    (q,) = mmio_bring_up(old, [16])
    assert isinstance(old.device, VirtioMem)
    old.device.set_requested_size(8 << 20)
    q.add_chain([(struct.pack("<H6xQH6x", 0, 128 << 20, 2), False), (10, True)])  # PLUG 2 blocks
    old.write_u32(0x050, 0)
    assert len(q.get_used()) == 1
    state = _round_trip(old.save())

    new = MmioTransport(VirtioMem(128 << 20, 128 << 20), mem, FakeInterrupt())
    new.restore(state)
    assert isinstance(new.device, VirtioMem)
    assert new.device.plugged_ranges() == [(128 << 20, 4 << 20)] and new.device.requested_size == 8 << 20
    with pytest.raises(DeviceError, match="not in this region"):
        MmioTransport(VirtioMem(256 << 20, 128 << 20), mem, FakeInterrupt()).restore(state)
