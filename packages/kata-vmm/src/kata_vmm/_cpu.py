"""Per-vCPU architectural setup: CPUID, MSRs, local APIC, and the registers of each boot protocol.

Linux's 64-bit boot protocol wants long mode with identity-mapped page tables
and %rsi pointing at boot_params; PVH wants flat 32-bit protected mode, no
paging, and %ebx pointing at hvm_start_info.  Only the boot vCPU gets entry
registers: with the in-kernel irqchip the others wait for INIT/SIPI.
"""

from __future__ import annotations

import struct

from kata_vmm._bindings import kvm as k
from kata_vmm._kvm import Vcpu
from kata_vmm._layout import (
    BOOT_GDT_START,
    BOOT_IDT_START,
    BOOT_STACK_POINTER,
    PDE_START,
    PDPTE_START,
    PML4_START,
)
from kata_vmm._memory import GuestMemoryMmap

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7

CPUID_HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX
CPUID_TSC_DEADLINE_BIT = 1 << 24  # leaf 1 ECX
CPUID_PDCM_BIT = 1 << 15  # leaf 1 ECX


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A segment descriptor packed the way the CPU reads it (Intel SDM vol. 3 §3.4.5)."""
    return (
        ((base & 0xFF000000) << (56 - 24))
        | ((flags & 0x0000F0FF) << 40)
        | ((limit & 0x000F0000) << (48 - 16))
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


def segment_from_gdt(entry: int, index: int) -> k.kvm_segment:
    """The hidden-cache form of descriptor ``entry`` at GDT slot ``index``."""
    seg = k.kvm_segment()
    seg.base = ((entry >> 16) & 0xFFFFFF) | (((entry >> 56) & 0xFF) << 24)
    limit = (entry & 0xFFFF) | (((entry >> 48) & 0xF) << 16)
    seg.g = (entry >> 55) & 1
    seg.limit = (limit << 12) | 0xFFF if seg.g else limit
    seg.selector = index * 8
    seg.type = (entry >> 40) & 0xF
    seg.s = (entry >> 44) & 1
    seg.dpl = (entry >> 45) & 3
    seg.present = (entry >> 47) & 1
    seg.avl = (entry >> 52) & 1
    seg.l = (entry >> 53) & 1
    seg.db = (entry >> 54) & 1
    seg.unusable = 0 if seg.present else 1
    return seg


# code (execute/read, accessed), data (read/write, accessed), TSS (busy);
# flags 0xa0xx select a long-mode code segment, 0xc0xx a 32-bit one
GDT_64 = [0, gdt_entry(0xA09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF), gdt_entry(0x808B, 0, 0xFFFFF)]
GDT_32 = [0, gdt_entry(0xC09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF), gdt_entry(0x008B, 0, 0x67)]


def _write_gdt(mem: GuestMemoryMmap, gdt: list[int], sregs: k.kvm_sregs) -> None:
    mem.write(BOOT_GDT_START, b"".join(struct.pack("<Q", e) for e in gdt))
    mem.write_u64(BOOT_IDT_START, 0)
    sregs.gdt.base = BOOT_GDT_START
    sregs.gdt.limit = len(gdt) * 8 - 1
    sregs.idt.base = BOOT_IDT_START
    sregs.idt.limit = 7
    code, data, tss = (segment_from_gdt(gdt[i], i) for i in (1, 2, 3))
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.tr = tss


def _write_identity_page_tables(mem: GuestMemoryMmap) -> None:
    # PML4[0] -> PDPT; PDPT[0..3] -> four PDs of 512 x 2 MiB pages: the first 4 GiB identity-mapped,
    # so early code reaches the MMIO window too (present | writable, and PS for the 2 MiB pages)
    mem.write_u64(PML4_START, PDPTE_START | 0x03)
    mem.write(PDPTE_START, b"".join(struct.pack("<Q", (PDE_START + i * 0x1000) | 0x03) for i in range(4)))
    mem.write(PDE_START, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(4 * 512)))


def setup_long_mode(vcpu: Vcpu, mem: GuestMemoryMmap, entry: int, boot_params_addr: int) -> None:
    """Enter the kernel's 64-bit entry point with paging on and %rsi = boot_params."""
    sregs = vcpu.get_sregs()
    _write_gdt(mem, GDT_64, sregs)
    _write_identity_page_tables(mem)
    sregs.cr3 = PML4_START
    sregs.cr4 |= X86_CR4_PAE
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    regs = k.kvm_regs()
    regs.rflags = 0x2
    regs.rip = entry
    regs.rsp = regs.rbp = BOOT_STACK_POINTER
    regs.rsi = boot_params_addr
    vcpu.set_regs(regs)


