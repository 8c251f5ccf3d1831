"""What a VM is made of, built before anything runs (Firecracker's ``vstate`` + ``device_manager``).

`VmConfig` says what to boot; `Machine` holds the parts created for it: the KVM and VM fds, guest RAM,
the in-kernel irqchip and PIT, the PIO/MMIO buses with the legacy devices (serial, i8042, ACPI power),
the event loop, the virtio devices on their `MmioSlot`s and, once the boot is prepared, the vCPU fds
with their registers set. It creates and releases them and nothing else: threads, exits and
statistics belong to the running `Vmm`, and `VmmBuilder` decides which devices go where.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kata_virtio import GuestMemory, InterruptTrigger, VirtioDevice
from kata_vmm import _cpu
from kata_vmm._acpi import MmioDeviceDescription, build_tables
from kata_vmm._bindings import kvm as k
from kata_vmm._bus import Bus, BusDevice
from kata_vmm._errors import ConfigError, KvmError
from kata_vmm._event_loop import EventLoop
from kata_vmm._eventfd import IrqFd
from kata_vmm._kvm import Kvm, Vcpu, Vm
from kata_vmm._layout import (
    ACPI_MAX_SIZE,
    ACPI_SLEEP_CONTROL_PORT,
    ACPI_START,
    HOTPLUG_ALIGN,
    I8042_DATA_PORT,
    KVM_IDENTITY_MAP_START,
    KVM_TSS_START,
    SERIAL_IRQ,
    SERIAL_PORT_BASE,
    SERIAL_PORT_SIZE,
    VIRTIO_MMIO_SLOT_SIZE,
    VIRTIO_MMIO_SLOTS,
    MiB,
    hotplug_range,
    ram_ranges,
    virtio_mmio_slot,
)
from kata_vmm._loader import BootPlan, BootProtocol, load_kernel
from kata_vmm._memory import GuestAddress, GuestMemoryMmap
from kata_vmm._poller import DevicePoller
from kata_vmm._specs import DeviceSpec
from kata_vmm._virtio import VirtioMmioDevice, run_on_loop
from kata_vmm.devices import AcpiPowerDevice, I8042Device, Serial

DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=1 quiet"
MIN_MEMORY_MIB = 32
MAX_MEMORY_MIB = 1 << 20


@dataclass
class VmConfig:
    """What to boot and with how much."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = DEFAULT_CMDLINE
    vcpus: int = 1
    memory_mib: int = 128
    console_output: Callable[[bytes], None] | None = None
    """Receives the guest's serial console output (on a vCPU or the event thread)."""
    console_input: int | None = None
    """A readable fd whose bytes are typed on the serial console (non-blocking reads are used)."""
    shared_memory: bool = False
    """RAM another process (vhost-user) can map. RAM is a memfd mapped MAP_SHARED anyway; what this changes
    is a restore, which then copies the snapshot's memory into a fresh memfd instead of mapping the file
    copy-on-write (a private mapping would hide the guest's writes from the other process)."""
    devices: list[DeviceSpec] = field(default_factory=list)
    """Virtio devices (vsock, block, net, fs, rng), each on its own virtio-mmio slot, in this order."""
    max_vcpus: int = 0
    """vCPUs the VM may grow to by hot-add (`Vmm.plug_vcpu`); 0: ``vcpus``, no hot-add."""
    memory_hotplug_mib: int = 0
    """Memory the guest may grow by (a multiple of 128 MiB): a region above RAM, served by a virtio-mem
    device on the virtio-mmio slot after ``devices`` (`Vmm.set_hotplug_memory`); 0: none."""

    @property
    def possible_vcpus(self) -> int:
        """The most vCPUs this VM can have: ``max_vcpus``, or ``vcpus`` when that is 0."""
        return max(self.vcpus, self.max_vcpus)

    def validate(self, max_vcpus: int) -> None:
        """Raise `ConfigError` for values no VM can have."""
        top = min(max_vcpus, 255)
        if not 1 <= self.vcpus <= top:
            raise ConfigError(f"vcpus must be between 1 and {top} on this host, not {self.vcpus}")
        if self.max_vcpus and not self.vcpus <= self.max_vcpus <= top:
            raise ConfigError(
                f"max_vcpus must be between vcpus ({self.vcpus}) and {top}, not {self.max_vcpus}"
            )
        if not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise ConfigError(f"memory must be at least {MIN_MEMORY_MIB} MiB, not {self.memory_mib} MiB")
        if (
            not 0 <= self.memory_hotplug_mib <= MAX_MEMORY_MIB
            or self.memory_hotplug_mib * MiB % HOTPLUG_ALIGN
        ):
            raise ConfigError(
                f"memory_hotplug_mib must be a multiple of {HOTPLUG_ALIGN // MiB} up to {MAX_MEMORY_MIB}, "
                f"not {self.memory_hotplug_mib}"
            )

    def hotplug_range(self) -> tuple[GuestAddress, int] | None:
        """Where the virtio-mem region lies (`_layout.hotplug_range`), or None without one."""
        if not self.memory_hotplug_mib:
            return None
        return hotplug_range(self.memory_mib * MiB, self.memory_hotplug_mib * MiB)


