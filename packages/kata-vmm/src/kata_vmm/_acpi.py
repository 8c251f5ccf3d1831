"""ACPI tables for a hardware-reduced x86 machine: RSDP, XSDT, FADT, MADT and a DSDT (ACPI 6.4 §5.2).

Debian kernels find virtio-mmio devices only through ACPI (their
``virtio_mmio.device=`` command-line support is compiled out), so every
virtio-mmio slot present at boot becomes a DSDT device with _HID "LNRO0005",
next to the COM1 serial port.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kata_vmm import _aml as aml
from kata_vmm._layout import (
    ACPI_RESET_PORT,
    ACPI_RESET_VALUE,
    ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT,
    IOAPIC_START,
    LAPIC_START,
    S5_SLEEP_TYPE,
    SERIAL_IRQ,
    SERIAL_PORT_BASE,
    SERIAL_PORT_SIZE,
)
from kata_vmm._memory import GuestAddress

OEM_ID = b"KATAPY"
OEM_TABLE_ID = b"KATAVMM "
CREATOR_ID = b"KPYV"
HEADER_SIZE = 36

FADT_REVISION = 6
FADT_MINOR_REVISION = 4
FADT_SIZE = 276
FADT_F_RESET_REG_SUP = 1 << 10
FADT_F_HW_REDUCED_ACPI = 1 << 20
IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT = 1 << 5
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

MADT_PCAT_COMPAT = 1
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LAPIC_ENABLED = 1
MADT_LAPIC_ONLINE_CAPABLE = 2  # ACPI 6.3: a disabled entry the OS may hot-add (from MADT revision 5)


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` sum to zero modulo 256."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header (§5.2.6) with its checksum, then ``body``."""
    length = HEADER_SIZE + len(body)
    header = struct.pack(
        "<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1
    )
    table = bytearray(header + body)
    table[9] = checksum(bytes(table))
    return bytes(table)


def rsdp(xsdt_addr: int) -> bytes:
    """The ACPI 2.0+ Root System Description Pointer (§5.2.5.3), both checksums filled."""
    raw = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_addr, 0))
    raw[8] = checksum(bytes(raw[:20]))
    raw[32] = checksum(bytes(raw))
    return bytes(raw)


def xsdt(table_addrs: list[int]) -> bytes:
    """The Extended System Description Table listing 64-bit table addresses."""
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in table_addrs))


def _gas(port: int) -> bytes:
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, port)


def fadt(dsdt_addr: int) -> bytes:
    """A hardware-reduced FADT (§5.2.9): no PM blocks, sleep and reset registers in port space."""
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    put(40, "<I", dsdt_addr if dsdt_addr < (1 << 32) else 0)
    put(109, "<H", IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
    put(112, "<I", FADT_F_HW_REDUCED_ACPI | FADT_F_RESET_REG_SUP)
    body[116 - HEADER_SIZE : 128 - HEADER_SIZE] = _gas(ACPI_RESET_PORT)
    put(128, "<B", ACPI_RESET_VALUE)
    put(131, "<B", FADT_MINOR_REVISION)
    put(140, "<Q", dsdt_addr)
    body[244 - HEADER_SIZE : 256 - HEADER_SIZE] = _gas(ACPI_SLEEP_CONTROL_PORT)
    body[256 - HEADER_SIZE : 268 - HEADER_SIZE] = _gas(ACPI_SLEEP_STATUS_PORT)
    put(268, "<Q", int.from_bytes(b"KATAPYVM", "little"))
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def madt(num_vcpus: int, max_vcpus: int = 0) -> bytes:
    """The MADT (§5.2.12): one local APIC per vCPU, the IOAPIC, and IRQ0 routed to GSI 2 as on a PC.

    APIC ids ``num_vcpus`` up to ``max_vcpus`` get disabled, Online Capable entries: the guest counts them
    as possible CPUs, which vCPU hot-add (upcall AddCpu) brings up later. Linux from 5.18 ignores a disabled
    entry without that flag in a revision-5 MADT."""
    body = struct.pack("<II", LAPIC_START, MADT_PCAT_COMPAT)
    for cpu in range(max(num_vcpus, max_vcpus)):
        flags = MADT_LAPIC_ENABLED if cpu < num_vcpus else MADT_LAPIC_ONLINE_CAPABLE
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, flags)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, 0, 0, IOAPIC_START, 0)
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, 0, 2, 0)
    return sdt(b"APIC", 5, body)


