"""ACPI tables: checksums hold and Debian's acpica-tools disassemble every table without errors."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kata_vmm import _aml as aml
from kata_vmm._acpi import (
    HEADER_SIZE,
    MmioDeviceDescription,
    build_tables,
    checksum,
    dsdt,
    fadt,
    madt,
    rsdp,
    xsdt,
)
from kata_vmm._memory import GuestAddress

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(IASL is None, reason="iasl (acpica-tools) is not installed")

SLOTS = [MmioDeviceDescription(0xD000_0000 + i * 0x1000, 0x1000, 5 + i) for i in range(3)]


def _disassemble(tmp_path: Path, name: str, blob: bytes) -> str:
    src = tmp_path / f"{name}.dat"
    src.write_bytes(blob)
    result = subprocess.run(
        [IASL or "iasl", "-d", src.name], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Error" not in output and "Warning" not in output, output
    return (tmp_path / f"{name}.dsl").read_text()


def test_every_table_sums_to_zero() -> None:
    tables = build_tables(GuestAddress(0xE0000), 4, SLOTS)
    for _addr, blob in tables.blobs[1:]:
        assert sum(blob) % 256 == 0
        assert struct.unpack_from("<I", blob, 4)[0] == len(blob)
    root = tables.blobs[0][1]
    assert sum(root[:20]) % 256 == 0
    assert sum(root) % 256 == 0


def test_tables_chain_from_rsdp_to_dsdt() -> None:
    tables = build_tables(GuestAddress(0xE0000), 2, SLOTS)
    blobs = dict(tables.blobs)
    xsdt_addr = struct.unpack_from("<Q", blobs[tables.rsdp_addr], 24)[0]
    fadt_addr, madt_addr = struct.unpack_from("<QQ", blobs[xsdt_addr], 36)
    assert blobs[fadt_addr][:4] == b"FACP"
    assert blobs[madt_addr][:4] == b"APIC"
    dsdt_addr = struct.unpack_from("<Q", blobs[fadt_addr], 140)[0]
    assert blobs[dsdt_addr][:4] == b"DSDT"
    assert tables.size < 0x20000


@needs_iasl
@pytest.mark.parametrize(
    ("name", "blob", "expect"),
    [
        ("xsdt", xsdt([0xE0040, 0xE0200]), "00000000000E0040"),
        ("fadt", fadt(0xE0400), "Hardware Reduced (V5) : 1"),
        ("apic", madt(2), "Local Apic ID : 01"),
        ("dsdt", dsdt(SLOTS), 'Name (_HID, "LNRO0005")'),
    ],
)
def test_iasl_disassembles_table_without_errors(tmp_path: Path, name: str, blob: bytes, expect: str) -> None:
    text = _disassemble(tmp_path, name, blob)
    assert expect in text


@needs_iasl
def test_dsdt_describes_serial_virtio_slots_and_s5(tmp_path: Path) -> None:
    text = _disassemble(tmp_path, "dsdt", dsdt(SLOTS))
    assert 'EisaId ("PNP0501")' in text
    assert "0x03F8," in text
    assert text.count('"LNRO0005"') == 3
    assert "0xD0002000," in text
    assert "0x00000007," in text  # slot 2's GSI
    assert "Name (_S5, Package (0x01)" in text


@needs_iasl
def test_fadt_points_sleep_and_reset_registers_at_our_ports(tmp_path: Path) -> None:
    text = _disassemble(tmp_path, "fadt", fadt(0xE0400))
    assert "Reset Register Supported (V2) : 1" in text
    assert "Address : 00000000000003C2" in text  # reset register
    assert "Address : 00000000000003C0" in text  # sleep control


@needs_iasl
def test_rsdp_matches_iasl_compiled_rsdp(tmp_path: Path) -> None:
    # iasl -d cannot read a bare RSDP, but its data-table compiler can build one: ours must be byte-identical.
    source = tmp_path / "rsdp.asl"
    source.write_text(
        '[0008] Signature : "RSD PTR "\n'
        "[0001] Checksum : 00\n"
        '[0006] Oem ID : "KATAPY"\n'
        "[0001] Revision : 02\n"
        "[0004] RSDT Address : 00000000\n"
        "[0004] Length : 00000024\n"
        "[0008] XSDT Address : 00000000000E0030\n"
        "[0001] Extended Checksum : 00\n"
        "[0003] Reserved : 000000\n"
    )
    result = subprocess.run(
        [IASL or "iasl", source.name], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert rsdp(0xE0030) == (tmp_path / "rsdp.aml").read_bytes()


def test_checksum_complements_the_byte_sum() -> None:
    assert checksum(b"\x01\x02") == 0xFD
    assert checksum(b"") == 0


@pytest.mark.parametrize(
    ("body", "encoded"),
    [(0, b"\x01"), (62, b"\x3f"), (63, b"\x41\x04"), (0xFFD, b"\x4f\xff"), (0xFFE, b"\x81\x00\x01")],
)
def test_pkg_length_counts_its_own_bytes(body: int, encoded: bytes) -> None:
    assert aml.pkg_length(body) == encoded


def test_eisa_id_compresses_pnp0501() -> None:
    assert aml.eisa_id("PNP0501") == bytes([0x0C, 0x41, 0xD0, 0x05, 0x01])


def test_integer_uses_shortest_encoding() -> None:
    assert aml.integer(0) == b"\x00"
    assert aml.integer(1) == b"\x01"
    assert aml.integer(5) == b"\x0a\x05"
    assert aml.integer(0x1234) == b"\x0b\x34\x12"
    assert aml.integer(0xD0000000) == b"\x0c\x00\x00\x00\xd0"


def test_madt_lists_hot_add_vcpus_disabled_and_online_capable() -> None:
    table = madt(1, 3)
    entries, at = [], HEADER_SIZE + 8
    while at < len(table):
        kind, length = table[at], table[at + 1]
        if kind == 0:  # Processor Local APIC: ACPI id, APIC id, flags
            entries.append((table[at + 2], table[at + 3], int.from_bytes(table[at + 4 : at + 8], "little")))
        at += length
    assert entries == [(0, 0, 1), (1, 1, 2), (2, 2, 2)]  # enabled, then Online Capable only
    assert table[8] == 5 and checksum(table) == 0  # revision 5: Linux needs the Online Capable flag
    assert madt(2) == madt(2, 2) == madt(2, 1)  # no hot-add: as before
