"""Tiny hand-assembled guests for tests on a host's /dev/kvm (no real kernel needed).

`tiny_bzimage` wraps 64-bit machine code in a minimal bzImage (boot protocol
2.15 header, 64-bit entry) so the whole `Vmm` path - loader, boot_params,
long-mode setup, buses, devices, exit handling - runs in milliseconds.  Keep the
code to a few plain instructions: on a PVM host each ring-0 instruction is
emulated.
"""

from __future__ import annotations

import ctypes

from kata_vmm._bindings import bootparam as bp

# 64-bit snippets (each ends by resetting the machine through the i8042 or by halting)
MOV_DX_COM1 = bytes.fromhex("66baf803")  # mov dx, 0x3f8
MOV_DX_COM1_LSR = bytes.fromhex("66bafd03")  # mov dx, 0x3fd
OUT_DX_AL = b"\xee"
IN_AL_DX = b"\xec"
I8042_RESET = bytes.fromhex("b0fee664")  # mov al, 0xfe; out 0x64, al
HALT_FOREVER = bytes.fromhex("f4ebfd")  # hlt; jmp hlt
ACPI_POWER_OFF = bytes.fromhex("66bac003b034ee")  # mov dx, 0x3c0; mov al, SLP_EN | 5 << 2; out dx, al
UD2 = bytes.fromhex("0f0b")  # #UD with an empty IDT: #DF, then a triple fault


def print_serial(text: bytes) -> bytes:
    """Code writing ``text`` to COM1, byte by byte."""
    code = bytearray(MOV_DX_COM1)
    for b in text:
        code += bytes([0xB0, b]) + OUT_DX_AL  # mov al, b; out dx, al
    return bytes(code)


def echo_one_serial_byte() -> bytes:
    """Code that polls COM1 until a byte arrives, then writes it back."""
    return (
        MOV_DX_COM1_LSR
        + IN_AL_DX  # poll: in al, dx
        + bytes.fromhex("a801")  # test al, 1 (data ready)
        + bytes.fromhex("74fb")  # jz poll
        + MOV_DX_COM1
        + IN_AL_DX
        + OUT_DX_AL
    )


def spin_forever() -> bytes:
    """A tight loop that never exits to the VMM (for timeout and stop tests)."""
    return bytes.fromhex("ebfe")  # jmp $


def tiny_bzimage(code: bytes, *, init_size: int = 0x10000) -> bytes:
    """A minimal bzImage whose 64-bit entry point (load address + 0x200) runs ``code``."""
    hdr = bp.setup_header(
        setup_sects=1,
        boot_flag=bp.BOOT_FLAG_MAGIC,
        header=bp.HDR_MAGIC,
        version=0x020F,
        xloadflags=bp.XLF_KERNEL_64,
        init_size=init_size,
        cmdline_size=255,
        initrd_addr_max=0x7FFFFFFF,
    )
    image = bytearray(1024)
    image[0x1F1 : 0x1F1 + ctypes.sizeof(hdr)] = bytes(hdr)
    return bytes(image) + bytes(0x200) + code


def tiny_pvh_elf(code: bytes, *, load_addr: int = 0x100000) -> bytes:
    """A minimal ELF64 vmlinux: one PT_LOAD with ``code`` (32-bit) and a PVH entry note pointing at it."""
    import struct

    ehsize, phentsize = 64, 56
    note_name = b"Xen\x00"
    note = struct.pack("<III", len(note_name), 4, 18) + note_name + struct.pack("<I", load_addr)
    phoff = ehsize
    note_off = phoff + 2 * phentsize
    code_off = (note_off + len(note) + 15) & ~15
    header = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF",
        2,  # ELFCLASS64
        1,  # little endian
        1,  # EV_CURRENT
        0,
        0,
        bytes(7),
        2,  # ET_EXEC
        62,  # EM_X86_64
        1,
        0xFFFFFFFF81000000,  # e_entry: the 64-bit virtual entry, unused by PVH
        phoff,
        0,
        0,
        ehsize,
        phentsize,
        2,
        64,
        0,
        0,
    )
    load = struct.pack("<IIQQQQQQ", 1, 5, code_off, load_addr, load_addr, len(code), len(code) + 64, 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    image = bytearray(header + load + pnote + note)
    image += bytes(code_off - len(image))
    return bytes(image + code)


def cpio_newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """An uncompressed ``newc`` cpio archive of (path, mode, data, (rdev major, minor)) entries."""
    out = bytearray()

    def add(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]) -> None:
        raw_name = name.encode() + b"\x00"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + raw_name)
        out.extend(bytes(-len(out) % 4))
        out.extend(data)
        out.extend(bytes(-len(out) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        add(ino, name, mode, data, rdev)
    add(0, "TRAILER!!!", 0, b"", (0, 0))
    return bytes(out)


S_IFDIR, S_IFREG, S_IFCHR, S_IFLNK = 0o040000, 0o100000, 0o020000, 0o120000


def busybox_initramfs(init_script: str, busybox: bytes) -> bytes:
    """An initramfs holding a static busybox, /dev/console and ``init_script`` as /init."""
    return cpio_newc(
        [
            ("bin", S_IFDIR | 0o755, b"", (0, 0)),
            ("dev", S_IFDIR | 0o755, b"", (0, 0)),
            ("proc", S_IFDIR | 0o755, b"", (0, 0)),
            ("sys", S_IFDIR | 0o755, b"", (0, 0)),
            ("dev/console", S_IFCHR | 0o600, b"", (5, 1)),
            ("bin/busybox", S_IFREG | 0o755, busybox, (0, 0)),
            ("bin/sh", S_IFLNK | 0o777, b"busybox", (0, 0)),
            ("init", S_IFREG | 0o755, init_script.encode(), (0, 0)),
        ]
    )