@dataclass(frozen=True)
class MmioDeviceDescription:
    """A virtio-mmio device as the DSDT describes it."""

    base: int
    size: int
    gsi: int


def dsdt(mmio_devices: list[MmioDeviceDescription]) -> bytes:
    """The DSDT: COM1, one ``LNRO0005`` device per virtio-mmio slot, and \\_S5 for power-off."""
    devices = [
        aml.device(
            "COM1",
            aml.name("_HID", aml.eisa_id("PNP0501")),
            aml.name("_UID", aml.integer(1)),
            aml.name(
                "_CRS",
                aml.resource_template(
                    aml.io_port(SERIAL_PORT_BASE, SERIAL_PORT_SIZE), aml.irq_no_flags(SERIAL_IRQ)
                ),
            ),
        )
    ]
    for index, dev in enumerate(mmio_devices):
        devices.append(
            aml.device(
                f"V{index:03X}",
                aml.name("_HID", aml.string("LNRO0005")),
                aml.name("_UID", aml.integer(index)),
                aml.name("_CCA", aml.integer(1)),
                aml.name(
                    "_CRS",
                    aml.resource_template(
                        aml.memory32_fixed(dev.base, dev.size), aml.extended_interrupt(dev.gsi)
                    ),
                ),
            )
        )
    body = aml.scope("\\_SB", *devices) + aml.name("_S5", aml.package(aml.integer(S5_SLEEP_TYPE)))
    return sdt(b"DSDT", 2, body)


@dataclass(frozen=True)
class AcpiTables:
    """The tables laid out at consecutive guest addresses; ``rsdp_addr`` goes into boot_params."""

    rsdp_addr: GuestAddress
    blobs: list[tuple[GuestAddress, bytes]]

    @property
    def size(self) -> int:
        """Bytes from the RSDP to the end of the last table."""
        last_addr, last = self.blobs[-1]
        return last_addr + len(last) - self.rsdp_addr


def build_tables(
    base: GuestAddress, num_vcpus: int, mmio_devices: list[MmioDeviceDescription], max_vcpus: int = 0
) -> AcpiTables:
    """Lay out RSDP, XSDT, FADT, MADT and DSDT from ``base`` (each table 16-byte aligned); ``max_vcpus``
    beyond ``num_vcpus`` are possible hot-add vCPUs (`madt`)."""

    def align(addr: int) -> int:
        return (addr + 15) & ~15

    rsdp_addr = base
    dsdt_blob = dsdt(mmio_devices)
    madt_blob = madt(num_vcpus, max_vcpus)
    xsdt_addr = align(rsdp_addr + 36)
    xsdt_len = HEADER_SIZE + 8 * 2
    fadt_addr = align(xsdt_addr + xsdt_len)
    madt_addr = align(fadt_addr + FADT_SIZE)
    dsdt_addr = align(madt_addr + len(madt_blob))
    blobs = [
        (rsdp_addr, rsdp(xsdt_addr)),
        (GuestAddress(xsdt_addr), xsdt([fadt_addr, madt_addr])),
        (GuestAddress(fadt_addr), fadt(dsdt_addr)),
        (GuestAddress(madt_addr), madt_blob),
        (GuestAddress(dsdt_addr), dsdt_blob),
    ]
    return AcpiTables(rsdp_addr, blobs)
