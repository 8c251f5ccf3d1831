"""Extracting the ELF vmlinux from a bzImage payload, and booting it through PVH."""

from __future__ import annotations

import ctypes
import gzip
import lzma
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kata_vmm import ExitKind, KernelLoadError, VmConfig, Vmm
from kata_vmm import testing as tk
from kata_vmm._bindings import bootparam as bp
from kata_vmm._vmlinux import extract_vmlinux, write_vmlinux

ELF = tk.tiny_pvh_elf(
    tk.MOV_DX_COM1 + bytes([0xB0, ord("P")]) + tk.OUT_DX_AL + tk.I8042_RESET + tk.HALT_FOREVER
)


def bzimage_with_payload(payload: bytes) -> bytes:
    image = bytearray(
        tk.tiny_bzimage(b"")[: 1024 + 0x40]
    )  # setup sectors, then 0x40 bytes before the payload
    hdr = bp.setup_header.from_buffer_copy(image, 0x1F1)
    hdr.payload_offset = 0x40
    hdr.payload_length = len(payload)
    image[0x1F1 : 0x1F1 + ctypes.sizeof(hdr)] = bytes(hdr)
    # the kernel build appends the decompressed size after the stream
    return bytes(image) + payload + len(ELF).to_bytes(4, "little")


@pytest.mark.parametrize("compress", [gzip.compress, lzma.compress], ids=["gzip", "xz"])
def test_extract_recovers_the_elf(tmp_path: Path, compress: Callable[[bytes], bytes]) -> None:
    bz = tmp_path / "bzImage"
    bz.write_bytes(bzimage_with_payload(compress(ELF)))
    assert extract_vmlinux(bz) == ELF
    out = tmp_path / "vmlinux"
    assert write_vmlinux(bz, out) == len(ELF)
    assert out.read_bytes() == ELF


def test_unknown_compression_is_a_clear_error(tmp_path: Path) -> None:
    bz = tmp_path / "bzImage"
    bz.write_bytes(bzimage_with_payload(b"\x99" * 64))
    with pytest.raises(KernelLoadError, match="unknown bzImage payload compression"):
        extract_vmlinux(bz)


def test_non_bzimage_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(bytes(8192))
    with pytest.raises(KernelLoadError, match="not a bzImage"):
        extract_vmlinux(f)


@pytest.mark.kvm
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
def test_extracted_vmlinux_boots_through_pvh(tmp_path: Path) -> None:
    bz = tmp_path / "bzImage"
    bz.write_bytes(bzimage_with_payload(gzip.compress(ELF)))
    vmlinux = tmp_path / "vmlinux"
    write_vmlinux(bz, vmlinux)
    out: list[bytes] = []
    vmm = Vmm()
    try:
        vmm.configure(VmConfig(kernel=vmlinux, memory_mib=32, console_output=out.append))
        vmm.start()
        status = vmm.wait(20)
        assert status is not None and status.kind is ExitKind.RESET
        assert b"".join(out) == b"P"
    finally:
        vmm.close()
