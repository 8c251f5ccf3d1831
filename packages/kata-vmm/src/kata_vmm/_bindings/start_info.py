"""ctypes mirror of Xen's public <xen/interface/hvm/start_info.h>: the PVH boot ABI Linux implements.

A VMM that enters an ELF vmlinux at its ``XEN_ELFNOTE_PHYS32_ENTRY`` passes the
physical address of an ``hvm_start_info`` in %ebx.
"""

from __future__ import annotations

from ctypes import LittleEndianStructure, c_uint32, c_uint64

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
XEN_ELFNOTE_PHYS32_ENTRY = 18

# hvm_memmap_table_entry.type uses the e820 numbering
XEN_HVM_MEMMAP_TYPE_RAM = 1
XEN_HVM_MEMMAP_TYPE_RESERVED = 2
XEN_HVM_MEMMAP_TYPE_ACPI = 3


class hvm_start_info(LittleEndianStructure):
    """Start-of-day information for a PVH guest (version 1, with the memory map)."""

    _fields_ = [
        ("magic", c_uint32),  # 0x00
        ("version", c_uint32),  # 0x04
        ("flags", c_uint32),  # 0x08
        ("nr_modules", c_uint32),  # 0x0c
        ("modlist_paddr", c_uint64),  # 0x10
        ("cmdline_paddr", c_uint64),  # 0x18
        ("rsdp_paddr", c_uint64),  # 0x20
        ("memmap_paddr", c_uint64),  # 0x28
        ("memmap_entries", c_uint32),  # 0x30
        ("reserved", c_uint32),  # 0x34
    ]


class hvm_modlist_entry(LittleEndianStructure):
    """One boot module (the initrd)."""

    _fields_ = [("paddr", c_uint64), ("size", c_uint64), ("cmdline_paddr", c_uint64), ("reserved", c_uint64)]


class hvm_memmap_table_entry(LittleEndianStructure):
    """One memory-map entry."""

    _fields_ = [("addr", c_uint64), ("size", c_uint64), ("type", c_uint32), ("reserved", c_uint32)]
