"""Extract the uncompressed ELF vmlinux from a bzImage, so kata-vmm can enter it through PVH.

Booting the ELF skips the in-guest decompressor and its relocation pass (seconds under
nested virtualization); Kata ships ``vmlinux.container`` for its VMMs for the same reason.
gzip, xz, lzma and bzip2 payloads are decompressed in-process; lz4 and zstd through the
``lz4``/``zstd`` commands, when installed.
"""

from __future__ import annotations

import bz2
import ctypes
import lzma
import shutil
import subprocess
import zlib
from pathlib import Path

from kata_vmm._bindings import bootparam as bp
from kata_vmm._errors import KernelLoadError

ELF_MAGIC = b"\x7fELF"
_TOOLS = {"lz4": ["lz4", "-dc"], "zstd": ["zstd", "-dcq"]}


def _compression(payload: bytes) -> str:
    if payload[:2] == b"\x1f\x8b":
        return "gzip"
    if payload[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if payload[:3] == b"BZh":
        return "bzip2"
    if payload[:3] == b"\x5d\x00\x00":
        return "lzma"
    if payload[:4] == b"\x02\x21\x4c\x18":
        return "lz4"
    if payload[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd"
    return "unknown"


def _decompress(kind: str, payload: bytes) -> bytes:
    if kind == "gzip":
        return zlib.decompressobj(wbits=31).decompress(payload)  # trailing size word ignored
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if kind == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(payload)
    if kind in _TOOLS:
        tool = _TOOLS[kind]
        if shutil.which(tool[0]) is None:
            raise KernelLoadError(
                f"the bzImage payload is {kind}-compressed and `{tool[0]}` is not installed"
            )
        # the kernel appends its decompressed size to the stream: a tool may warn, its output is whole
        result = subprocess.run(tool, input=payload, capture_output=True, check=False)
        return result.stdout
    raise KernelLoadError(f"unknown bzImage payload compression (magic {payload[:4].hex()})")


def extract_vmlinux(bzimage: Path) -> bytes:
    """The ELF vmlinux inside ``bzimage``; raises `KernelLoadError` when there is none."""
    try:
        image = bzimage.read_bytes()
    except OSError as err:
        raise KernelLoadError(f"cannot read kernel {bzimage}: {err.strerror}") from err
    if len(image) < 0x1F1 + ctypes.sizeof(bp.setup_header):
        raise KernelLoadError(f"{bzimage} is not a bzImage (too short)")
    hdr = bp.setup_header.from_buffer_copy(image, 0x1F1)
    if hdr.header != bp.HDR_MAGIC or hdr.version < 0x0208 or not hdr.payload_length:
        raise KernelLoadError(f"{bzimage} is not a bzImage with a payload (boot protocol 2.08+)")
    start = ((hdr.setup_sects or 4) + 1) * 512 + hdr.payload_offset
    payload = image[start : start + hdr.payload_length]
    elf = _decompress(_compression(payload), payload)
    if elf[:4] != ELF_MAGIC:
        raise KernelLoadError(f"{bzimage}: the decompressed payload is not an ELF image")
    return elf


def write_vmlinux(bzimage: Path, output: Path) -> int:
    """Extract ``bzimage``'s vmlinux to ``output`` (atomically); returns its size."""
    elf = extract_vmlinux(bzimage)
    tmp = output.with_name(output.name + ".tmp")
    try:
        tmp.write_bytes(elf)
        tmp.replace(output)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise KernelLoadError(f"cannot write {output}: {err.strerror}") from err
    return len(elf)