def setup_protected_mode(vcpu: Vcpu, mem: GuestMemoryMmap, entry: int, start_info_addr: int) -> None:
    """Enter a PVH entry point: flat 32-bit protected mode, paging off, %ebx = hvm_start_info."""
    sregs = vcpu.get_sregs()
    _write_gdt(mem, GDT_32, sregs)
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET  # caches on (CD/NW clear), paging off
    sregs.cr4 = 0
    sregs.efer = 0
    vcpu.set_sregs(sregs)
    regs = k.kvm_regs()
    regs.rflags = 0x2
    regs.rip = entry
    regs.rbx = start_info_addr
    vcpu.set_regs(regs)


def setup_fpu(vcpu: Vcpu) -> None:
    """Power-on x87 control word and MXCSR."""
    fpu = k.kvm_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)


def boot_msrs() -> dict[int, int]:
    """MSR values at boot: syscall MSRs cleared, fast strings on, MTRRs enabled with write-back default."""
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_CSTAR: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_LSTAR: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRBACK,
    }


def setup_lapic(vcpu: Vcpu) -> None:
    """Wire LINT0 to the PIC (ExtINT) and LINT1 to NMI, as a BIOS would (Intel MP spec §5.1)."""
    lapic = vcpu.get_lapic()
    raw = bytearray(bytes(lapic))  # the whole register page: .regs would stop at the first NUL
    for offset, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = struct.unpack_from("<I", raw, offset)[0]
        struct.pack_into("<I", raw, offset, (value & ~0x700) | (mode << 8))
    vcpu.set_lapic(k.kvm_lapic_state.from_buffer_copy(raw))


def cpuid_for_vcpu(
    supported: list[k.kvm_cpuid_entry2], vcpu_id: int, num_vcpus: int, *, tsc_deadline: bool = True
) -> list[k.kvm_cpuid_entry2]:
    """The host-supported CPUID table adjusted for one vCPU: APIC ids, logical CPU count, hypervisor bit.

    ``tsc_deadline`` advertises the TSC-deadline LAPIC timer KVM emulates: a hardware-reduced ACPI guest
    has no PIT to calibrate the LAPIC timer against.
    """
    out = []
    for src in supported:
        e = k.kvm_cpuid_entry2.from_buffer_copy(src)
        if e.function == 1:
            # EBX[31:24] initial APIC id, EBX[23:16] addressable logical processors per package
            # (rounded up to a power of two), EBX[15:8] CLFLUSH line size in 8-byte units
            per_package = 1 << (max(num_vcpus, 1) - 1).bit_length()
            e.ebx = (vcpu_id << 24) | (per_package << 16) | (8 << 8) | (e.ebx & 0xFF)
            e.ecx &= ~CPUID_PDCM_BIT  # no IA32_PERF_CAPABILITIES MSR to back it
            e.ecx |= CPUID_HYPERVISOR_BIT
            if tsc_deadline:
                e.ecx |= CPUID_TSC_DEADLINE_BIT
            if num_vcpus > 1:
                e.edx |= 1 << 28  # HTT: the logical-count field is valid
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu_id  # x2APIC id, reported on every topology subleaf
        elif e.function == 4 and e.eax & 0x1F:
            # EAX[31:26]: cores per package - 1; the cache description stays the host's
            e.eax = (e.eax & 0x03FFFFFF) | ((max(num_vcpus, 1) - 1) << 26)
        out.append(e)
    return out
