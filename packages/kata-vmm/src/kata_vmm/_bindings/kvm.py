"""ctypes mirror of <linux/kvm.h> and <asm/kvm.h> (x86-64), Linux 6.1 UAPI.

Only the structs and ioctls this VMM uses.  Struct and field names follow the C
header; ioctl numbers are computed from the struct sizes exactly as the kernel's
``_IO``/``_IOR``/``_IOW``/``_IOWR`` macros do, and ``tests/test_bindings.py`` pins
them against values printed by a C program compiled with the header.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    Structure,
    Union,
    c_int32,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    sizeof,
)

# <asm-generic/ioctl.h>: nr 8 bits, type 8 bits, size 14 bits, direction 2 bits.
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    assert size < (1 << 14)
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, struct: type[ctypes._CData]) -> int:
    return _IOC(_IOC_READ, type_, nr, sizeof(struct))


def _IOW(type_: int, nr: int, struct: type[ctypes._CData]) -> int:
    return _IOC(_IOC_WRITE, type_, nr, sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type[ctypes._CData]) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, sizeof(struct))


KVMIO = 0xAE
KVM_API_VERSION = 12

# --- capabilities (KVM_CHECK_EXTENSION) -------------------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_IMMEDIATE_EXIT = 136

# --- exit reasons (kvm_run.exit_reason) ---------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

EXIT_REASON_NAMES = {
    value: name.removeprefix("KVM_EXIT_").lower()
    for name, value in dict(globals()).items()
    if name.startswith("KVM_EXIT_") and isinstance(value, int)
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_PIT_SPEAKER_DUMMY = 1

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic: the kernel spells it this way


# --- structs -------------------------------------------------------------------------------------------
class kvm_userspace_memory_region(Structure):
    """One guest-physical memory slot backed by host memory (KVM_SET_USER_MEMORY_REGION)."""

    _fields_ = [
        ("slot", c_uint32),  # 0x00
        ("flags", c_uint32),  # 0x04
        ("guest_phys_addr", c_uint64),  # 0x08
        ("memory_size", c_uint64),  # 0x10
        ("userspace_addr", c_uint64),  # 0x18
    ]


class kvm_regs(Structure):
    """General-purpose registers (KVM_GET_REGS/KVM_SET_REGS)."""

    _fields_ = [
        (name, c_uint64)
        for name in (
            *("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"),
            *("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"),
            "rip",  # 0x80
            "rflags",  # 0x88
        )
    ]


class kvm_segment(Structure):
    """A segment register with its hidden descriptor cache."""

    _fields_ = [
        ("base", c_uint64),  # 0x00
        ("limit", c_uint32),  # 0x08
        ("selector", c_uint16),  # 0x0c
        ("type", c_uint8),  # 0x0e
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(Structure):
    """A descriptor-table register (GDTR/IDTR)."""

    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(Structure):
    """Special registers: segments, control registers, EFER, APIC base (KVM_GET_SREGS/KVM_SET_SREGS)."""

    _fields_ = [
        ("cs", kvm_segment),  # 0x00
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),  # 0xc0
        ("idt", kvm_dtable),
        ("cr0", c_uint64),  # 0xe0
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),  # 0x108
        ("apic_base", c_uint64),  # 0x110
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),  # 0x118
    ]


class kvm_fpu(Structure):
    """x87/SSE state (KVM_GET_FPU/KVM_SET_FPU)."""

    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),  # 0x00
        ("fcw", c_uint16),  # 0x80
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),  # 0x98
        ("mxcsr", c_uint32),  # 0x198
        ("pad2", c_uint32),
    ]


class kvm_cpuid_entry2(Structure):
    """One CPUID leaf/subleaf as KVM reports or accepts it."""

    _fields_ = [
        ("function", c_uint32),  # 0x00
        ("index", c_uint32),  # 0x04
        ("flags", c_uint32),  # 0x08
        ("eax", c_uint32),  # 0x0c
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(Structure):
    """Header of a CPUID table; ``entries`` follow it (a flexible array in C)."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


