"""Hot-plug of virtio-mmio devices into a running VM (on /dev/kvm, a guest that spins): the host side on a
free slot, then upcall AddMmio to a scripted toy guest; DelMmio and the unplug on removal."""

from __future__ import annotations

import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from kata_upcall import (
    AddCpu,
    AddMmio,
    DelCpu,
    DelMmio,
    Handshake,
    UpcallClient,
    UpcallConnectionLost,
    UpcallRequestFailed,
    open_upcall_client,
)
from kata_upcall.testing import Answer, FakeGuest
from kata_vmm import (
    VIRTIO_MMIO_SLOTS,
    BlockSpec,
    ConfigError,
    RngSpec,
    VmConfig,
    Vmm,
    VmStateError,
    VsockSpec,
    hot_add_vcpus,
    hot_add_virtio,
    hot_remove_vcpus,
    hot_remove_virtio,
)
from kata_vmm import testing as tk
from kata_vmm._layout import VIRTIO_MMIO_START

KernelFactory = Callable[[bytes], Path]
needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
pytestmark = [pytest.mark.kvm, needs_kvm, pytest.mark.usefixtures("no_leaks")]

VIRTIO_MAGIC = 0x74726976
ENODEV = 19


def scripted_guest(answer: Answer) -> FakeGuest:
    """The guest module's side of a device-manager connection (no handshake: kata-vmm's in-process vsock
    connector does it), answering as ``answer`` says; records every request."""
    return FakeGuest(handshake=Handshake.NONE, answer=answer)


