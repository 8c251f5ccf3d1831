"""Kernel loaders: bzImage through the 64-bit boot protocol, ELF vmlinux through PVH.

Both place the kernel, the initrd and the command line in guest memory and
return a `BootPlan` saying how the boot vCPU enters the kernel.  The
structures follow Documentation/arch/x86/boot.rst (boot protocol 2.12+) and
Xen's PVH start-of-day ABI.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from kata_vmm._bindings import bootparam as bp
from kata_vmm._bindings import start_info as si
from kata_vmm._errors import KernelLoadError
from kata_vmm._layout import (
    ACPI_MAX_SIZE,
    ACPI_START,
    BIOS_AREA_START,
    CMDLINE_MAX_SIZE,
    CMDLINE_START,
    EBDA_START,
    HIGH_MEMORY_START,
    INITRD_ALIGN,
    PAGE_SIZE,
    PVH_INFO_START,
    PVH_MEMMAP_START,
    PVH_MODLIST_START,
    ZERO_PAGE_START,
    MiB,
)
from kata_vmm._memory import GuestAddress, GuestMemoryMmap

MIN_BOOT_PROTOCOL = 0x020C  # 2.12: XLF_KERNEL_64 and a 64-bit entry at load address + 0x200
BZIMAGE_64BIT_ENTRY_OFFSET = 0x200
ELF_MAGIC = b"\x7fELF"


class BootProtocol(Enum):
    """How the boot vCPU enters the kernel."""

    LINUX_64 = "linux-64"
    PVH = "pvh"


@dataclass(frozen=True)
class BootPlan:
    """Where the loaded kernel starts and what it is handed."""

    protocol: BootProtocol
    entry: GuestAddress
    boot_info: GuestAddress  # boot_params (%rsi) or hvm_start_info (%ebx)
    kernel_end: GuestAddress
    initrd: tuple[GuestAddress, int] | None


def e820_map(mem: GuestMemoryMmap) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: RAM below the EBDA, the firmware area with the ACPI tables, RAM above."""
    entries: list[tuple[int, int, int]] = []
    for region in mem.regions:
        if region.hotplug:  # virtio-mem's: the driver adds it, the boot map must not
            continue
        start, end = region.guest_addr, region.end
        if start < BIOS_AREA_START:
            entries.append((start, min(end, EBDA_START) - start, bp.E820_RAM))
            if end > HIGH_MEMORY_START:
                entries.append((ACPI_START, ACPI_MAX_SIZE, bp.E820_RESERVED))
                entries.append((HIGH_MEMORY_START, end - HIGH_MEMORY_START, bp.E820_RAM))
        else:
            entries.append((start, end - start, bp.E820_RAM))
    return entries


