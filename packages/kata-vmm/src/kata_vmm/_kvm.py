"""Handles on the three kinds of KVM file descriptor: the system (/dev/kvm), a VM and a vCPU.

Each method is one ioctl with typed arguments; policy (what to put in the
registers, which CPUID bits to change) lives elsewhere.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from ctypes import sizeof

from kata_vmm._bindings import kvm as k
from kata_vmm._errors import KvmError
from kata_vmm._sys import FdHandle, _libc, ioctl

MAX_CPUID_ENTRIES = 256
MAX_MSR_ENTRIES = 256


class Kvm(FdHandle):
    """An open /dev/kvm (closing it leaves the VMs created from it valid)."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise KvmError(f"open {path}", err.errno or 0) from err
        try:
            version = ioctl(self.fd, k.KVM_GET_API_VERSION, op="KVM_GET_API_VERSION")
            if version != k.KVM_API_VERSION:
                detail = f"API version {version}, expected {k.KVM_API_VERSION}"
                raise KvmError("KVM_GET_API_VERSION", 0, detail)
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when ``cap`` is absent, else a capability-specific positive value."""
        return ioctl(self.fd, k.KVM_CHECK_EXTENSION, cap, op="KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        """Size of the shared ``kvm_run`` area of every vCPU fd."""
        return ioctl(self.fd, k.KVM_GET_VCPU_MMAP_SIZE, op="KVM_GET_VCPU_MMAP_SIZE")

    def max_vcpus(self) -> int:
        """The largest vCPU count a VM may have."""
        return self.check_extension(k.KVM_CAP_MAX_VCPUS) or self.check_extension(k.KVM_CAP_NR_VCPUS) or 4

    def supported_cpuid(self) -> list[k.kvm_cpuid_entry2]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves this host's KVM can expose."""
        buf = k.kvm_cpuid2_with(MAX_CPUID_ENTRIES)()
        buf.nent = MAX_CPUID_ENTRIES
        ioctl(self.fd, k.KVM_GET_SUPPORTED_CPUID, buf, op="KVM_GET_SUPPORTED_CPUID")
        return [k.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores."""

        class _List(ctypes.Structure):
            _fields_ = [("nmsrs", ctypes.c_uint32), ("indices", ctypes.c_uint32 * 1024)]

        buf = _List(nmsrs=1024)
        ioctl(self.fd, k.KVM_GET_MSR_INDEX_LIST, buf, op="KVM_GET_MSR_INDEX_LIST")
        return list(buf.indices[: buf.nmsrs])

    def create_vm(self) -> Vm:
        """KVM_CREATE_VM (default machine type)."""
        return Vm(self, ioctl(self.fd, k.KVM_CREATE_VM, 0, op="KVM_CREATE_VM"))


class Vm(FdHandle):
    """A KVM virtual machine fd (KVM frees the VM once its vCPU fds are closed too)."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        os.set_inheritable(fd, False)

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION: map host memory at a guest-physical address (size 0 deletes)."""
        region = k.kvm_userspace_memory_region(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        ioctl(self.fd, k.KVM_SET_USER_MEMORY_REGION, region, op="KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three guest-physical pages KVM needs on Intel hosts."""
        ioctl(self.fd, k.KVM_SET_TSS_ADDR, addr, op="KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one guest-physical page for the real-mode identity map."""
        ioctl(self.fd, k.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr), op="KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and local APICs."""
        ioctl(self.fd, k.KVM_CREATE_IRQCHIP, 0, op="KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = k.KVM_PIT_SPEAKER_DUMMY) -> None:
        """KVM_CREATE_PIT2: in-kernel i8254 timer (the dummy speaker answers port 0x61)."""
        ioctl(self.fd, k.KVM_CREATE_PIT2, k.kvm_pit_config(flags=flags), op="KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: set an interrupt line of the in-kernel irqchip."""
        ioctl(self.fd, k.KVM_IRQ_LINE, k.kvm_irq_level(irq=irq, level=level), op="KVM_IRQ_LINE")

    def irqfd(self, fd: int, gsi: int, *, deassign: bool = False) -> None:
        """KVM_IRQFD: writing to eventfd ``fd`` raises ``gsi``."""
        flags = k.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        ioctl(self.fd, k.KVM_IRQFD, k.kvm_irqfd(fd=fd, gsi=gsi, flags=flags), op="KVM_IRQFD")

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        """KVM_IOEVENTFD: a guest write of ``length`` bytes at ``addr`` signals ``fd`` without an exit."""
        flags = 0
        if datamatch is not None:
            flags |= k.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= k.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= k.KVM_IOEVENTFD_FLAG_DEASSIGN
        arg = k.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        ioctl(self.fd, k.KVM_IOEVENTFD, arg, op="KVM_IOEVENTFD")

    def get_irqchip(self, chip_id: int) -> k.kvm_irqchip:
        """KVM_GET_IRQCHIP: the state of one in-kernel interrupt controller (``KVM_IRQCHIP_*``)."""
        chip = k.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, k.KVM_GET_IRQCHIP, chip, op="KVM_GET_IRQCHIP")
        return chip

    def set_irqchip(self, chip: k.kvm_irqchip) -> None:
        """KVM_SET_IRQCHIP."""
        ioctl(self.fd, k.KVM_SET_IRQCHIP, chip, op="KVM_SET_IRQCHIP")

    def get_pit2(self) -> k.kvm_pit_state2:
        """KVM_GET_PIT2: the in-kernel PIT's counters."""
        state = k.kvm_pit_state2()
        ioctl(self.fd, k.KVM_GET_PIT2, state, op="KVM_GET_PIT2")
        return state

    def set_pit2(self, state: k.kvm_pit_state2) -> None:
        """KVM_SET_PIT2."""
        ioctl(self.fd, k.KVM_SET_PIT2, state, op="KVM_SET_PIT2")

    def get_clock(self) -> k.kvm_clock_data:
        """KVM_GET_CLOCK: the VM's kvmclock in nanoseconds."""
        clock = k.kvm_clock_data()
        ioctl(self.fd, k.KVM_GET_CLOCK, clock, op="KVM_GET_CLOCK")
        return clock

    def set_clock(self, clock: k.kvm_clock_data) -> None:
        """KVM_SET_CLOCK."""
        ioctl(self.fd, k.KVM_SET_CLOCK, clock, op="KVM_SET_CLOCK")

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU and map its ``kvm_run`` page."""
        fd = ioctl(self.fd, k.KVM_CREATE_VCPU, vcpu_id, op="KVM_CREATE_VCPU")
        os.set_inheritable(fd, False)
        try:
            return Vcpu(self, fd, vcpu_id)
        except BaseException:
            os.close(fd)
            raise


class Vcpu(FdHandle):
    """A KVM vCPU fd and its shared ``kvm_run`` page."""

    def __init__(self, vm: Vm, fd: int, vcpu_id: int) -> None:
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        self._mmap = mmap.mmap(fd, vm.kvm.vcpu_mmap_size(), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_page = k.kvm_run.from_buffer(self._mmap)
        self.run_page_view = memoryview(self._mmap)

    def run(self) -> int:
        """KVM_RUN until the next exit: ``kvm_run.exit_reason``, or KVM_EXIT_INTR if a signal interrupted."""
        ret = _ioctl_run(self.fd, k.KVM_RUN, None)
        if ret < 0:
            err = ctypes.get_errno()
            if err in (4, 11):  # EINTR (signal or immediate_exit), EAGAIN
                return k.KVM_EXIT_INTR
            raise KvmError("KVM_RUN", err)
        return int(self.run_page.exit_reason)

    def get_regs(self) -> k.kvm_regs:
        """KVM_GET_REGS."""
        regs = k.kvm_regs()
        ioctl(self.fd, k.KVM_GET_REGS, regs, op="KVM_GET_REGS")
        return regs

    def set_regs(self, regs: k.kvm_regs) -> None:
        """KVM_SET_REGS."""
        ioctl(self.fd, k.KVM_SET_REGS, regs, op="KVM_SET_REGS")

    def get_sregs(self) -> k.kvm_sregs:
        """KVM_GET_SREGS."""
        sregs = k.kvm_sregs()
        ioctl(self.fd, k.KVM_GET_SREGS, sregs, op="KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: k.kvm_sregs) -> None:
        """KVM_SET_SREGS."""
        ioctl(self.fd, k.KVM_SET_SREGS, sregs, op="KVM_SET_SREGS")

    def get_fpu(self) -> k.kvm_fpu:
        """KVM_GET_FPU."""
        fpu = k.kvm_fpu()
        ioctl(self.fd, k.KVM_GET_FPU, fpu, op="KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: k.kvm_fpu) -> None:
        """KVM_SET_FPU."""
        ioctl(self.fd, k.KVM_SET_FPU, fpu, op="KVM_SET_FPU")

    def set_cpuid2(self, entries: list[k.kvm_cpuid_entry2]) -> None:
        """KVM_SET_CPUID2: the CPUID table the guest sees."""
        buf = k.kvm_cpuid2_with(len(entries))()
        buf.nent = len(entries)
        for i, entry in enumerate(entries):
            buf.entries[i] = entry
        ioctl(self.fd, k.KVM_SET_CPUID2, buf, op="KVM_SET_CPUID2")

    def set_msrs(self, msrs: dict[int, int]) -> None:
        """KVM_SET_MSRS; raises `KvmError` unless every MSR was written."""
        buf = k.kvm_msrs_with(len(msrs))()
        buf.nmsrs = len(msrs)
        for i, (index, value) in enumerate(msrs.items()):
            buf.entries[i].index = index
            buf.entries[i].data = value
        done = ioctl(self.fd, k.KVM_SET_MSRS, buf, op="KVM_SET_MSRS")
        if done != len(msrs):
            bad = list(msrs)[done]
            raise KvmError("KVM_SET_MSRS", 22, f"MSR {bad:#x} rejected")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS for the given indices, in order, up to the first one KVM refuses."""
        buf = k.kvm_msrs_with(len(indices))()
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        done = ioctl(self.fd, k.KVM_GET_MSRS, buf, op="KVM_GET_MSRS")
        return {buf.entries[i].index: buf.entries[i].data for i in range(done)}

    def get_all_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS for every index KVM accepts: a refused one (KVM stops there) is skipped."""
        out: dict[int, int] = {}
        rest = list(indices)
        while rest:
            got = self.get_msrs(rest)
            out.update(got)
            rest = rest[len(got) + 1 :]
        return out

    def get_lapic(self) -> k.kvm_lapic_state:
        """KVM_GET_LAPIC."""
        lapic = k.kvm_lapic_state()
        ioctl(self.fd, k.KVM_GET_LAPIC, lapic, op="KVM_GET_LAPIC")
        return lapic

    def set_lapic(self, lapic: k.kvm_lapic_state) -> None:
        """KVM_SET_LAPIC."""
        ioctl(self.fd, k.KVM_SET_LAPIC, lapic, op="KVM_SET_LAPIC")

    def get_cpuid2(self) -> list[k.kvm_cpuid_entry2]:
        """KVM_GET_CPUID2: the CPUID table this vCPU was given."""
        buf = k.kvm_cpuid2_with(MAX_CPUID_ENTRIES)()
        buf.nent = MAX_CPUID_ENTRIES
        ioctl(self.fd, k.KVM_GET_CPUID2, buf, op="KVM_GET_CPUID2")
        return [k.kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]

    def get_xsave(self) -> k.kvm_xsave:
        """KVM_GET_XSAVE."""
        xsave = k.kvm_xsave()
        ioctl(self.fd, k.KVM_GET_XSAVE, xsave, op="KVM_GET_XSAVE")
        return xsave

    def set_xsave(self, xsave: k.kvm_xsave) -> None:
        """KVM_SET_XSAVE."""
        ioctl(self.fd, k.KVM_SET_XSAVE, xsave, op="KVM_SET_XSAVE")

    def get_xcrs(self) -> k.kvm_xcrs:
        """KVM_GET_XCRS."""
        xcrs = k.kvm_xcrs()
        ioctl(self.fd, k.KVM_GET_XCRS, xcrs, op="KVM_GET_XCRS")
        return xcrs

    def set_xcrs(self, xcrs: k.kvm_xcrs) -> None:
        """KVM_SET_XCRS."""
        ioctl(self.fd, k.KVM_SET_XCRS, xcrs, op="KVM_SET_XCRS")

    def get_vcpu_events(self) -> k.kvm_vcpu_events:
        """KVM_GET_VCPU_EVENTS."""
        events = k.kvm_vcpu_events()
        ioctl(self.fd, k.KVM_GET_VCPU_EVENTS, events, op="KVM_GET_VCPU_EVENTS")
        return events

    def set_vcpu_events(self, events: k.kvm_vcpu_events) -> None:
        """KVM_SET_VCPU_EVENTS."""
        ioctl(self.fd, k.KVM_SET_VCPU_EVENTS, events, op="KVM_SET_VCPU_EVENTS")

    def get_debugregs(self) -> k.kvm_debugregs:
        """KVM_GET_DEBUGREGS."""
        regs = k.kvm_debugregs()
        ioctl(self.fd, k.KVM_GET_DEBUGREGS, regs, op="KVM_GET_DEBUGREGS")
        return regs

    def set_debugregs(self, regs: k.kvm_debugregs) -> None:
        """KVM_SET_DEBUGREGS."""
        ioctl(self.fd, k.KVM_SET_DEBUGREGS, regs, op="KVM_SET_DEBUGREGS")

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC frequency."""
        return ioctl(self.fd, k.KVM_GET_TSC_KHZ, op="KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ: scale the guest TSC to ``khz`` (a restored guest keeps its frequency)."""
        ioctl(self.fd, k.KVM_SET_TSC_KHZ, khz, op="KVM_SET_TSC_KHZ")

    def kvmclock_ctrl(self) -> None:
        """KVM_KVMCLOCK_CTRL: tell the guest it was paused (no soft-lockup warning on resume)."""
        ioctl(self.fd, k.KVM_KVMCLOCK_CTRL, op="KVM_KVMCLOCK_CTRL")

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE."""
        ioctl(self.fd, k.KVM_SET_MP_STATE, k.kvm_mp_state(mp_state=mp_state), op="KVM_SET_MP_STATE")

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE."""
        state = k.kvm_mp_state()
        ioctl(self.fd, k.KVM_GET_MP_STATE, state, op="KVM_GET_MP_STATE")
        return int(state.mp_state)

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the vCPU fd."""
        if self.fd >= 0:
            self.run_page_view.release()
            del self.run_page
            self._mmap.close()
            super().close()


# KVM_RUN is the hot path: a dedicated foreign-function object with no argument conversion work (indexing
# the library gives a fresh one, not the `ioctl` helper's cached attribute).
_ioctl_run = _libc["ioctl"]
_ioctl_run.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl_run.restype = ctypes.c_int

assert sizeof(k.kvm_run) <= 4096
