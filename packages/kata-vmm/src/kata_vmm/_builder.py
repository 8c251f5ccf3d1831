"""Configure a VM before anything runs, then build it (Firecracker's ``vmm/builder.rs``, in small).

The builder is where a VM's shape is decided: the machine (`VmConfig`) and its virtio devices, each given
its virtio-mmio slot (window, GSI) the moment it is added. Nothing is opened until `build`: adding a
device only checks that it fits and records where it goes, so a caller can tell the guest (or the agent)
where a device will be before the VM exists, and that answer is the slot the VM then uses::

    builder = VmmBuilder(VmConfig(kernel=Path("vmlinuz"), memory_mib=256))
    slot = builder.add_device(BlockSpec(Path("disk.img")))   # MmioSlot(index=0, base=0xd0000000, gsi=5)
    vmm = builder.build()      # opens KVM, RAM, every device's host resources on its slot; nothing runs
    vmm.start()                # or: vmm = builder.start()

The running side (`Vmm`: vCPU threads, event thread, exit reporting) never picks a slot for these devices.
"""

from __future__ import annotations

import dataclasses

from kata_vmm._errors import ConfigError, VmStateError
from kata_vmm._machine import MmioSlot, VmConfig
from kata_vmm._specs import BalloonSpec, DeviceSpec, FsSpec, VsockSpec, build_device
from kata_vmm._vmm import Vmm


class VmmBuilder:
    """A VM being configured: its `VmConfig` and its virtio devices on their slots, in slot order.

    ``config.devices`` are added first, in their order. ``config`` (kernel, command line, size, console)
    may be replaced until `build`; its ``devices`` field is not read again. The builder owns what the specs
    it holds own (a `NetSpec`'s open tap fd) until `build` hands them to the VM; `close` gives them back
    if the VM is never built. A builder builds one VM.
    """

    def __init__(self, config: VmConfig) -> None:
        self.config = dataclasses.replace(config, devices=[])
        self._devices: list[tuple[MmioSlot, DeviceSpec]] = []
        self._done = False
        for spec in config.devices:
            self.add_device(spec)

    @property
    def devices(self) -> list[tuple[MmioSlot, DeviceSpec]]:
        """Each device's slot and spec, in slot order (the guest's probe order)."""
        return list(self._devices)

    def add_device(self, spec: DeviceSpec) -> MmioSlot:
        """Give ``spec`` the next virtio-mmio slot and return it.

        `ConfigError` when no slot is left, or the VM cannot have both it and a device it already has
        (a second vsock: a guest has one CID; a virtio-fs tag in use: the guest mounts by tag)."""
        self._require_open()
        self._check_fits(spec, [s for _slot, s in self._devices])
        slot = MmioSlot.at(len(self._devices))
        self._devices.append((slot, spec))
        return slot

    def replace_device(self, slot: MmioSlot, spec: DeviceSpec) -> None:
        """Put ``spec`` in place of the spec at ``slot``, of the same kind (e.g. the same tap, now opened in
        the pod's network namespace); the slot does not change. The old spec is not released."""
        self._require_open()
        index = slot.index
        if not 0 <= index < len(self._devices) or self._devices[index][0] != slot:
            raise ConfigError(f"virtio-mmio slot {index} has no device of this builder")
        old = self._devices[index][1]
        if type(old) is not type(spec):
            raise ConfigError(
                f"slot {index} holds a {type(old).__name__}; it cannot become a {type(spec).__name__}"
            )
        self._check_fits(spec, [s for s_slot, s in self._devices if s_slot != slot])
        self._devices[index] = (slot, spec)

    @staticmethod
    def _check_fits(spec: DeviceSpec, others: list[DeviceSpec]) -> None:
        if isinstance(spec, VsockSpec) and any(isinstance(o, VsockSpec) for o in others):
            raise ConfigError("a VM has one vsock device (one guest CID); this one has it already")
        if isinstance(spec, BalloonSpec) and any(isinstance(o, BalloonSpec) for o in others):
            raise ConfigError("a VM has at most one balloon device")
        if isinstance(spec, FsSpec) and any(isinstance(o, FsSpec) and o.tag == spec.tag for o in others):
            raise ConfigError(f"virtio-fs tag {spec.tag!r} is already in use")

    def build(self) -> Vmm:
        """Create the VM (KVM, RAM, irqchip, legacy devices) and open every device on its slot.

        The `Vmm` returned is configured, not started. On failure everything opened so far is closed and
        the specs not yet built are released; the builder is spent either way."""
        self._require_open()
        self._done = True
        vmm = Vmm()
        pending = list(self._devices)
        try:
            vmm.configure(self.config)
            while pending:
                slot, spec = pending[0]
                device = build_device(spec)  # a failed build leaves what the spec holds with the spec
                pending.pop(0)  # the device owns it now; the VM closes it, also if attaching fails
                vmm.add_virtio_device(device, slot, spec=spec)
        except BaseException:
            vmm.close()
            for _slot, spec in pending:
                spec.release()
            raise
        return vmm

    def start(self) -> Vmm:
        """`build`, then `Vmm.start`; a VM that fails to start is closed."""
        vmm = self.build()
        try:
            vmm.start()
        except BaseException:
            vmm.close()
            raise
        return vmm

    def close(self) -> None:
        """Release what unbuilt specs hold (open fds) when the VM will not be built; idempotent."""
        if self._done:
            return
        self._done = True
        for _slot, spec in self._devices:
            spec.release()

    def _require_open(self) -> None:
        if self._done:
            raise VmStateError("this VmmBuilder has already built its VM (or was closed)")