def _read_image(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise KernelLoadError(f"{what} not found: {path}") from err
    except IsADirectoryError as err:
        raise KernelLoadError(f"{what} is a directory: {path}") from err
    except OSError as err:
        raise KernelLoadError(f"cannot read {what} {path}: {err.strerror}") from err


def _write_cmdline(mem: GuestMemoryMmap, cmdline: str, limit: int) -> int:
    raw = cmdline.encode() + b"\x00"
    if b"\x00" in raw[:-1]:
        raise KernelLoadError("kernel command line contains a NUL byte")
    if len(raw) > min(limit, CMDLINE_MAX_SIZE):
        raise KernelLoadError(f"kernel command line is {len(raw) - 1} bytes; the limit is {limit - 1}")
    mem.write(CMDLINE_START, raw)
    return len(raw)


def _place_initrd(
    mem: GuestMemoryMmap, data: bytes, kernel_end: int, max_end: int
) -> tuple[GuestAddress, int]:
    low_end = min(mem.regions[0].end, max_end)
    addr = (low_end - len(data)) & ~(INITRD_ALIGN - 1)
    if addr < kernel_end:
        addr = (low_end - len(data)) & ~(PAGE_SIZE - 1)
    if addr < kernel_end or len(data) > low_end:
        need = (kernel_end + len(data)) // MiB + 1
        raise KernelLoadError(
            f"initrd ({len(data) // MiB} MiB) does not fit in guest memory below {low_end // MiB} MiB "
            f"after the kernel; give the guest at least {need} MiB"
        )
    mem.write(addr, data)
    return GuestAddress(addr), len(data)


def load_kernel(
    mem: GuestMemoryMmap,
    kernel: Path,
    cmdline: str,
    initrd: Path | None = None,
    rsdp_addr: int = 0,
) -> BootPlan:
    """Load a bzImage or an ELF vmlinux (detected by content) with its initrd and command line."""
    image = _read_image(kernel, "kernel")
    initrd_data = _read_image(initrd, "initrd") if initrd is not None else None
    if image[:4] == ELF_MAGIC:
        return _load_elf_pvh(mem, kernel, image, cmdline, initrd=initrd_data, rsdp_addr=rsdp_addr)
    return _load_bzimage(mem, kernel, image, cmdline, initrd=initrd_data, rsdp_addr=rsdp_addr)


def _load_bzimage(
    mem: GuestMemoryMmap, path: Path, image: bytes, cmdline: str, *, initrd: bytes | None, rsdp_addr: int
) -> BootPlan:
    hdr_end = 0x1F1 + ctypes.sizeof(bp.setup_header)
    if len(image) < hdr_end:
        raise KernelLoadError(f"{path} is not a Linux kernel image (too short: {len(image)} bytes)")
    hdr = bp.setup_header.from_buffer_copy(image, 0x1F1)
    if hdr.boot_flag != bp.BOOT_FLAG_MAGIC or hdr.header != bp.HDR_MAGIC:
        raise KernelLoadError(f"{path} is not a bzImage or ELF kernel (no boot-sector or HdrS signature)")
    if hdr.version < MIN_BOOT_PROTOCOL or not hdr.xloadflags & bp.XLF_KERNEL_64:
        raise KernelLoadError(
            f"{path}: boot protocol {hdr.version >> 8}.{hdr.version & 0xFF} has no 64-bit entry point"
        )
    setup_sects = hdr.setup_sects or 4
    kernel_offset = (setup_sects + 1) * 512
    payload = memoryview(image)[kernel_offset:]
    if not payload:
        raise KernelLoadError(f"{path}: truncated bzImage (no protected-mode kernel)")
    load_addr = HIGH_MEMORY_START
    # the kernel decompresses in place and needs init_size bytes from its load address
    kernel_end = load_addr + max(hdr.init_size, len(payload))
    low_ram_end = mem.regions[0].end
    if kernel_end > low_ram_end:
        raise KernelLoadError(
            f"kernel needs {kernel_end // MiB + 1} MiB of guest memory to decompress; "
            f"the guest has {low_ram_end // MiB} MiB"
        )
    mem.write(load_addr, payload)

    params = bp.boot_params()
    params.hdr = hdr
    params.hdr.type_of_loader = bp.LOADER_TYPE_UNDEFINED
    params.hdr.loadflags = (hdr.loadflags | bp.CAN_USE_HEAP | bp.LOADED_HIGH) & ~bp.KEEP_SEGMENTS
    params.hdr.heap_end_ptr = 0xFE00
    params.hdr.vid_mode = 0xFFFF
    params.hdr.code32_start = load_addr
    params.hdr.cmd_line_ptr = CMDLINE_START
    params.hdr.cmdline_size = _write_cmdline(mem, cmdline, hdr.cmdline_size + 1 if hdr.cmdline_size else 256)
    params.acpi_rsdp_addr = rsdp_addr
    placed = None
    if initrd is not None:
        max_end = (hdr.initrd_addr_max or 0x37FFFFFF) + 1
        placed = _place_initrd(mem, initrd, kernel_end, max_end)
        params.hdr.ramdisk_image = placed[0]
        params.hdr.ramdisk_size = placed[1]
    e820 = e820_map(mem)
    params.e820_entries = len(e820)
    for i, (addr, size, kind) in enumerate(e820):
        params.e820_table[i] = bp.boot_e820_entry(addr=addr, size=size, type=kind)
    mem.write(ZERO_PAGE_START, bytes(params))
    return BootPlan(
        BootProtocol.LINUX_64,
        GuestAddress(load_addr + BZIMAGE_64BIT_ENTRY_OFFSET),
        ZERO_PAGE_START,
        GuestAddress(kernel_end),
        placed,
    )


# --- ELF (PVH) ------------------------------------------------------------------------------------
PT_LOAD = 1
PT_NOTE = 4


def _pvh_entry(path: Path, image: bytes, phdrs: list[tuple[int, ...]]) -> int | None:
    for p_type, _flags, offset, _vaddr, _paddr, filesz, _memsz, _align in phdrs:
        if p_type != PT_NOTE:
            continue
        pos, end = offset, offset + filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", image, pos)
            name_start = pos + 12
            desc_start = name_start + ((namesz + 3) & ~3)
            if desc_start + descsz > len(image):
                raise KernelLoadError(f"{path}: truncated ELF note")
            name = image[name_start : name_start + namesz].rstrip(b"\x00")
            if name == b"Xen" and ntype == si.XEN_ELFNOTE_PHYS32_ENTRY:
                size = 8 if descsz >= 8 else 4
                return int.from_bytes(image[desc_start : desc_start + size], "little") & 0xFFFFFFFF
            pos = desc_start + ((descsz + 3) & ~3)
    return None


def _load_elf_pvh(
    mem: GuestMemoryMmap, path: Path, image: bytes, cmdline: str, *, initrd: bytes | None, rsdp_addr: int
) -> BootPlan:
    if len(image) < 64 or image[4] != 2 or image[5] != 1:
        raise KernelLoadError(f"{path}: not a 64-bit little-endian ELF")
    (e_machine,) = struct.unpack_from("<H", image, 18)
    if e_machine != 62:  # EM_X86_64
        raise KernelLoadError(f"{path}: ELF machine {e_machine} is not x86-64")
    (e_phoff,) = struct.unpack_from("<Q", image, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", image, 54)
    if e_phentsize != 56 or e_phoff + e_phnum * 56 > len(image):
        raise KernelLoadError(f"{path}: corrupt ELF program headers")
    phdrs = [struct.unpack_from("<IIQQQQQQ", image, e_phoff + i * 56) for i in range(e_phnum)]
    entry = _pvh_entry(path, image, phdrs)
    if entry is None:
        raise KernelLoadError(f"{path}: ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
    kernel_end = 0
    for p_type, _flags, offset, _vaddr, paddr, filesz, memsz, _align in phdrs:
        if p_type != PT_LOAD:
            continue
        if offset + filesz > len(image) or filesz > memsz:
            raise KernelLoadError(f"{path}: ELF segment at offset {offset:#x} lies outside the file")
        if paddr < HIGH_MEMORY_START:
            raise KernelLoadError(f"{path}: ELF segment at {paddr:#x} overlaps low memory")
        try:
            mem.check_range(paddr, memsz)
        except Exception as err:
            raise KernelLoadError(
                f"{path}: kernel segment {paddr:#x}+{memsz:#x} does not fit in guest memory"
            ) from err
        # no copy of the (tens of MiB) segment on the way; the bss needs no zeroing: guest RAM is a
        # fresh anonymous or memfd mapping, which the host kernel hands out zero-filled
        mem.write(paddr, memoryview(image)[offset : offset + filesz])
        kernel_end = max(kernel_end, paddr + memsz)

    start = si.hvm_start_info(magic=si.XEN_HVM_START_MAGIC_VALUE, version=1)
    _write_cmdline(mem, cmdline, CMDLINE_MAX_SIZE)
    start.cmdline_paddr = CMDLINE_START
    start.rsdp_paddr = rsdp_addr
    placed = None
    if initrd is not None:
        placed = _place_initrd(mem, initrd, kernel_end, 1 << 32)
        mod = si.hvm_modlist_entry(paddr=placed[0], size=placed[1])
        mem.write(PVH_MODLIST_START, bytes(mod))
        start.nr_modules = 1
        start.modlist_paddr = PVH_MODLIST_START
    e820 = e820_map(mem)
    table = b"".join(bytes(si.hvm_memmap_table_entry(addr=a, size=s, type=t)) for a, s, t in e820)
    mem.write(PVH_MEMMAP_START, table)
    start.memmap_paddr = PVH_MEMMAP_START
    start.memmap_entries = len(e820)
    mem.write(PVH_INFO_START, bytes(start))
    return BootPlan(BootProtocol.PVH, GuestAddress(entry), PVH_INFO_START, GuestAddress(kernel_end), placed)
