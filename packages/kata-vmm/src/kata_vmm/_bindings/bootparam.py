"""ctypes mirror of <asm/bootparam.h> (x86-64), Linux 6.1 UAPI: the "zero page" of the boot protocol.

Fields this VMM never touches are kept as opaque byte arrays so every offset
matches the packed C layout (``tests/test_bindings.py`` pins them).
"""

from __future__ import annotations

from ctypes import LittleEndianStructure, c_uint8, c_uint16, c_uint32, c_uint64

# setup_header.loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7

# setup_header.xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

E820_MAX_ENTRIES_ZEROPAGE = 128
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3

HDR_MAGIC = 0x53726448  # "HdrS" at 0x202
BOOT_FLAG_MAGIC = 0xAA55  # at 0x1fe
LOADER_TYPE_UNDEFINED = 0xFF


class setup_header(LittleEndianStructure):
    """The real-mode kernel header, at offset 0x1f1 of both the bzImage and boot_params."""

    _pack_ = 1
    _fields_ = [
        ("setup_sects", c_uint8),  # 0x1f1
        ("root_flags", c_uint16),  # 0x1f2
        ("syssize", c_uint32),  # 0x1f4
        ("ram_size", c_uint16),  # 0x1f8
        ("vid_mode", c_uint16),  # 0x1fa
        ("root_dev", c_uint16),  # 0x1fc
        ("boot_flag", c_uint16),  # 0x1fe
        ("jump", c_uint16),  # 0x200
        ("header", c_uint32),  # 0x202
        ("version", c_uint16),  # 0x206
        ("realmode_swtch", c_uint32),  # 0x208
        ("start_sys_seg", c_uint16),  # 0x20c
        ("kernel_version", c_uint16),  # 0x20e
        ("type_of_loader", c_uint8),  # 0x210
        ("loadflags", c_uint8),  # 0x211
        ("setup_move_size", c_uint16),  # 0x212
        ("code32_start", c_uint32),  # 0x214
        ("ramdisk_image", c_uint32),  # 0x218
        ("ramdisk_size", c_uint32),  # 0x21c
        ("bootsect_kludge", c_uint32),  # 0x220
        ("heap_end_ptr", c_uint16),  # 0x224
        ("ext_loader_ver", c_uint8),  # 0x226
        ("ext_loader_type", c_uint8),  # 0x227
        ("cmd_line_ptr", c_uint32),  # 0x228
        ("initrd_addr_max", c_uint32),  # 0x22c
        ("kernel_alignment", c_uint32),  # 0x230
        ("relocatable_kernel", c_uint8),  # 0x234
        ("min_alignment", c_uint8),  # 0x235
        ("xloadflags", c_uint16),  # 0x236
        ("cmdline_size", c_uint32),  # 0x238
        ("hardware_subarch", c_uint32),  # 0x23c
        ("hardware_subarch_data", c_uint64),  # 0x240
        ("payload_offset", c_uint32),  # 0x248
        ("payload_length", c_uint32),  # 0x24c
        ("setup_data", c_uint64),  # 0x250
        ("pref_address", c_uint64),  # 0x258
        ("init_size", c_uint32),  # 0x260
        ("handover_offset", c_uint32),  # 0x264
        ("kernel_info_offset", c_uint32),  # 0x268
    ]


class boot_e820_entry(LittleEndianStructure):
    """One BIOS-style memory-map entry."""

    _pack_ = 1
    _fields_ = [("addr", c_uint64), ("size", c_uint64), ("type", c_uint32)]


class boot_params(LittleEndianStructure):
    """The 4 KiB zero page handed to the kernel in %rsi at the 64-bit entry point."""

    _pack_ = 1
    _fields_ = [
        ("screen_info", c_uint8 * 0x40),  # 0x000
        ("apm_bios_info", c_uint8 * 0x14),  # 0x040
        ("_pad2", c_uint8 * 4),  # 0x054
        ("tboot_addr", c_uint64),  # 0x058
        ("ist_info", c_uint8 * 0x10),  # 0x060
        ("acpi_rsdp_addr", c_uint64),  # 0x070
        ("_pad3", c_uint8 * 8),  # 0x078
        ("hd0_info", c_uint8 * 16),  # 0x080
        ("hd1_info", c_uint8 * 16),  # 0x090
        ("sys_desc_table", c_uint8 * 0x10),  # 0x0a0
        ("olpc_ofw_header", c_uint8 * 0x10),  # 0x0b0
        ("ext_ramdisk_image", c_uint32),  # 0x0c0
        ("ext_ramdisk_size", c_uint32),  # 0x0c4
        ("ext_cmd_line_ptr", c_uint32),  # 0x0c8
        ("_pad4", c_uint8 * 112),  # 0x0cc
        ("cc_blob_address", c_uint32),  # 0x13c
        ("edid_info", c_uint8 * 0x80),  # 0x140
        ("efi_info", c_uint8 * 0x20),  # 0x1c0
        ("alt_mem_k", c_uint32),  # 0x1e0
        ("scratch", c_uint32),  # 0x1e4
        ("e820_entries", c_uint8),  # 0x1e8
        ("eddbuf_entries", c_uint8),  # 0x1e9
        ("edd_mbr_sig_buf_entries", c_uint8),  # 0x1ea
        ("kbd_status", c_uint8),  # 0x1eb
        ("secure_boot", c_uint8),  # 0x1ec
        ("_pad5", c_uint8 * 2),  # 0x1ed
        ("sentinel", c_uint8),  # 0x1ef
        ("_pad6", c_uint8 * 1),  # 0x1f0
        ("hdr", setup_header),  # 0x1f1
        ("_pad7", c_uint8 * (0x290 - 0x1F1 - 0x7B)),  # 0x26c
        ("edd_mbr_sig_buffer", c_uint32 * 16),  # 0x290
        ("e820_table", boot_e820_entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad8", c_uint8 * 48),  # 0xcd0
        ("eddbuf", c_uint8 * (82 * 6)),  # 0xd00
        ("_pad9", c_uint8 * 276),  # 0xeec
    ]
