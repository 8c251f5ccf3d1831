"""virtio-blk over a raw file: reads, writes, flush, get-id, read-only, bounds."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from kata_virtio import DeviceError, VirtioBlock
from kata_virtio._block import (
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
)
from kata_virtio.testing import DriverQueue, FakeDeviceInterrupt, FakeGuestMemory, activate


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(64 * 1024))
    return path


def start(path: Path, **kw: object) -> tuple[VirtioBlock, DriverQueue, FakeDeviceInterrupt]:
    dev = VirtioBlock(path, **kw)  # type: ignore[arg-type]
    (dq,), irq = activate(dev, FakeGuestMemory(1 << 20))
    return dev, dq, irq


def status(dq: DriverQueue, head: int) -> int:
    return dq.written(head)[-1]  # the status byte ends the last writable buffer


def test_config_reports_capacity_in_sectors(image: Path) -> None:
    dev = VirtioBlock(image)
    assert struct.unpack_from("<Q", dev.read_config(0, 8))[0] == 128
    assert struct.unpack("<I", dev.read_config(20, 4))[0] == 512
    assert not dev.avail_features >> VIRTIO_BLK_F_RO & 1
    dev.close()


def test_read_returns_file_bytes(image: Path) -> None:
    dev, dq, irq = start(image)
    head = dq.add_chain([(hdr(VIRTIO_BLK_T_IN, 2), False), (1024, True), (1, True)])
    dev.notify(0)
    [(h, n)] = dq.get_used()
    assert (h, n) == (head, 1025)
    out = dq.written(head)
    assert out[:1024] == image.read_bytes()[1024:2048] and out[1024] == VIRTIO_BLK_S_OK
    assert irq.used == [0]


def test_data_and_status_may_share_a_descriptor(image: Path) -> None:
    dev, dq, _ = start(image)
    head = dq.add_chain([(hdr(VIRTIO_BLK_T_IN, 0), False), (513, True)], indirect=True)
    dev.notify(0)
    assert dq.get_used() == [(head, 513)]
    assert dq.written(head)[:512] == image.read_bytes()[:512]


def test_write_then_read_back(image: Path) -> None:
    dev, dq, _ = start(image)
    data = b"\x5a" * 512
    head = dq.add_chain([(hdr(VIRTIO_BLK_T_OUT, 10), False), (data, False), (1, True)])
    dev.notify(0)
    assert dq.get_used() == [(head, 1)] and dq.written(head) == bytes([VIRTIO_BLK_S_OK])
    assert image.read_bytes()[5120:5632] == data


def test_read_only_device_refuses_writes(image: Path) -> None:
    before = image.read_bytes()
    dev, dq, _ = start(image, read_only=True)
    assert dev.avail_features >> VIRTIO_BLK_F_RO & 1
    head = dq.add_chain([(hdr(VIRTIO_BLK_T_OUT, 0), False), (b"x" * 512, False), (1, True)])
    dev.notify(0)
    assert dq.get_used() == [(head, 1)] and dq.written(head) == bytes([VIRTIO_BLK_S_IOERR])
    assert image.read_bytes() == before


@pytest.mark.parametrize(("sector", "size"), [(127, 1024), (128, 512), (2**63, 512), (0, 100)])
def test_out_of_bounds_or_partial_sector_is_ioerr(image: Path, sector: int, size: int) -> None:
    dev, dq, _ = start(image)
    head = dq.add_chain([(hdr(VIRTIO_BLK_T_IN, sector), False), (size, True), (1, True)])
    dev.notify(0)
    assert dq.get_used() == [(head, 1)]
    assert status(dq, head) == VIRTIO_BLK_S_IOERR


def test_flush_get_id_and_unsupported(image: Path) -> None:
    dev, dq, _ = start(image, serial="kata-disk-0")
    flush = dq.add_chain([(hdr(VIRTIO_BLK_T_FLUSH), False), (1, True)])
    ident = dq.add_chain([(hdr(VIRTIO_BLK_T_GET_ID), False), (20, True), (1, True)])
    bogus = dq.add_chain([(hdr(99), False), (1, True)])
    dev.notify(0)
    used = dict(dq.get_used())
    assert dq.written(flush) == bytes([VIRTIO_BLK_S_OK])
    assert used[ident] == 21 and dq.written(ident)[:20] == b"kata-disk-0".ljust(20, b"\0")
    assert dq.written(bogus) == bytes([VIRTIO_BLK_S_UNSUPP])


def test_malformed_request_completes_without_status(image: Path) -> None:
    dev, dq, irq = start(image)
    head = dq.add_chain([(b"short", False)])
    dev.notify(0)
    assert dq.get_used() == [(head, 0)]
    assert irq.needs_reset == []


def test_buffer_outside_memory_breaks_device(image: Path) -> None:
    dev, dq, irq = start(image)
    dq.write_desc(0, dq.alloc(16), 16, 1, 1)
    dq.memory.write(dq.desc_table, struct.pack("<QIHH", dq.alloc(16), 16, 1, 1))
    dq.memory.write(dq.alloc(16), hdr(VIRTIO_BLK_T_IN))
    dq.write_desc(1, 0x7000_0000, 512, 3, 2)
    dq.write_desc(2, dq.alloc(1), 1, 2, 0)
    dq.publish(0)
    dev.notify(0)
    assert irq.needs_reset and dev.broken


def test_missing_image_is_device_error(tmp_path: Path) -> None:
    with pytest.raises(DeviceError):
        VirtioBlock(tmp_path / "nope")


def test_write_beyond_capacity_is_refused_before_copying(image: Path) -> None:
    before = image.read_bytes()
    dev, dq, _ = start(image)
    head = dq.add_chain([(hdr(VIRTIO_BLK_T_OUT, 120), False), (b"w" * 8192, False), (1, True)])
    dev.notify(0)
    assert dq.get_used() == [(head, 1)] and dq.written(head) == bytes([VIRTIO_BLK_S_IOERR])
    assert image.read_bytes() == before


def test_capacity_of_a_host_block_device_is_its_size(tmp_path: Path) -> None:
    # (root: losetup) a block device's st_size is 0: `ctr run --device /dev/loopN` hot-plugged an empty disk
    import subprocess

    backing = tmp_path / "disk.img"
    backing.write_bytes(b"kata-raw-volume\n" + bytes(4 * 1024 * 1024 - 16))
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        dev = VirtioBlock(loop, read_only=True)
        try:
            assert dev.capacity == 4 * 1024 * 1024 // 512
        finally:
            dev.close()
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_an_image_reached_through_a_symlink_is_refused_when_symlinks_are_not_followed(image: Path) -> None:
    # a block snapshotter's loop file is opened so (kata-shim's block rootfs); the default still follows
    link = image.with_name("link.img")
    link.symlink_to(image)
    with pytest.raises(DeviceError, match="cannot open block image"):
        VirtioBlock(link, follow_symlinks=False)
    for dev in (VirtioBlock(image, follow_symlinks=False), VirtioBlock(link)):
        try:
            assert dev.capacity == image.stat().st_size // 512
        finally:
            dev.close()
