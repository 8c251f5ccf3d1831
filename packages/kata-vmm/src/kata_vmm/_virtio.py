"""kata-virtio devices on virtio-mmio slots: the MMIO adapter with its ioeventfd doorbells.

Each device gets one 4 KiB window on the MMIO bus and one GSI (an irqfd); the DSDT describes both as an
``LNRO0005`` device. Guest writes of QueueNotify (offset 0x50) hit an ioeventfd per queue, so a kick
costs no userspace exit on the vCPU; the event thread reads the eventfd and runs the device. Host fds
of a device (vsock's sockets, the tap) are polled on the same thread by `DevicePoller` (``_poller.py``);
device specs are in ``_specs.py``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from kata_virtio import VIRTIO_MMIO_QUEUE_NOTIFY, GuestMemory, MmioTransport, VirtioDevice
from kata_vmm._event_loop import EventLoop
from kata_vmm._eventfd import IoEventFd, IrqFd
from kata_vmm._kvm import Vm
from kata_vmm._poller import DevicePoller

__all__ = ["DevicePoller", "VirtioMmioDevice", "run_on_loop"]  # DevicePoller: its old home, still imported


class VirtioMmioDevice:
    """A `VirtioDevice` behind `MmioTransport` at ``base``, with one ioeventfd per queue (a `BusDevice`)."""

    def __init__(self, vm: Vm, device: VirtioDevice, memory: GuestMemory, irq: IrqFd, base: int) -> None:
        self.device = device
        self.base = base
        self._loop: EventLoop | None = None
        self.transport = MmioTransport(
            device,
            memory,
            irq,
            on_queue_notify=self._forward_notify,
            run_on_owner=self._run_on_owner,
        )
        self.doorbells: list[IoEventFd] = []
        try:
            for index in range(len(device.queue_max_sizes)):
                self.doorbells.append(IoEventFd(vm, base + VIRTIO_MMIO_QUEUE_NOTIFY, 4, datamatch=index))
        except BaseException:
            self.close_doorbells()
            raise

    def read(self, offset: int, size: int) -> bytes:
        """A vCPU's read of the window."""
        return self.transport.read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        """A vCPU's write of the window (QueueNotify writes no ioeventfd matched are forwarded)."""
        self.transport.write(offset, data)

    def _forward_notify(self, index: int) -> None:
        # device logic runs on the event thread only; before it exists (no loop) serve in place
        loop = self._loop
        if loop is None:
            self.transport.notify(index)
        else:
            loop.call_soon(lambda: self._serve(index))

    def _serve(self, index: int) -> None:
        # A device that stopped at its per-notification budget is kicked again through its own doorbell,
        # so the event loop serves every other fd before it comes back to this queue.
        if self.transport.notify(index) and index < len(self.doorbells):
            self.doorbells[index].write(1)

    def _run_on_owner(self, fn: Callable[[], None]) -> None:
        # activation and reset run where the device's queues and host fds are served, never beside them
        run_on_loop(self._loop, fn)

    def attach(self, loop: EventLoop) -> None:
        """Serve this device's doorbells on ``loop`` (before the loop starts)."""
        self._loop = loop
        for index, bell in enumerate(self.doorbells):
            loop.add_reader(bell.fd, self._doorbell(bell, index))

    def _doorbell(self, bell: IoEventFd, index: int) -> Callable[[int], None]:
        def ring(_mask: int) -> None:
            if bell.read():
                self._serve(index)

        return ring

    def close_doorbells(self) -> None:
        """Unregister the ioeventfds (before the VM fd closes)."""
        for bell in self.doorbells:
            with contextlib.suppress(OSError):
                bell.close()
        self.doorbells = []

    def close(self) -> None:
        """Release the ioeventfds and the device's host resources."""
        self.close_doorbells()
        self.device.close()


def run_on_loop(loop: EventLoop | None, fn: Callable[[], None]) -> None:
    """Run ``fn`` on ``loop``'s thread and return once it ran (from any thread; exceptions stay there).

    In place when there is no running loop, or when called on the loop's own thread. If the loop stops
    before it ran ``fn`` (the VM is going away), ``fn`` runs here once the loop thread is gone: a vCPU
    waiting on a reset never waits for a dead thread.
    """
    if loop is None or threading.current_thread() is loop.thread or not loop.thread.is_alive():
        fn()
        return
    done = threading.Event()
    claim = threading.Lock()  # whoever takes it runs fn: exactly once

    def job() -> None:
        if claim.acquire(blocking=False):
            try:
                fn()
            finally:
                done.set()

    try:
        loop.call_soon(job)
    except (OSError, ValueError):  # the loop closed its wake-up fd meanwhile: it is gone
        job()
        return
    while not done.wait(0.5):
        if not loop.thread.is_alive():
            job()
            done.wait()
            return