@dataclass(frozen=True)
class MmioSlot:
    """A virtio-mmio slot handed to `Vmm.add_device`'s factory."""

    index: int
    base: GuestAddress
    size: int
    gsi: int

    @classmethod
    def at(cls, index: int) -> MmioSlot:
        """Slot ``index`` of the layout (`ConfigError` past the last one): the one place slots are made."""
        if not 0 <= index < VIRTIO_MMIO_SLOTS:
            raise ConfigError(f"all {VIRTIO_MMIO_SLOTS} virtio-mmio slots are taken")
        base, gsi = virtio_mmio_slot(index)
        return cls(index, base, VIRTIO_MMIO_SLOT_SIZE, gsi)


DeviceFactory = Callable[[GuestMemory, InterruptTrigger, MmioSlot], BusDevice]
"""Builds an MMIO device given guest memory, its interrupt line and its slot."""

REQUIRED_KVM_CAPS = (
    (k.KVM_CAP_IRQCHIP, "IRQCHIP"),
    (k.KVM_CAP_IRQFD, "IRQFD"),
    (k.KVM_CAP_IOEVENTFD, "IOEVENTFD"),
    (k.KVM_CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT"),
    (k.KVM_CAP_PIT2, "PIT2"),
    (k.KVM_CAP_USER_MEMORY, "USER_MEMORY"),
)
"""What the host's KVM must offer (checked before anything is created)."""


class Machine:
    """The built parts of one VM; each list holds what was created so far, so `release` frees exactly that
    (also after a failure half-way)."""

    def __init__(self) -> None:
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.memory: GuestMemoryMmap | None = None
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.event_loop: EventLoop | None = None
        self.serial: Serial | None = None
        self.boot_plan: BootPlan | None = None
        self.irqfds: list[IrqFd] = []
        self.vcpus: list[Vcpu] = []
        self.mmio_slots: list[MmioSlot] = []
        self.slot_irqs: dict[int, IrqFd] = {}  # slot index -> its irqfd (hot-unplug closes it)
        self.virtio: list[VirtioMmioDevice] = []
        self._possible_vcpus = 0  # set by create
        self._cpuid: list[k.kvm_cpuid_entry2] | None = None
        self._tsc_deadline = False

    def create(
        self,
        config: VmConfig,
        *,
        on_reset: Callable[[], None],
        on_power_off: Callable[[], None],
        memory_files: list[int] | None = None,
    ) -> None:
        """Open KVM, create the VM, its RAM, irqchip, PIT, legacy devices and the event loop.

        ``on_reset``/``on_power_off`` are what the guest's i8042 pulse and ACPI registers call. With
        ``memory_files`` (a snapshot's, one fd per RAM region) RAM maps them copy-on-write."""
        self.kvm = Kvm()
        config.validate(self.kvm.max_vcpus())
        self._possible_vcpus = config.possible_vcpus  # what add_vcpu may create, booted or restored
        for cap, name in REQUIRED_KVM_CAPS:
            if not self.kvm.check_extension(cap):
                raise ConfigError(f"this host's KVM lacks KVM_CAP_{name}")
        self.vm = self.kvm.create_vm()
        self.memory = GuestMemoryMmap(
            ram_ranges(config.memory_mib * MiB),
            shared=config.shared_memory,
            files=memory_files,
            hotplug=config.hotplug_range(),
        )
        for slot, region in enumerate(self.memory.regions):  # the hot-plug region too: its own slot, last
            self.vm.set_user_memory_region(slot, region.guest_addr, region.size, region.host_addr)
        self.vm.set_identity_map_addr(KVM_IDENTITY_MAP_START)
        self.vm.set_tss_addr(KVM_TSS_START)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        irq = IrqFd(self.vm, SERIAL_IRQ)
        self.irqfds.append(irq)
        self.serial = Serial(irq, config.console_output)
        self.pio_bus.insert(self.serial, SERIAL_PORT_BASE, SERIAL_PORT_SIZE)
        self.pio_bus.insert(I8042Device(on_reset), I8042_DATA_PORT, 5)
        self.pio_bus.insert(AcpiPowerDevice(on_power_off, on_reset), ACPI_SLEEP_CONTROL_PORT, 3)
        self.event_loop = EventLoop()

    def add_virtio(self, device: VirtioDevice, slot: MmioSlot | None = None) -> MmioSlot:
        """Put a kata-virtio device behind its MMIO adapter on ``slot`` (or the next one), its doorbells
        on the event loop. The machine owns the device from here on, also when this raises."""
        assert self.event_loop is not None
        slot, mmio = self._virtio_on_slot(device, slot)
        mmio.attach(self.event_loop)
        self.virtio.append(mmio)
        return slot

    def _virtio_on_slot(
        self, device: VirtioDevice, slot: MmioSlot | None, *, lowest_free: bool = False
    ) -> tuple[MmioSlot, VirtioMmioDevice]:
        """`add_slot` with ``device`` behind a new MMIO adapter (not yet on the event loop), on ``slot`` or
        with ``lowest_free`` on `free_slot`; ``device`` is closed when this raises (all slots taken too)."""
        assert self.vm is not None
        vm = self.vm
        made: list[VirtioMmioDevice] = []

        def factory(memory: GuestMemory, irq: InterruptTrigger, slot: MmioSlot) -> BusDevice:
            assert isinstance(irq, IrqFd)
            made.append(VirtioMmioDevice(vm, device, memory, irq, slot.base))
            return made[0]

        try:
            slot = self.add_slot(factory, self.free_slot() if lowest_free else slot)
        except BaseException:
            device.close()
            raise
        return slot, made[0]

    def add_slot(self, factory: DeviceFactory, slot: MmioSlot | None = None) -> MmioSlot:
        """Put the device ``factory`` makes on ``slot`` (a `VmmBuilder` assigned it) or the next free one."""
        assert self.vm is not None and self.memory is not None
        if slot is None:
            slot = MmioSlot.at(len(self.mmio_slots))
        elif slot != MmioSlot.at(slot.index) or any(s.index == slot.index for s in self.mmio_slots):
            raise ConfigError(f"virtio-mmio slot {slot.index} is taken or not a slot of this layout")
        irq = IrqFd(self.vm, slot.gsi)
        self.irqfds.append(irq)
        try:
            device = factory(self.memory, irq, slot)
        except BaseException:
            self.irqfds.remove(irq)
            irq.close()
            raise
        self.mmio_bus.insert(device, slot.base, VIRTIO_MMIO_SLOT_SIZE)
        self.mmio_slots.append(slot)
        self.slot_irqs[slot.index] = irq
        return slot

    def free_slot(self) -> MmioSlot:
        """The lowest virtio-mmio slot no device holds (`ConfigError` when all are taken)."""
        taken = {s.index for s in self.mmio_slots}
        free = next((i for i in range(VIRTIO_MMIO_SLOTS) if i not in taken), VIRTIO_MMIO_SLOTS)
        return MmioSlot.at(free)

    def plug_virtio(self, device: VirtioDevice, poller: DevicePoller) -> MmioSlot:
        """`add_virtio` while the VM runs: the device takes the lowest free slot (window on the MMIO bus,
        irqfd on its GSI, ioeventfd doorbells), and its doorbells and host fds join the running event
        loop on the loop's own thread. The guest is not told (that is the upcall's AddMmio)."""
        assert self.event_loop is not None
        loop = self.event_loop
        slot, mmio = self._virtio_on_slot(device, None, lowest_free=True)

        def attach() -> None:
            mmio.attach(loop)
            poller.add_device(device)

        run_on_loop(loop, attach)
        self.virtio.append(mmio)
        return slot

    def unplug_virtio(self, slot: MmioSlot, poller: DevicePoller | None) -> None:
        """Undo `plug_virtio` (after the guest let the device go): off the event loop (on its thread),
        off the MMIO bus, doorbells and irqfd released, the device closed, the slot free again."""
        assert self.event_loop is not None
        loop = self.event_loop
        mmio = next((d for d in self.virtio if d.base == slot.base), None)
        if mmio is None or slot not in self.mmio_slots:
            raise ConfigError(f"no virtio device on slot {slot.index}")

        def detach() -> None:
            for bell in mmio.doorbells:
                loop.remove_reader(bell.fd)
            if poller is not None:
                poller.remove_device(mmio.device)

        run_on_loop(loop, detach)
        self.mmio_bus.remove(slot.base)
        self.virtio.remove(mmio)
        self.mmio_slots.remove(slot)
        irq = self.slot_irqs.pop(slot.index)
        self.irqfds.remove(irq)
        try:
            mmio.close()
        finally:
            irq.close()

    def prepare_boot(self, config: VmConfig) -> dict[str, float]:
        """Write the ACPI tables, load the kernel, create the vCPUs with their boot registers; returns the
        seconds each phase took (``acpi``, ``load_kernel``, ``create_vcpus``)."""
        assert self.kvm is not None and self.vm is not None and self.memory is not None
        t0 = time.monotonic()
        descriptions = [MmioDeviceDescription(s.base, s.size, s.gsi) for s in self.mmio_slots]
        tables = build_tables(ACPI_START, config.vcpus, descriptions, config.possible_vcpus)
        if tables.size > ACPI_MAX_SIZE:
            raise ConfigError("ACPI tables do not fit their reserved area")
        for addr, blob in tables.blobs:
            self.memory.write(addr, blob)
        t1 = time.monotonic()
        self.boot_plan = load_kernel(
            self.memory, config.kernel, config.cmdline, config.initrd, tables.rsdp_addr
        )
        t2 = time.monotonic()
        for _ in range(config.vcpus):
            self.add_vcpu()
        bsp = self.vcpus[0]
        if self.boot_plan.protocol is BootProtocol.LINUX_64:
            _cpu.setup_long_mode(bsp, self.memory, self.boot_plan.entry, self.boot_plan.boot_info)
        else:
            _cpu.setup_protected_mode(bsp, self.memory, self.boot_plan.entry, self.boot_plan.boot_info)
        t3 = time.monotonic()
        return {"acpi": t1 - t0, "load_kernel": t2 - t1, "create_vcpus": t3 - t2}

    def create_vcpus(self, count: int) -> list[Vcpu]:
        """Create ``count`` vCPU fds (ids 0..count-1), nothing set in them yet."""
        assert self.vm is not None
        for vcpu_id in range(count):
            self.vcpus.append(self.vm.create_vcpu(vcpu_id))
        return self.vcpus

    def add_vcpu(self) -> Vcpu:
        """Create the next vCPU (id = APIC id = how many exist) with its CPUID, MSRs, FPU and LAPIC set up
        for the VM's possible vCPU count; at boot for each vCPU, later for a hot-add (`ConfigError` past
        ``max_vcpus``). Every vCPU but the first waits in KVM for the guest's INIT/SIPI."""
        assert self.kvm is not None and self.vm is not None
        vcpu_id = len(self.vcpus)
        if vcpu_id >= self._possible_vcpus:
            raise ConfigError(f"all {self._possible_vcpus} possible vCPUs exist (VmConfig.max_vcpus)")
        if self._cpuid is None:
            self._cpuid = self.kvm.supported_cpuid()
            self._tsc_deadline = bool(self.kvm.check_extension(k.KVM_CAP_TSC_DEADLINE_TIMER))
        vcpu = self.vm.create_vcpu(vcpu_id)
        self.vcpus.append(vcpu)
        possible, tsc_deadline = self._possible_vcpus, self._tsc_deadline
        vcpu.set_cpuid2(_cpu.cpuid_for_vcpu(self._cpuid, vcpu_id, possible, tsc_deadline=tsc_deadline))
        vcpu.set_msrs(_cpu.boot_msrs())
        _cpu.setup_fpu(vcpu)
        _cpu.setup_lapic(vcpu)
        return vcpu

    def stop_devices(self, errors: list[BaseException]) -> None:
        """Stop the event loop and close every virtio device (errors are collected, the rest still runs)."""
        if self.event_loop is not None:
            self.event_loop.stop()
        for dev in self.virtio:
            try:
                dev.close()
            except Exception as err:  # keep releasing the rest
                errors.append(err)
        self.virtio = []

    def release(self, errors: list[BaseException]) -> None:
        """Close the irqfds, vCPUs, VM, RAM and KVM (after `stop_devices`)."""
        for irq in self.irqfds:
            try:
                irq.close()
            except KvmError as err:
                errors.append(err)
        self.irqfds = []
        self.slot_irqs = {}
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        if self.vm is not None:
            self.vm.close()
        if self.memory is not None:
            self.memory.close()
        if self.kvm is not None:
            self.kvm.close()
