"""Where things live in guest-physical memory and port space (x86-64).

Low memory follows the PC conventions the Linux boot code expects; the MMIO
window below 4 GiB holds the local APIC, IOAPIC and the virtio-mmio slots.
RAM larger than the window start continues above 4 GiB.
"""

from __future__ import annotations

from kata_virtio import MMIO_WINDOW_SIZE
from kata_vmm._memory import GuestAddress

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB

# --- low memory (below 1 MiB) ----------------------------------------------------------------
BOOT_GDT_START = GuestAddress(0x500)  # 4 descriptors for the 64-bit entry
BOOT_IDT_START = GuestAddress(0x520)  # an empty IDT
PVH_INFO_START = GuestAddress(0x6000)  # hvm_start_info
PVH_MODLIST_START = GuestAddress(0x6040)  # hvm_modlist_entry[1]
PVH_MEMMAP_START = GuestAddress(0x6100)  # hvm_memmap_table_entry[]
ZERO_PAGE_START = GuestAddress(0x7000)  # boot_params
BOOT_STACK_POINTER = GuestAddress(0x8FF0)
PML4_START = GuestAddress(0x9000)  # identity page tables for the first 4 GiB
PDPTE_START = GuestAddress(0xA000)
PDE_START = GuestAddress(0xB000)  # four pages, up to 0xf000
CMDLINE_START = GuestAddress(0x20000)
CMDLINE_MAX_SIZE = 4096
EBDA_START = GuestAddress(0x9FC00)  # RAM below this is usable; the BIOS area above is reserved
BIOS_AREA_START = GuestAddress(0xA0000)
ACPI_START = GuestAddress(0xE0000)  # RSDP first: the kernel also scans 0xe0000-0xfffff for it
ACPI_MAX_SIZE = 0x20000

# --- kernel and initrd ------------------------------------------------------------------------
HIGH_MEMORY_START = GuestAddress(0x100000)  # bzImage protected-mode kernel loads at 1 MiB
INITRD_ALIGN = 2 * MiB

# --- the 32-bit MMIO window ---------------------------------------------------------------------
MMIO_GAP_START = GuestAddress(0xD000_0000)
MMIO_GAP_END = GuestAddress(0x1_0000_0000)
VIRTIO_MMIO_START = GuestAddress(0xD000_0000)
VIRTIO_MMIO_SLOT_SIZE = MMIO_WINDOW_SIZE  # one virtio-mmio register window per slot
VIRTIO_MMIO_SLOTS = 32
IOAPIC_START = GuestAddress(0xFEC0_0000)
LAPIC_START = GuestAddress(0xFEE0_0000)
KVM_IDENTITY_MAP_START = GuestAddress(0xFFFB_C000)  # one page
KVM_TSS_START = GuestAddress(0xFFFB_D000)  # three pages
HIGH_RAM_START = GuestAddress(0x1_0000_0000)

# --- interrupts (GSIs on the in-kernel IOAPIC) ----------------------------------------------------
SERIAL_IRQ = 4  # COM1
VIRTIO_MMIO_FIRST_IRQ = 5
IOAPIC_PINS = 24

# --- port I/O --------------------------------------------------------------------------------------
SERIAL_PORT_BASE = 0x3F8  # COM1
SERIAL_PORT_SIZE = 8
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
ACPI_SLEEP_CONTROL_PORT = 0x3C0  # hardware-reduced ACPI: FADT SLEEP_CONTROL_REG
ACPI_SLEEP_STATUS_PORT = 0x3C1  # FADT SLEEP_STATUS_REG
ACPI_RESET_PORT = 0x3C2  # FADT RESET_REG
ACPI_RESET_VALUE = 0x01
S5_SLEEP_TYPE = 5  # the value the DSDT's \_S5 hands the kernel


def virtio_mmio_slot(index: int) -> tuple[GuestAddress, int]:
    """Guest-physical base and GSI of virtio-mmio slot ``index``."""
    if not 0 <= index < VIRTIO_MMIO_SLOTS:
        raise ValueError(f"virtio-mmio slot {index} out of range 0..{VIRTIO_MMIO_SLOTS - 1}")
    return GuestAddress(VIRTIO_MMIO_START + index * VIRTIO_MMIO_SLOT_SIZE), VIRTIO_MMIO_FIRST_IRQ + index


def ram_ranges(mem_size: int) -> list[tuple[GuestAddress, int]]:
    """The guest-physical RAM ranges for ``mem_size`` bytes: below the MMIO gap, then above 4 GiB."""
    low = min(mem_size, MMIO_GAP_START)
    ranges = [(GuestAddress(0), low)]
    if mem_size > low:
        ranges.append((HIGH_RAM_START, mem_size - low))
    return ranges


# --- memory hot-plug (virtio-mem) ------------------------------------------------------------------
HOTPLUG_ALIGN = 128 * MiB  # Linux's memory block size on x86-64: virtio_mem adds memory in these units
MAX_PHYS_ADDR = 1 << 46  # keep the region below what any x86-64 guest can address (46 bits: Intel since 2008)


def hotplug_range(mem_size: int, hotplug_size: int) -> tuple[GuestAddress, int]:
    """The virtio-mem region for ``hotplug_size`` bytes next to ``mem_size`` bytes of RAM: above 4 GiB (so
    never in the MMIO gap below it) and above the last RAM range, start and size aligned to 128 MiB."""
    if hotplug_size <= 0 or hotplug_size % HOTPLUG_ALIGN:
        raise ValueError(f"hot-plug size {hotplug_size:#x} is not a positive multiple of 128 MiB")
    ram_end = max(start + size for start, size in ram_ranges(mem_size))
    start = max(HIGH_RAM_START, ram_end)
    start = (start + HOTPLUG_ALIGN - 1) // HOTPLUG_ALIGN * HOTPLUG_ALIGN
    if start + hotplug_size > MAX_PHYS_ADDR:
        raise ValueError(
            f"hot-plug region {start:#x}+{hotplug_size:#x} is past the guest's physical addresses"
        )
    return GuestAddress(start), hotplug_size
