"""Hot-plug into a running VM: virtio-mmio devices and vCPUs, the host side on the `Vmm`, then upcall.

Adding (Dragonball's order)::

    slot = vmm.plug_virtio(device)                               # window, irqfd, doorbells, host fds
    await upcall.request(AddMmio(slot.base, slot.size, slot.gsi)) # the guest module registers the device

Removing runs the other way: DelMmio first (the guest's driver lets the device go), then
`Vmm.unplug_virtio`. The upcall client is the caller's (one per VM, kata-upcall's trio driver); in built-in
mode it runs over the VM's own vsock device::

    async with open_upcall_client(upcall_connector(vmm), handshake=Handshake.ACCEPT_LINE) as upcall:
        slot = await hot_add_virtio(vmm, BlockSpec(image).build(), upcall)

vCPUs (the VM needs ``VmConfig.max_vcpus``): `hot_add_vcpus` creates vCPUs (`Vmm.plug_vcpu`; their
threads wait in KVM for the guest's INIT/SIPI) or reuses ones the guest took offline, then sends AddCpu;
`hot_remove_vcpus` sends DelCpu for the highest APIC ids the guest runs (never the boot vCPU). KVM cannot
destroy a vCPU, so a removed one stays halted in KVM (no CPU time) until a later hot-add reuses it.

The host-side steps wait for the event thread, so they run in a worker thread (`trio.to_thread`). trio is
imported here only: ``import kata_vmm`` does not need it (kata-upcall's ``trio`` extra does).
"""

from __future__ import annotations

import contextlib
import errno

import trio

from kata_upcall import (
    AddCpu,
    AddMmio,
    CpuReply,
    DelCpu,
    DelMmio,
    StreamConnector,
    UpcallClient,
    UpcallError,
    UpcallRequestFailed,
    socket_connector,
)
from kata_virtio import VirtioDevice
from kata_vmm._errors import VmStateError
from kata_vmm._machine import MmioSlot
from kata_vmm._vmm import Vmm

__all__ = [
    "UNDO_BUDGET",
    "hot_add_vcpus",
    "hot_add_virtio",
    "hot_remove_vcpus",
    "hot_remove_virtio",
    "upcall_connector",
]

#: Seconds the clean-up DelMmio after an AddMmio without an answer may take.
UNDO_BUDGET = 10.0


def upcall_connector(vmm: Vmm) -> StreamConnector:
    """The stream factory for ``open_upcall_client(..., handshake=Handshake.ACCEPT_LINE)``: a fresh
    in-process connection to the guest's port 219 through ``vmm``'s vsock device per attempt."""
    return socket_connector(vmm.upcall_socket)


async def hot_add_virtio(vmm: Vmm, device: VirtioDevice, upcall: UpcallClient) -> MmioSlot:
    """Plug ``device`` into the lowest free slot of the running ``vmm`` and have the guest register it
    (AddMmio); returns the slot. The VMM owns ``device`` from the call on.

    If the guest refuses (`UpcallRequestFailed`), the slot is unplugged again and the error raised. If
    the answer never came (connection lost, timeout, cancellation) the guest may have registered the
    device: a DelMmio is tried once before the unplug, so no guest driver is left on a window that reads
    all-ones; the original error is raised.
    """
    slot = await trio.to_thread.run_sync(vmm.plug_virtio, device)
    try:
        await upcall.request(AddMmio(slot.base, slot.size, slot.gsi))
    except BaseException as err:
        with trio.CancelScope(shield=True):
            if not isinstance(err, UpcallRequestFailed):
                with contextlib.suppress(UpcallError), trio.move_on_after(UNDO_BUDGET):
                    await upcall.request(DelMmio(slot.base, slot.size, slot.gsi))
            await trio.to_thread.run_sync(vmm.unplug_virtio, slot)
        raise
    return slot


async def hot_remove_virtio(vmm: Vmm, slot: MmioSlot, upcall: UpcallClient) -> None:
    """Have the guest unregister the device on ``slot`` (DelMmio), then take it out of ``vmm`` and close
    it. A guest that answers ``-ENODEV`` no longer has it: the host side goes too. Any other failure
    leaves the device plugged (the guest may still drive it) and raises."""
    try:
        await upcall.request(DelMmio(slot.base, slot.size, slot.gsi))
    except UpcallRequestFailed as err:
        if err.reply.result != -errno.ENODEV:
            raise
    await trio.to_thread.run_sync(vmm.unplug_virtio, slot)


def _done_before_failure(err: UpcallRequestFailed) -> int:
    """How many of a CPU request's APIC ids the guest did before it failed (its reply's index)."""
    reply = err.reply
    return reply.apic_id_index or 0 if isinstance(reply, CpuReply) else 0


async def hot_add_vcpus(vmm: Vmm, count: int, upcall: UpcallClient) -> tuple[int, ...]:
    """Bring ``count`` more vCPUs online in the guest; returns their APIC ids. vCPUs the guest took offline
    earlier are reused first, the rest are created (`ConfigError` past ``max_vcpus``, before anything is
    sent). On `UpcallRequestFailed` the ids the guest did (the reply's index) count as online and the
    error is raised; the others stay created, offline, for the next call."""
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    offline = sorted(set(range(len(vmm.machine.vcpus))) - vmm.guest_vcpus)[:count]
    ids = list(offline)
    while len(ids) < count:
        ids.append(await trio.to_thread.run_sync(vmm.plug_vcpu))
    try:
        await upcall.request(AddCpu(tuple(ids)))
    except UpcallRequestFailed as err:
        vmm.guest_vcpus.update(ids[: _done_before_failure(err)])
        raise
    vmm.guest_vcpus.update(ids)
    return tuple(ids)


async def hot_remove_vcpus(vmm: Vmm, count: int, upcall: UpcallClient) -> tuple[int, ...]:
    """Take the ``count`` highest-numbered vCPUs the guest runs offline (DelCpu; never APIC id 0); returns
    their APIC ids. `VmStateError` if the guest runs too few. On `UpcallRequestFailed` the ids the guest
    did count as offline and the error is raised."""
    ids = sorted(vmm.guest_vcpus - {0}, reverse=True)[:count]
    if count < 1 or len(ids) < count:
        raise VmStateError(f"cannot take {count} vCPUs offline: the guest runs {len(vmm.guest_vcpus)}")
    try:
        await upcall.request(DelCpu(tuple(ids)))
    except UpcallRequestFailed as err:
        vmm.guest_vcpus.difference_update(ids[: _done_before_failure(err)])
        raise
    vmm.guest_vcpus.difference_update(ids)
    return tuple(ids)
