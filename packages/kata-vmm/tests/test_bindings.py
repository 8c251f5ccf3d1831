"""Struct sizes, field offsets and ioctl numbers pinned to values printed by C code compiled with the
Linux 6.1 UAPI headers (linux-libc-dev 6.1), as kvm-bindings pins its generated layout."""

from __future__ import annotations

import ctypes

import pytest

from kata_vmm._bindings import bootparam as bp
from kata_vmm._bindings import kvm as k
from kata_vmm._bindings import start_info as si


@pytest.mark.parametrize(
    ("struct", "size"),
    [
        (k.kvm_userspace_memory_region, 32),
        (k.kvm_regs, 144),
        (k.kvm_sregs, 312),
        (k.kvm_segment, 24),
        (k.kvm_dtable, 16),
        (k.kvm_run, 2352),
        (k.kvm_cpuid_entry2, 40),
        (k.kvm_cpuid2, 8),
        (k.kvm_msr_entry, 16),
        (k.kvm_msrs, 8),
        (k.kvm_msr_list, 4),
        (k.kvm_pit_config, 64),
        (k.kvm_irqfd, 32),
        (k.kvm_ioeventfd, 64),
        (k.kvm_fpu, 416),
        (k.kvm_lapic_state, 1024),
        (k.kvm_irq_level, 8),
        (k.kvm_mp_state, 4),
        (k.kvm_xsave, 4096),
        (k.kvm_xcrs, 392),
        (k.kvm_vcpu_events, 64),
        (k.kvm_debugregs, 128),
        (k.kvm_irqchip, 520),
        (k.kvm_pic_state, 16),
        (k.kvm_ioapic_state, 216),
        (k.kvm_pit_state2, 112),
        (k.kvm_pit_channel_state, 24),
        (k.kvm_clock_data, 48),
        (bp.boot_params, 4096),
        (bp.setup_header, 123),
        (bp.boot_e820_entry, 20),
        (si.hvm_start_info, 56),
        (si.hvm_modlist_entry, 32),
        (si.hvm_memmap_table_entry, 24),
    ],
)
def test_struct_size_matches_kernel_header(struct: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(struct) == size


@pytest.mark.parametrize(
    ("path", "offset"),
    [
        ("immediate_exit", 1),
        ("exit_reason", 8),
        ("flags", 14),
        ("cr8", 16),
        ("io", 32),
        ("mmio", 32),
        ("kvm_valid_regs", 288),
        ("s", 304),
    ],
)
def test_kvm_run_offsets(path: str, offset: int) -> None:
    assert getattr(k.kvm_run, path).offset == offset


@pytest.mark.parametrize(
    ("member", "field", "offset"),
    [
        ("io", "port", 34),
        ("io", "data_offset", 40),
        ("mmio", "data", 40),
        ("mmio", "is_write", 52),
        ("system_event", "type", 32),
        ("system_event", "ndata", 36),
        ("internal", "suberror", 32),
        ("fail_entry", "cpu", 40),
    ],
)
def test_kvm_run_union_member_offsets(member: str, field: str, offset: int) -> None:
    member_type = {f[0]: f[1] for f in k._kvm_run_exit._fields_}[member]
    assert k.kvm_run.u.offset + getattr(member_type, field).offset == offset


@pytest.mark.parametrize(
    ("struct", "field", "offset"),
    [
        (k.kvm_sregs, "gdt", 192),
        (k.kvm_sregs, "cr0", 224),
        (k.kvm_sregs, "efer", 264),
        (k.kvm_sregs, "apic_base", 272),
        (k.kvm_sregs, "interrupt_bitmap", 280),
        (k.kvm_regs, "rip", 128),
        (k.kvm_regs, "rflags", 136),
        (k.kvm_cpuid_entry2, "flags", 8),
        (k.kvm_cpuid_entry2, "eax", 12),
        (k.kvm_ioeventfd, "addr", 8),
        (k.kvm_ioeventfd, "fd", 20),
        (k.kvm_ioeventfd, "flags", 24),
        (k.kvm_irqfd, "gsi", 4),
        (k.kvm_irqfd, "resamplefd", 12),
        (k.kvm_fpu, "xmm", 152),
        (k.kvm_fpu, "mxcsr", 408),
        (k.kvm_vcpu_events, "sipi_vector", 16),
        (k.kvm_vcpu_events, "flags", 20),
        (k.kvm_vcpu_events, "smi", 24),
        (k.kvm_vcpu_events, "triple_fault_pending", 28),
        (k.kvm_vcpu_events, "exception_payload", 56),
        (k.kvm_clock_data, "realtime", 16),
        (k.kvm_clock_data, "host_tsc", 24),
        (k.kvm_irqchip, "chip", 8),
        (bp.boot_params, "acpi_rsdp_addr", 0x070),
        (bp.boot_params, "ext_ramdisk_image", 0x0C0),
        (bp.boot_params, "e820_entries", 0x1E8),
        (bp.boot_params, "sentinel", 0x1EF),
        (bp.boot_params, "hdr", 0x1F1),
        (bp.boot_params, "e820_table", 0x2D0),
        (bp.boot_params, "eddbuf", 0xD00),
        (si.hvm_start_info, "rsdp_paddr", 0x20),
        (si.hvm_start_info, "memmap_entries", 0x30),
    ],
)
def test_field_offset_matches_kernel_header(struct: type[ctypes.Structure], field: str, offset: int) -> None:
    assert getattr(struct, field).offset == offset


@pytest.mark.parametrize(
    ("field", "offset"),
    [
        ("setup_sects", 0x1F1),
        ("boot_flag", 0x1FE),
        ("header", 0x202),
        ("version", 0x206),
        ("type_of_loader", 0x210),
        ("loadflags", 0x211),
        ("code32_start", 0x214),
        ("ramdisk_image", 0x218),
        ("cmd_line_ptr", 0x228),
        ("initrd_addr_max", 0x22C),
        ("xloadflags", 0x236),
        ("cmdline_size", 0x238),
        ("kernel_info_offset", 0x268),
    ],
)
def test_setup_header_offsets_within_boot_params(field: str, offset: int) -> None:
    assert 0x1F1 + getattr(bp.setup_header, field).offset == offset


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KVM_GET_API_VERSION", 0xAE00),
        ("KVM_CREATE_VM", 0xAE01),
        ("KVM_GET_MSR_INDEX_LIST", 0xC004AE02),
        ("KVM_CHECK_EXTENSION", 0xAE03),
        ("KVM_GET_VCPU_MMAP_SIZE", 0xAE04),
        ("KVM_GET_SUPPORTED_CPUID", 0xC008AE05),
        ("KVM_CREATE_VCPU", 0xAE41),
        ("KVM_SET_USER_MEMORY_REGION", 0x4020AE46),
        ("KVM_SET_TSS_ADDR", 0xAE47),
        ("KVM_SET_IDENTITY_MAP_ADDR", 0x4008AE48),
        ("KVM_CREATE_IRQCHIP", 0xAE60),
        ("KVM_IRQ_LINE", 0x4008AE61),
        ("KVM_IRQFD", 0x4020AE76),
        ("KVM_CREATE_PIT2", 0x4040AE77),
        ("KVM_IOEVENTFD", 0x4040AE79),
        ("KVM_RUN", 0xAE80),
        ("KVM_GET_REGS", 0x8090AE81),
        ("KVM_SET_REGS", 0x4090AE82),
        ("KVM_GET_SREGS", 0x8138AE83),
        ("KVM_SET_SREGS", 0x4138AE84),
        ("KVM_GET_MSRS", 0xC008AE88),
        ("KVM_SET_MSRS", 0x4008AE89),
        ("KVM_GET_FPU", 0x81A0AE8C),
        ("KVM_SET_FPU", 0x41A0AE8D),
        ("KVM_GET_LAPIC", 0x8400AE8E),
        ("KVM_SET_LAPIC", 0x4400AE8F),
        ("KVM_SET_CPUID2", 0x4008AE90),
        ("KVM_GET_MP_STATE", 0x8004AE98),
        ("KVM_SET_MP_STATE", 0x4004AE99),
        ("KVM_GET_XSAVE", 0x9000AEA4),
        ("KVM_SET_XSAVE", 0x5000AEA5),
        ("KVM_GET_XCRS", 0x8188AEA6),
        ("KVM_SET_XCRS", 0x4188AEA7),
        ("KVM_GET_VCPU_EVENTS", 0x8040AE9F),
        ("KVM_SET_VCPU_EVENTS", 0x4040AEA0),
        ("KVM_GET_IRQCHIP", 0xC208AE62),
        ("KVM_SET_IRQCHIP", 0x8208AE63),
        ("KVM_GET_PIT2", 0x8070AE9F),
        ("KVM_SET_PIT2", 0x4070AEA0),
        ("KVM_GET_CLOCK", 0x8030AE7C),
        ("KVM_SET_CLOCK", 0x4030AE7B),
        ("KVM_GET_CPUID2", 0xC008AE91),
        ("KVM_GET_DEBUGREGS", 0x8080AEA1),
        ("KVM_SET_DEBUGREGS", 0x4080AEA2),
        ("KVM_GET_TSC_KHZ", 0xAEA3),
        ("KVM_SET_TSC_KHZ", 0xAEA2),
        ("KVM_KVMCLOCK_CTRL", 0xAEAD),
    ],
)
def test_ioctl_number_matches_kernel_header(name: str, value: int) -> None:
    assert getattr(k, name) == value


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KVM_EXIT_IO", 2),
        ("KVM_EXIT_HLT", 5),
        ("KVM_EXIT_MMIO", 6),
        ("KVM_EXIT_SHUTDOWN", 8),
        ("KVM_EXIT_FAIL_ENTRY", 9),
        ("KVM_EXIT_INTR", 10),
        ("KVM_EXIT_INTERNAL_ERROR", 17),
        ("KVM_EXIT_SYSTEM_EVENT", 24),
        ("KVM_CAP_IRQFD", 32),
        ("KVM_CAP_PIT2", 33),
        ("KVM_CAP_IOEVENTFD", 36),
        ("KVM_CAP_MAX_VCPUS", 66),
        ("KVM_CAP_IMMEDIATE_EXIT", 136),
        ("KVM_CAP_ADJUST_CLOCK", 39),
        ("KVM_CAP_VCPU_EVENTS", 41),
        ("KVM_CAP_PIT_STATE2", 35),
        ("KVM_CAP_DEBUGREGS", 50),
        ("KVM_CAP_XSAVE", 55),
        ("KVM_CAP_XCRS", 56),
        ("KVM_CAP_GET_TSC_KHZ", 61),
        ("KVM_CLOCK_TSC_STABLE", 2),
    ],
)
def test_constants_match_kernel_header(name: str, value: int) -> None:
    assert getattr(k, name) == value


def test_exit_reason_names_cover_the_exits_the_vmm_counts() -> None:
    assert k.EXIT_REASON_NAMES[k.KVM_EXIT_IO] == "io"
    assert k.EXIT_REASON_NAMES[k.KVM_EXIT_MMIO] == "mmio"
    assert k.EXIT_REASON_NAMES[k.KVM_EXIT_SYSTEM_EVENT] == "system_event"


def test_sized_cpuid_table_keeps_header_layout() -> None:
    table = k.kvm_cpuid2_with(3)
    assert ctypes.sizeof(table) == 8 + 3 * 40
    assert table.entries.offset == 8
