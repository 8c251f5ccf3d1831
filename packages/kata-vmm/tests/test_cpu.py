"""CPUID adjustments, segment descriptors and MSR defaults (no KVM needed)."""

from __future__ import annotations

from kata_vmm import _cpu
from kata_vmm._bindings import kvm as k


def entry(function: int, index: int = 0, **regs: int) -> k.kvm_cpuid_entry2:
    return k.kvm_cpuid_entry2(function=function, index=index, **regs)


def test_leaf_1_reports_apic_id_cpu_count_hypervisor_and_tsc_deadline() -> None:
    table = [entry(0, eax=0xD), entry(1, ebx=0x0800_0000, ecx=0, edx=0)]
    out = _cpu.cpuid_for_vcpu(table, vcpu_id=3, num_vcpus=3)
    leaf1 = next(e for e in out if e.function == 1)
    assert leaf1.ebx >> 24 == 3
    assert (leaf1.ebx >> 16) & 0xFF == 4  # 3 rounded up to a power of two
    assert (leaf1.ebx >> 8) & 0xFF == 8
    assert leaf1.ecx & _cpu.CPUID_HYPERVISOR_BIT
    assert leaf1.ecx & _cpu.CPUID_TSC_DEADLINE_BIT
    assert leaf1.edx & (1 << 28)
    assert table[1].ebx == 0x0800_0000  # the input table is not modified


def test_tsc_deadline_bit_is_left_alone_when_kvm_lacks_it() -> None:
    out = _cpu.cpuid_for_vcpu([entry(1)], vcpu_id=0, num_vcpus=1, tsc_deadline=False)
    assert not out[0].ecx & _cpu.CPUID_TSC_DEADLINE_BIT
    assert not out[0].edx & (1 << 28)


def test_topology_leaves_carry_the_x2apic_id() -> None:
    out = _cpu.cpuid_for_vcpu([entry(0xB, 0), entry(0xB, 1), entry(4, 0, eax=0x121)], 2, 2)
    assert [e.edx for e in out if e.function == 0xB] == [2, 2]
    assert out[2].eax >> 26 == 1


def test_gdt_entries_decode_to_long_mode_code_and_flat_data() -> None:
    code = _cpu.segment_from_gdt(_cpu.GDT_64[1], 1)
    assert (code.selector, code.l, code.db, code.present, code.s, code.type) == (8, 1, 0, 1, 1, 0xB)
    assert code.limit == 0xFFFFFFFF and code.g == 1
    data = _cpu.segment_from_gdt(_cpu.GDT_64[2], 2)
    assert (data.selector, data.l, data.db, data.type) == (16, 0, 1, 3)
    code32 = _cpu.segment_from_gdt(_cpu.GDT_32[1], 1)
    assert (code32.l, code32.db) == (0, 1)


def test_boot_msrs_enable_mtrrs_with_write_back_default() -> None:
    msrs = _cpu.boot_msrs()
    assert msrs[_cpu.MSR_MTRR_DEF_TYPE] == (1 << 11) | 6
    assert msrs[_cpu.MSR_IA32_MISC_ENABLE] & 1
