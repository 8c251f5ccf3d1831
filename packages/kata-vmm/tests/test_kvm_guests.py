"""Tiny real-mode guests on the host's /dev/kvm driving the raw handles: PIO, MMIO, HLT, ioeventfd, irqfd."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kata_vmm import EventFd, GuestMemoryMmap, IoEventFd, IrqFd, Kvm, KvmError, Vcpu, Vm
from kata_vmm._bindings import kvm as k
from kata_vmm._memory import GuestAddress

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"),
]

RAM_SIZE = 0x4000  # 16 KiB: anything above is MMIO
CODE = 0x1000


@dataclass
class Guest:
    kvm: Kvm
    vm: Vm
    mem: GuestMemoryMmap
    vcpu: Vcpu


@pytest.fixture
def guest() -> Iterator[Guest]:
    kvm = Kvm()
    vm = kvm.create_vm()
    mem = GuestMemoryMmap([(GuestAddress(0), RAM_SIZE)])
    vm.set_user_memory_region(0, 0, RAM_SIZE, mem.host_address(0))
    vcpu = vm.create_vcpu(0)
    g = Guest(kvm, vm, mem, vcpu)
    yield g
    vcpu.close()
    vm.close()
    mem.close()
    kvm.close()


def boot_real_mode(g: Guest, code: bytes) -> None:
    g.mem.write(CODE, code)
    sregs = g.vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
        seg.base = 0
        seg.selector = 0
    g.vcpu.set_sregs(sregs)
    regs = k.kvm_regs()
    regs.rip = CODE
    regs.rflags = 2
    regs.rsp = 0x3000
    g.vcpu.set_regs(regs)


def test_pio_out_then_in_then_hlt(guest: Guest) -> None:
    # mov al,0x42; out 0x10,al; in al,0x11; mov [0x2000],al; hlt
    boot_real_mode(guest, bytes.fromhex("b042e610e411a20020f4"))
    run, view = guest.vcpu.run_page, guest.vcpu.run_page_view
    assert guest.vcpu.run() == k.KVM_EXIT_IO
    assert (run.io.direction, run.io.port, run.io.size) == (k.KVM_EXIT_IO_OUT, 0x10, 1)
    assert view[run.io.data_offset] == 0x42
    assert guest.vcpu.run() == k.KVM_EXIT_IO
    assert (run.io.direction, run.io.port) == (k.KVM_EXIT_IO_IN, 0x11)
    view[run.io.data_offset] = 0x77
    assert guest.vcpu.run() == k.KVM_EXIT_HLT
    assert guest.mem.read(0x2000, 1) == b"\x77"


def test_mmio_read_and_write_outside_ram(guest: Guest) -> None:
    # mov al,[0x5000]; mov [0x6000],al; hlt
    boot_real_mode(guest, bytes.fromhex("a00050a20060f4"))
    run = guest.vcpu.run_page
    assert guest.vcpu.run() == k.KVM_EXIT_MMIO
    assert (run.mmio.phys_addr, run.mmio.len, run.mmio.is_write) == (0x5000, 1, 0)
    run.mmio.data[0] = 0x99
    assert guest.vcpu.run() == k.KVM_EXIT_MMIO
    assert (run.mmio.phys_addr, run.mmio.is_write, run.mmio.data[0]) == (0x6000, 1, 0x99)
    assert guest.vcpu.run() == k.KVM_EXIT_HLT


def test_ioeventfd_turns_a_pio_write_into_an_fd_signal_without_exit(guest: Guest) -> None:
    # mov al,1; out 0x20,al (ioeventfd, no exit); mov al,2; out 0x21,al (normal exit); hlt
    boot_real_mode(guest, bytes.fromhex("b001e620b002e621f4"))
    with IoEventFd(guest.vm, 0x20, 1, pio=True) as doorbell:
        assert doorbell.read() == 0
        assert guest.vcpu.run() == k.KVM_EXIT_IO
        assert guest.vcpu.run_page.io.port == 0x21
        assert doorbell.read() == 1


def test_ioeventfd_datamatch_only_fires_for_its_value(guest: Guest) -> None:
    # mov al,7; out 0x20,al; mov al,9; out 0x20,al; hlt
    boot_real_mode(guest, bytes.fromhex("b007e620b009e620f4"))
    with IoEventFd(guest.vm, 0x20, 1, pio=True, datamatch=9) as doorbell:
        assert guest.vcpu.run() == k.KVM_EXIT_IO  # 7 does not match: a normal exit
        assert guest.vcpu.run_page_view[guest.vcpu.run_page.io.data_offset] == 7
        assert guest.vcpu.run() == k.KVM_EXIT_HLT
        assert doorbell.read() == 1


def test_mmio_ioeventfd_signals_on_guest_write(guest: Guest) -> None:
    # mov al,5; mov [0x8000],al; hlt
    boot_real_mode(guest, bytes.fromhex("b005a20080f4"))
    with IoEventFd(guest.vm, 0x8000, 1) as doorbell:
        assert guest.vcpu.run() == k.KVM_EXIT_HLT
        assert doorbell.read() == 1


def test_irqfd_trigger_is_consumed_by_the_in_kernel_irqchip() -> None:
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        vm.create_irqchip()
        irq = IrqFd(vm, 4)
        irq.trigger()
        # KVM reads the eventfd when it injects the interrupt: nothing is left for us
        assert irq.read() == 0
        irq.close()
        plain = EventFd()
        plain.write(1)
        assert plain.read() == 1
        plain.close()
    finally:
        vm.close()
        kvm.close()


def test_irqfd_without_irqchip_raises_typed_error() -> None:
    kvm = Kvm()
    vm = kvm.create_vm()
    try:
        with pytest.raises(KvmError) as info:
            IrqFd(vm, 4)
        assert info.value.op == "KVM_IRQFD"
        assert info.value.errno != 0
    finally:
        vm.close()
        kvm.close()


def test_kvm_reports_capabilities_and_cpuid() -> None:
    with Kvm() as kvm:
        assert kvm.check_extension(k.KVM_CAP_IMMEDIATE_EXIT) == 1
        assert kvm.vcpu_mmap_size() >= 4096
        assert kvm.max_vcpus() >= 2
        leaves = {e.function for e in kvm.supported_cpuid()}
        assert {0, 1} <= leaves
        assert 0x10 in kvm.msr_index_list()  # IA32_TSC