def kvm_cpuid2_with(nent: int) -> type[Structure]:
    """A ``kvm_cpuid2`` type with room for ``nent`` entries."""

    class _kvm_cpuid2_n(Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", kvm_cpuid_entry2 * nent)]

    return _kvm_cpuid2_n


class kvm_msr_entry(Structure):
    """One model-specific register index and value."""

    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(Structure):
    """Header of an MSR list; ``entries`` follow it."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


def kvm_msrs_with(nmsrs: int) -> type[Structure]:
    """A ``kvm_msrs`` type with room for ``nmsrs`` entries."""

    class _kvm_msrs_n(Structure):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", kvm_msr_entry * nmsrs)]

    return _kvm_msrs_n


class kvm_msr_list(Structure):
    """Header of the supported-MSR index list; ``indices`` follow it."""

    _fields_ = [("nmsrs", c_uint32)]


class kvm_pit_config(Structure):
    """Configuration of the in-kernel i8254 PIT (KVM_CREATE_PIT2)."""

    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_irq_level(Structure):
    """An interrupt line and its level (KVM_IRQ_LINE)."""

    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class kvm_irqfd(Structure):
    """Binds an eventfd to a GSI: a write to the fd raises the interrupt (KVM_IRQFD)."""

    _fields_ = [
        ("fd", c_uint32),  # 0x00
        ("gsi", c_uint32),  # 0x04
        ("flags", c_uint32),  # 0x08
        ("resamplefd", c_uint32),  # 0x0c
        ("pad", c_uint8 * 16),
    ]


class kvm_ioeventfd(Structure):
    """Binds an eventfd to a guest PIO/MMIO write (KVM_IOEVENTFD)."""

    _fields_ = [
        ("datamatch", c_uint64),  # 0x00
        ("addr", c_uint64),  # 0x08
        ("len", c_uint32),  # 0x10
        ("fd", c_int32),  # 0x14
        ("flags", c_uint32),  # 0x18
        ("pad", c_uint8 * 36),
    ]


class kvm_mp_state(Structure):
    """A vCPU's multiprocessing state."""

    _fields_ = [("mp_state", c_uint32)]


class kvm_lapic_state(Structure):
    """The local APIC register page (KVM_GET_LAPIC/KVM_SET_LAPIC)."""

    _fields_ = [("regs", ctypes.c_char * 1024)]


class kvm_xsave(Structure):
    """The XSAVE area of a vCPU: x87, SSE, AVX and further state (KVM_GET_XSAVE/KVM_SET_XSAVE)."""

    _fields_ = [("region", c_uint32 * 1024)]


class kvm_xcr(Structure):
    """One extended control register (XCR0 is the one KVM knows)."""

    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(Structure):
    """The extended control registers (KVM_GET_XCRS/KVM_SET_XCRS)."""

    _fields_ = [
        ("nr_xcrs", c_uint32),  # 0x00
        ("flags", c_uint32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),  # 0x08
        ("padding", c_uint64 * 16),
    ]


class _kvm_vcpu_events_exception(Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _kvm_vcpu_events_interrupt(Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _kvm_vcpu_events_nmi(Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _kvm_vcpu_events_smi(Structure):
    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class kvm_vcpu_events(Structure):
    """Pending and injected exceptions, interrupts, NMIs and SMIs (KVM_GET/SET_VCPU_EVENTS)."""

    _fields_ = [
        ("exception", _kvm_vcpu_events_exception),  # 0x00
        ("interrupt", _kvm_vcpu_events_interrupt),  # 0x08
        ("nmi", _kvm_vcpu_events_nmi),  # 0x0c
        ("sipi_vector", c_uint32),  # 0x10
        ("flags", c_uint32),  # 0x14
        ("smi", _kvm_vcpu_events_smi),  # 0x18
        ("triple_fault_pending", c_uint8),  # 0x1c: struct { __u8 pending; } triple_fault
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),  # 0x37
        ("exception_payload", c_uint64),  # 0x38
    ]


class kvm_debugregs(Structure):
    """Debug registers DR0-3, DR6, DR7 (KVM_GET/SET_DEBUGREGS)."""

    _fields_ = [
        ("db", c_uint64 * 4),  # 0x00
        ("dr6", c_uint64),  # 0x20
        ("dr7", c_uint64),  # 0x28
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


class kvm_pic_state(Structure):
    """One i8259 PIC (master or slave)."""

    _fields_ = [
        (name, c_uint8)
        for name in (
            *("last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll"),
            *("special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested_mode"),
            *("init4", "elcr", "elcr_mask"),
        )
    ]


KVM_IOAPIC_NUM_PINS = 24


class kvm_ioapic_state(Structure):
    """The IOAPIC: its registers and redirection table (each entry as its 64 raw ``bits``)."""

    _fields_ = [
        ("base_address", c_uint64),  # 0x00
        ("ioregsel", c_uint32),  # 0x08
        ("id", c_uint32),
        ("irr", c_uint32),  # 0x10
        ("pad", c_uint32),
        ("redirtbl", c_uint64 * KVM_IOAPIC_NUM_PINS),  # 0x18
    ]


KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2


class _kvm_irqchip_chip(Union):
    _fields_ = [("dummy", ctypes.c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(Structure):
    """One in-kernel interrupt controller's state, chosen by ``chip_id`` (KVM_GET/SET_IRQCHIP)."""

    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _kvm_irqchip_chip)]  # chip at 0x08


class kvm_pit_channel_state(Structure):
    """One i8254 counter."""

    _fields_ = [
        ("count", c_uint32),  # 0x00
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),  # 0x08
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", ctypes.c_int64),  # 0x10
    ]


class kvm_pit_state2(Structure):
    """The in-kernel PIT's three counters and flags (KVM_GET_PIT2/KVM_SET_PIT2)."""

    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),  # 0x00
        ("flags", c_uint32),  # 0x48
        ("reserved", c_uint32 * 9),
    ]


KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3


class kvm_clock_data(Structure):
    """The VM's kvmclock (KVM_GET_CLOCK/KVM_SET_CLOCK)."""

    _fields_ = [
        ("clock", c_uint64),  # 0x00
        ("flags", c_uint32),  # 0x08
        ("pad0", c_uint32),
        ("realtime", c_uint64),  # 0x10
        ("host_tsc", c_uint64),  # 0x18
        ("pad", c_uint32 * 4),
    ]


# kvm_run: the shared page KVM fills on every exit.  Only the union members this VMM reads.
class _kvm_run_io(Structure):
    _fields_ = [
        ("direction", c_uint8),  # 0x20
        ("size", c_uint8),  # 0x21
        ("port", c_uint16),  # 0x22
        ("count", c_uint32),  # 0x24
        ("data_offset", c_uint64),  # 0x28: from the start of kvm_run
    ]


class _kvm_run_mmio(Structure):
    _fields_ = [
        ("phys_addr", c_uint64),  # 0x20
        ("data", c_uint8 * 8),  # 0x28
        ("len", c_uint32),  # 0x30
        ("is_write", c_uint8),  # 0x34
    ]


class _kvm_run_fail_entry(Structure):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class _kvm_run_internal(Structure):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _kvm_run_system_event(Structure):
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _kvm_run_exit(Union):
    _fields_ = [
        ("io", _kvm_run_io),
        ("mmio", _kvm_run_mmio),
        ("fail_entry", _kvm_run_fail_entry),
        ("internal", _kvm_run_internal),
        ("system_event", _kvm_run_system_event),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(Structure):
    """The per-vCPU page shared with KVM (mmap of the vCPU fd)."""

    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", c_uint8),  # 0x00
        ("immediate_exit", c_uint8),  # 0x01
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),  # 0x08
        ("ready_for_interrupt_injection", c_uint8),  # 0x0c
        ("if_flag", c_uint8),
        ("flags", c_uint16),  # 0x0e
        ("cr8", c_uint64),  # 0x10
        ("apic_base", c_uint64),  # 0x18
        ("u", _kvm_run_exit),  # 0x20
        ("kvm_valid_regs", c_uint64),  # 0x120
        ("kvm_dirty_regs", c_uint64),
        ("s", ctypes.c_char * 2048),  # 0x130
    ]


# --- ioctls on /dev/kvm ---------------------------------------------------------------------------------
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)

# --- ioctls on a VM fd ----------------------------------------------------------------------------------
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)  # sic: _IOR in the kernel header
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, kvm_clock_data)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, kvm_pit_state2)

# --- ioctls on a vCPU fd --------------------------------------------------------------------------------
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, kvm_debugregs)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, kvm_xcrs)
KVM_KVMCLOCK_CTRL = _IO(KVMIO, 0xAD)
