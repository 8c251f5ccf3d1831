"""Kernel loaders without KVM: boot_params, e820, command line, initrd placement, PVH start info."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_vmm import testing as tk
from kata_vmm._bindings import bootparam as bp
from kata_vmm._bindings import start_info as si
from kata_vmm._errors import KernelLoadError
from kata_vmm._layout import CMDLINE_START, PVH_INFO_START, ZERO_PAGE_START, MiB, ram_ranges
from kata_vmm._loader import BootProtocol, e820_map, load_kernel
from kata_vmm._memory import GuestMemoryMmap


@pytest.fixture
def mem() -> Iterator[GuestMemoryMmap]:
    m = GuestMemoryMmap(ram_ranges(64 * MiB))
    yield m
    m.close()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_bzimage_boot_params_carry_cmdline_initrd_rsdp_and_e820(mem: GuestMemoryMmap, tmp_path: Path) -> None:
    kernel = write(tmp_path, "bz", tk.tiny_bzimage(tk.HALT_FOREVER))
    initrd = write(tmp_path, "initrd", b"\x07" * 5000)
    plan = load_kernel(mem, kernel, "console=ttyS0 quiet", initrd, rsdp_addr=0xE0000)
    assert plan.protocol is BootProtocol.LINUX_64
    assert plan.entry == 0x100000 + 0x200
    assert mem.read(0x100200, 3) == tk.HALT_FOREVER
    params = bp.boot_params.from_buffer_copy(mem.read(ZERO_PAGE_START, ctypes.sizeof(bp.boot_params)))
    assert params.hdr.header == bp.HDR_MAGIC
    assert params.hdr.type_of_loader == 0xFF
    assert params.hdr.loadflags & bp.CAN_USE_HEAP
    assert params.hdr.cmd_line_ptr == CMDLINE_START
    assert mem.read(CMDLINE_START, 20) == b"console=ttyS0 quiet\x00"
    assert params.acpi_rsdp_addr == 0xE0000
    assert params.hdr.ramdisk_size == 5000
    assert params.hdr.ramdisk_image % 4096 == 0
    assert params.hdr.ramdisk_image + 5000 <= 64 * MiB
    assert mem.read(params.hdr.ramdisk_image, 5000) == b"\x07" * 5000
    table = [(e.addr, e.size, e.type) for e in params.e820_table[: params.e820_entries]]
    assert table == e820_map(mem)
    assert sum(size for _a, size, kind in table if kind == bp.E820_RAM) == 64 * MiB - 0x100000 + 0x9FC00


def test_e820_marks_low_firmware_area_reserved_and_high_ram_usable() -> None:
    m = GuestMemoryMmap(ram_ranges(4096 * MiB))
    try:
        entries = e820_map(m)
    finally:
        m.close()
    assert entries[0] == (0, 0x9FC00, bp.E820_RAM)
    assert (0xE0000, 0x20000, bp.E820_RESERVED) in entries
    assert entries[-1] == (1 << 32, 4096 * MiB - 0xD000_0000, bp.E820_RAM)


def test_pvh_elf_gets_start_info_with_modules_and_memmap(mem: GuestMemoryMmap, tmp_path: Path) -> None:
    kernel = write(tmp_path, "vmlinux", tk.tiny_pvh_elf(b"\xf4"))
    initrd = write(tmp_path, "initrd", b"\x01" * 100)
    plan = load_kernel(mem, kernel, "quiet", initrd, rsdp_addr=0xE0000)
    assert plan.protocol is BootProtocol.PVH
    assert (plan.entry, plan.boot_info) == (0x100000, PVH_INFO_START)
    start = si.hvm_start_info.from_buffer_copy(mem.read(PVH_INFO_START, ctypes.sizeof(si.hvm_start_info)))
    assert start.magic == si.XEN_HVM_START_MAGIC_VALUE
    assert (start.nr_modules, start.rsdp_paddr, start.cmdline_paddr) == (1, 0xE0000, CMDLINE_START)
    mod = si.hvm_modlist_entry.from_buffer_copy(mem.read(start.modlist_paddr, 32))
    assert mod.size == 100 and mem.read(mod.paddr, 100) == b"\x01" * 100
    assert start.memmap_entries == len(e820_map(mem))
    assert mem.read(0x100000, 1) == b"\xf4"
    assert mem.read(0x100001, 64) == bytes(64)  # bss zeroed


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "too short"),
        (bytes(4096), "no boot-sector or HdrS signature"),
        (b"\x7fELF" + bytes(60), "not a 64-bit little-endian ELF"),
    ],
)
def test_corrupt_images_are_rejected(mem: GuestMemoryMmap, tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(KernelLoadError, match=message):
        load_kernel(mem, write(tmp_path, "k", data), "")


def test_old_boot_protocol_without_64bit_entry_is_rejected(mem: GuestMemoryMmap, tmp_path: Path) -> None:
    image = bytearray(tk.tiny_bzimage(b"\xf4"))
    image[0x206:0x208] = (0x0200).to_bytes(2, "little")
    with pytest.raises(KernelLoadError, match="no 64-bit entry point"):
        load_kernel(mem, write(tmp_path, "k", bytes(image)), "")


def test_elf_without_pvh_note_is_rejected(mem: GuestMemoryMmap, tmp_path: Path) -> None:
    image = bytearray(tk.tiny_pvh_elf(b"\xf4"))
    image[image.index(b"Xen\x00") : image.index(b"Xen\x00") + 3] = b"Foo"
    with pytest.raises(KernelLoadError, match="no PVH entry note"):
        load_kernel(mem, write(tmp_path, "k", bytes(image)), "")


def test_initrd_that_does_not_fit_names_the_memory_needed(mem: GuestMemoryMmap, tmp_path: Path) -> None:
    kernel = write(tmp_path, "bz", tk.tiny_bzimage(b"\xf4"))
    initrd = write(tmp_path, "initrd", bytes(70 * MiB))
    with pytest.raises(KernelLoadError, match="give the guest at least"):
        load_kernel(mem, kernel, "", initrd)


def test_command_line_longer_than_the_kernel_accepts_is_rejected(
    mem: GuestMemoryMmap, tmp_path: Path
) -> None:
    kernel = write(tmp_path, "bz", tk.tiny_bzimage(b"\xf4"))
    with pytest.raises(KernelLoadError, match="command line is 300 bytes"):
        load_kernel(mem, kernel, "x" * 300)
