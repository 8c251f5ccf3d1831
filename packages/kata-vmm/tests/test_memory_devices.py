"""Memory hot-plug (virtio-mem region above RAM) and the balloon on the VMM: layout, config, Vmm API."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kata_vmm import (
    BalloonSpec,
    ConfigError,
    RngSpec,
    SnapshotError,
    VmConfig,
    Vmm,
    VmmBuilder,
    VmStateError,
)
from kata_vmm import testing as tk
from kata_vmm._layout import (
    HIGH_RAM_START,
    MMIO_GAP_END,
    MMIO_GAP_START,
    VIRTIO_MMIO_START,
    GiB,
    MiB,
    hotplug_range,
    ram_ranges,
)
from kata_vmm._loader import e820_map
from kata_vmm._memory import GuestAddress, GuestMemoryMmap
from kata_vmm._snapshot import spec_from_json, spec_to_json

KernelFactory = Callable[[bytes], Path]
needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")


@pytest.mark.parametrize("mem_mib", [128, 3 * 1024, 3 * 1024 + 256, 3 * 1024 + 300, 5 * 1024 + 1])
def test_hotplug_region_lies_above_ram_and_the_mmio_gap_aligned_to_128_mib(mem_mib: int) -> None:
    addr, size = hotplug_range(mem_mib * MiB, 512 * MiB)
    assert size == 512 * MiB
    assert addr % (128 * MiB) == 0
    assert addr >= HIGH_RAM_START
    for start, length in ram_ranges(mem_mib * MiB):
        assert addr >= start + length
    assert not (addr < MMIO_GAP_END and addr + size > MMIO_GAP_START)


def test_hotplug_size_must_be_a_multiple_of_128_mib() -> None:
    with pytest.raises(ValueError):
        hotplug_range(GiB, 64 * MiB)
    with pytest.raises(ConfigError, match="multiple of 128"):
        VmConfig(kernel=Path("k"), memory_hotplug_mib=100).validate(4)
    VmConfig(kernel=Path("k"), memory_hotplug_mib=256).validate(4)


def test_hotplug_region_is_mapped_but_not_in_the_boot_memory_map() -> None:
    region = hotplug_range(128 * MiB, 128 * MiB)
    mem = GuestMemoryMmap(ram_ranges(128 * MiB), hotplug=region)
    try:
        assert [r.hotplug for r in mem.regions] == [False, True]
        assert mem.size == 128 * MiB
        assert all(addr + size <= 128 * MiB for addr, size, _kind in e820_map(mem))
        mem.write(region[0], b"x")  # mapped: a device (and the guest, once plugged) can use it
        mem.discard(region[0], region[1])
        assert mem.read(region[0], 1) == b"\0"
    finally:
        mem.close()


def test_hotplug_region_overlapping_ram_is_refused() -> None:
    with pytest.raises(ConfigError):
        GuestMemoryMmap(ram_ranges(128 * MiB), hotplug=(GuestAddress(64 * MiB), 128 * MiB))


def test_one_balloon_per_vm_and_its_spec_round_trips_through_a_snapshot(tmp_path: Path) -> None:
    spec = BalloonSpec(stats_interval=2.0, free_page_reporting=True)
    builder = VmmBuilder(VmConfig(kernel=tmp_path / "k", devices=[spec]))
    with pytest.raises(ConfigError, match="one balloon"):
        builder.add_device(BalloonSpec())
    assert spec_from_json(spec_to_json(spec)) == spec


def test_memory_api_needs_a_started_vm() -> None:
    with pytest.raises(VmStateError):
        Vmm().set_hotplug_memory(128)
    with pytest.raises(VmStateError):
        Vmm().set_balloon(64)


# --- on /dev/kvm: the devices on their slots, driven from the test thread ----------------------------
RING = 0x400_0000
QSIZE = 8


def _reg(vmm: Vmm, base: int, offset: int, value: int | None = None) -> int:
    if value is None:
        return int(struct.unpack("<I", vmm.mmio_bus.read(base + offset, 4))[0])
    vmm.mmio_bus.write(base + offset, struct.pack("<I", value))
    return value


def _is_hole(fd: int, offset: int) -> bool:
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) > offset
    except OSError:  # ENXIO: no data at or after offset
        return True


def _bring_up(vmm: Vmm, base: int, queues: int, rings: int = RING) -> None:
    for status in (0, 1, 3):
        _reg(vmm, base, 0x070, status)
    _reg(vmm, base, 0x024, 1)
    _reg(vmm, base, 0x020, 1)  # VIRTIO_F_VERSION_1 only: the balloon sets up inflate and deflate
    _reg(vmm, base, 0x070, 0xB)
    for q in range(queues):
        _reg(vmm, base, 0x030, q)
        _reg(vmm, base, 0x038, QSIZE)
        ring = rings + 0x10000 * q
        for reg, addr in ((0x080, ring), (0x090, ring + 0x1000), (0x0A0, ring + 0x2000)):
            _reg(vmm, base, reg, addr)
            _reg(vmm, base, reg + 4, 0)
        _reg(vmm, base, 0x044, 1)
    _reg(vmm, base, 0x070, 0xF)
    assert _reg(vmm, base, 0x070) == 0xF


@pytest.mark.kvm
@needs_kvm
@pytest.mark.usefixtures("no_leaks")
def test_vmm_serves_virtio_mem_and_balloon_and_resizes_on_request(
    make_kernel: KernelFactory, tmp_path: Path
) -> None:
    config = VmConfig(
        kernel=make_kernel(tk.spin_forever()),
        memory_mib=128,
        memory_hotplug_mib=256,
        devices=[RngSpec(), BalloonSpec()],
    )
    vmm = VmmBuilder(config).build()
    try:
        vmm.start()
        assert vmm.memory is not None
        region = vmm.memory.regions[-1]
        assert region.hotplug and (region.guest_addr, region.size) == (HIGH_RAM_START, 256 * MiB)
        balloon_base, mem_base = VIRTIO_MMIO_START + 0x1000, VIRTIO_MMIO_START + 0x2000
        assert _reg(vmm, balloon_base, 0x008) == 5
        assert _reg(vmm, mem_base, 0x008) == 24  # after the builder's devices
        config_space = vmm.mmio_bus.read(mem_base + 0x100, 56)
        block, _node, addr, size, usable, plugged, requested = struct.unpack("<QH6xQQQQQ", config_space)
        assert (block, addr, size, usable, plugged, requested) == (
            2 * MiB,
            HIGH_RAM_START,
            256 * MiB,
            256 * MiB,
            0,
            0,
        )

        vmm.set_hotplug_memory(64)  # before the driver is up: only the config changes
        assert struct.unpack("<Q", vmm.mmio_bus.read(mem_base + 0x100 + 48, 8))[0] == 64 * MiB
        _bring_up(vmm, mem_base, 1)
        vmm.set_hotplug_memory(128)
        assert _reg(vmm, mem_base, 0x060) & 2  # config-change interrupt pending
        assert struct.unpack("<Q", vmm.mmio_bus.read(mem_base + 0x100 + 48, 8))[0] == 128 * MiB
        with pytest.raises(ConfigError):
            vmm.set_hotplug_memory(512)

        # the guest's driver plugs 64 blocks (128 MiB) in one request
        mem = vmm.memory
        req, resp = RING + 0x3000, RING + 0x3100
        mem.write(req, struct.pack("<H6xQH6x", 0, HIGH_RAM_START, 64))
        mem.write(RING, struct.pack("<QIHH", req, 24, 1, 1) + struct.pack("<QIHH", resp, 10, 2, 0))
        mem.write(RING + 0x1000 + 4, struct.pack("<H", 0))
        mem.write(RING + 0x1000 + 2, struct.pack("<H", 1))
        _reg(vmm, mem_base, 0x050, 0)
        deadline = time.monotonic() + 30
        while struct.unpack("<H", mem.read(RING + 0x2000 + 2, 2))[0] < 1:
            assert time.monotonic() < deadline, "virtio-mem request never answered"
            time.sleep(0.005)
        assert struct.unpack_from("<H", mem.read(resp, 2))[0] == 0  # ACK
        status = vmm.hotplug_memory()
        assert (status.region_mib, status.requested_mib, status.plugged_mib) == (256, 128, 128)

        balloon_rings = RING + 0x100000
        _bring_up(vmm, balloon_base, 2, balloon_rings)
        vmm.set_balloon(64)
        assert _reg(vmm, balloon_base, 0x100) == 64 * MiB // 4096
        assert vmm.balloon().target_mib == 64 and vmm.balloon().actual_mib == 0
        # the driver inflates one page that holds data: the memfd gets a hole there
        page = 0x500_0000
        mem.write(page, b"\xee" * 4096)
        ram = vmm.memory.regions[0]
        assert not _is_hole(ram.fd, page)
        pfns = balloon_rings + 0x3000
        mem.write(pfns, struct.pack("<I", page >> 12))
        mem.write(balloon_rings, struct.pack("<QIHH", pfns, 4, 0, 0))
        mem.write(balloon_rings + 0x1000 + 4, struct.pack("<H", 0))
        mem.write(balloon_rings + 0x1000 + 2, struct.pack("<H", 1))
        _reg(vmm, balloon_base, 0x050, 0)
        deadline = time.monotonic() + 30
        while struct.unpack("<H", mem.read(balloon_rings + 0x2000 + 2, 2))[0] < 1:
            assert time.monotonic() < deadline, "inflate never completed"
            time.sleep(0.005)
        assert _is_hole(ram.fd, page)  # the host has the page back
        assert mem.read(page, 4096) == bytes(4096)
        vmm.mmio_bus.write(balloon_base + 0x104, struct.pack("<I", 256))  # the driver reports actual
        assert vmm.balloon().actual_mib == 1 and vmm.balloon().stats == {}

        vmm.pause()
        with pytest.raises(SnapshotError, match="memory hot-plug"):
            vmm.snapshot(tmp_path / "snap")
        assert not (tmp_path / "snap").exists()
    finally:
        vmm.close()


@pytest.mark.kvm
@needs_kvm
def test_memory_api_without_the_devices_says_what_is_missing(make_kernel: KernelFactory) -> None:
    vmm = VmmBuilder(VmConfig(kernel=make_kernel(tk.spin_forever()), memory_mib=64)).build()
    try:
        vmm.start()
        with pytest.raises(ConfigError, match="memory_hotplug_mib"):
            vmm.set_hotplug_memory(128)
        with pytest.raises(ConfigError, match="BalloonSpec"):
            vmm.balloon()
    finally:
        vmm.close()