def run_with_guest(guest: FakeGuest, body: Callable[[UpcallClient], Awaitable[None]]) -> None:
    """Run ``await body(upcall)`` with an upcall client whose every connection reaches ``guest``."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            guest.nursery = nursery
            with trio.fail_after(120):
                async with open_upcall_client(
                    guest.connect, handshake=Handshake.NONE, request_timeout=60
                ) as upcall:
                    await body(upcall)
            nursery.cancel_scope.cancel()

    trio.run(main)


def running_vmm(make_kernel: KernelFactory, tmp_path: Path) -> Vmm:
    image = tmp_path / "boot.img"
    image.write_bytes(bytes(4096))
    vmm = Vmm()
    vmm.configure(
        VmConfig(
            kernel=make_kernel(tk.spin_forever()), memory_mib=128, devices=[BlockSpec(image, read_only=True)]
        )
    )
    vmm.start()
    return vmm


def reg(vmm: Vmm, addr: int) -> int:
    return int(struct.unpack("<I", vmm.mmio_bus.read(addr, 4))[0])


def test_hot_add_plugs_a_free_slot_and_tells_the_guest_and_remove_undoes_it(
    make_kernel: KernelFactory, tmp_path: Path
) -> None:
    disk = tmp_path / "hot.img"
    disk.write_bytes(bytes(range(256)) * 32)
    guest = scripted_guest(lambda request: 0)
    vmm = running_vmm(make_kernel, tmp_path)
    try:
        threads = len(vmm.threads())
        loop = vmm.event_loop
        assert loop is not None

        async def body(upcall: UpcallClient) -> None:
            slot = await hot_add_virtio(vmm, BlockSpec(disk).build(), upcall)
            assert slot.index == 1 and slot.base == VIRTIO_MMIO_START + 0x1000
            assert guest.requests == [AddMmio(slot.base, slot.size, slot.gsi)]
            assert reg(vmm, slot.base) == VIRTIO_MAGIC and reg(vmm, slot.base + 8) == 2  # a block device
            assert len(vmm.threads()) == threads  # served by the event thread like the others
            bells = [bell.fd for bell in vmm.machine.virtio[-1].doorbells]
            assert bells and all(fd in loop._callbacks for fd in bells)
            await hot_remove_virtio(vmm, slot, upcall)
            assert guest.requests[-1] == DelMmio(slot.base, slot.size, slot.gsi)
            assert reg(vmm, slot.base) == 0xFFFF_FFFF  # nothing there any more
            assert not any(fd in loop._callbacks for fd in bells)
            # a device with host fds: the poller watches its listener, and lets it go on removal
            hv = tmp_path / "hot.sock"
            vsock = await hot_add_virtio(vmm, VsockSpec(hv).build(), upcall)
            listener = vmm.machine.virtio[-1].device.muxer._listener.fileno()  # type: ignore[attr-defined]
            assert listener in loop._callbacks
            await hot_remove_virtio(vmm, vsock, upcall)
            assert listener not in loop._callbacks and not hv.exists()
            again = await hot_add_virtio(vmm, RngSpec().build(), upcall)
            assert again == slot  # the slot is free again
            assert reg(vmm, again.base + 8) == 4

        run_with_guest(guest, body)
        assert vmm.event_loop is not None and vmm.event_loop.errors == []
    finally:
        vmm.close()


def test_hot_add_the_guest_refuses_leaves_the_slot_free(make_kernel: KernelFactory, tmp_path: Path) -> None:
    guest = scripted_guest(lambda request: -ENODEV if isinstance(request, AddMmio) else 0)
    vmm = running_vmm(make_kernel, tmp_path)
    try:
        irqfds = len(vmm.machine.irqfds)
        base = VIRTIO_MMIO_START + 0x1000

        async def body(upcall: UpcallClient) -> None:
            with pytest.raises(UpcallRequestFailed) as failed:
                await hot_add_virtio(vmm, RngSpec().build(), upcall)
            assert failed.value.reply.result == -ENODEV
            assert [type(r) for r in guest.requests] == [AddMmio]  # refused: nothing to take back

        run_with_guest(guest, body)
        assert reg(vmm, base) == 0xFFFF_FFFF
        assert len(vmm.machine.irqfds) == irqfds and [s.index for s in vmm.machine.mmio_slots] == [0]
    finally:
        vmm.close()


def test_hot_add_without_an_answer_asks_the_guest_to_drop_it_and_frees_the_slot(
    make_kernel: KernelFactory, tmp_path: Path
) -> None:
    # the connection dies after AddMmio went out: the guest may have registered the device
    guest = scripted_guest(lambda request: "drop" if isinstance(request, AddMmio) else -ENODEV)
    vmm = running_vmm(make_kernel, tmp_path)
    try:

        async def body(upcall: UpcallClient) -> None:
            with pytest.raises(UpcallConnectionLost):
                await hot_add_virtio(vmm, RngSpec().build(), upcall)
            assert [type(r) for r in guest.requests] == [AddMmio, DelMmio]
            added = guest.requests[0]
            assert isinstance(added, AddMmio) and added.mmio_base == VIRTIO_MMIO_START + 0x1000
            assert guest.requests[1] == DelMmio(added.mmio_base, added.mmio_size, added.mmio_irq)

        run_with_guest(guest, body)
        assert [s.index for s in vmm.machine.mmio_slots] == [0]
    finally:
        vmm.close()


def test_plug_needs_a_running_vm_and_closes_the_device(make_kernel: KernelFactory, tmp_path: Path) -> None:
    vmm = Vmm()
    try:
        vmm.configure(VmConfig(kernel=make_kernel(tk.spin_forever()), memory_mib=128))
        device = RngSpec().build()
        with pytest.raises(VmStateError, match="running VM"):
            vmm.plug_virtio(device)
        with pytest.raises(VmStateError, match="no vsock device"):
            vmm.upcall_socket()
    finally:
        vmm.close()


def test_plug_into_a_vm_without_virtio_devices_and_unplug_an_unknown_slot(
    make_kernel: KernelFactory, tmp_path: Path
) -> None:
    vmm = Vmm()
    try:
        vmm.configure(VmConfig(kernel=make_kernel(tk.spin_forever()), memory_mib=128))
        vmm.start()
        slot = vmm.plug_virtio(RngSpec().build())  # the first virtio device: the poller starts with it
        assert slot.index == 0 and reg(vmm, slot.base) == VIRTIO_MAGIC
        vmm.unplug_virtio(slot)
        with pytest.raises(ConfigError, match="no virtio device on slot 0"):
            vmm.unplug_virtio(slot)
        assert vmm.event_loop is not None and vmm.event_loop.errors == []
    finally:
        vmm.close()


def test_plug_with_every_slot_taken_refuses_and_closes_the_device(make_kernel: KernelFactory) -> None:
    vmm = Vmm()
    try:
        vmm.configure(VmConfig(kernel=make_kernel(tk.spin_forever()), memory_mib=128))
        vmm.start()
        slots = [vmm.plug_virtio(RngSpec().build()) for _ in range(VIRTIO_MMIO_SLOTS)]
        assert [s.index for s in slots] == list(range(VIRTIO_MMIO_SLOTS))
        closed: list[bool] = []
        device = RngSpec().build()
        real_close = device.close

        def close() -> None:
            closed.append(True)
            real_close()

        device.close = close  # type: ignore[method-assign]
        with pytest.raises(ConfigError, match="slots are taken"):
            vmm.plug_virtio(device)
        assert closed == [True]
        vmm.unplug_virtio(slots[7])
        assert vmm.plug_virtio(RngSpec().build()).index == 7  # the lowest free one
    finally:
        vmm.close()


def test_plug_vcpu_starts_a_vcpu_thread_up_to_max_vcpus(make_kernel: KernelFactory) -> None:
    vmm = Vmm()
    try:
        vmm.configure(VmConfig(kernel=make_kernel(tk.spin_forever()), memory_mib=128, max_vcpus=3))
        vmm.start()
        assert vmm.guest_vcpus == {0}
        assert [vmm.plug_vcpu(), vmm.plug_vcpu()] == [1, 2]
        names = {t.name for t in vmm.threads()}
        assert {"kata-vcpu-1", "kata-vcpu-2"} <= names  # waiting in KVM for the guest's INIT/SIPI
        with pytest.raises(ConfigError, match="all 3 possible vCPUs exist"):
            vmm.plug_vcpu()
    finally:
        vmm.close()  # stops the new vCPU threads too (no_leaks)


def test_max_vcpus_below_vcpus_is_refused(make_kernel: KernelFactory) -> None:
    config = VmConfig(kernel=make_kernel(tk.spin_forever()), vcpus=2, max_vcpus=1)
    with pytest.raises(ConfigError, match="max_vcpus must be between vcpus"):
        config.validate(64)


def test_hot_add_vcpus_creates_then_reuses_and_remove_takes_the_highest(make_kernel: KernelFactory) -> None:
    guest = scripted_guest(lambda request: 0)
    vmm = Vmm()
    try:
        vmm.configure(VmConfig(kernel=make_kernel(tk.spin_forever()), memory_mib=128, max_vcpus=3))
        vmm.start()

        async def body(upcall: UpcallClient) -> None:
            assert await hot_add_vcpus(vmm, 2, upcall) == (1, 2)
            assert vmm.guest_vcpus == {0, 1, 2}
            assert await hot_remove_vcpus(vmm, 1, upcall) == (2,)
            assert vmm.guest_vcpus == {0, 1}
            assert await hot_add_vcpus(vmm, 1, upcall) == (2,)  # the parked vCPU 2 again
            assert len(vmm.machine.vcpus) == 3
            with pytest.raises(VmStateError, match="cannot take 3 vCPUs offline"):
                await hot_remove_vcpus(vmm, 3, upcall)  # the boot vCPU stays

        run_with_guest(guest, body)
        assert guest.requests == [AddCpu((1, 2)), DelCpu((2,)), AddCpu((2,))]
    finally:
        vmm.close()


def test_hot_add_vcpus_the_guest_refuses_stay_offline_for_the_next_try(make_kernel: KernelFactory) -> None:
    answers = iter([-5, 0])  # -EIO, then success
    guest = scripted_guest(lambda request: next(answers))
    vmm = Vmm()
    try:
        vmm.configure(VmConfig(kernel=make_kernel(tk.spin_forever()), memory_mib=128, max_vcpus=2))
        vmm.start()

        async def body(upcall: UpcallClient) -> None:
            with pytest.raises(UpcallRequestFailed):
                await hot_add_vcpus(vmm, 1, upcall)
            assert vmm.guest_vcpus == {0} and len(vmm.machine.vcpus) == 2
            assert await hot_add_vcpus(vmm, 1, upcall) == (1,)  # reused, not created again

        run_with_guest(guest, body)
        assert guest.requests == [AddCpu((1,)), AddCpu((1,))]
    finally:
        vmm.close()
