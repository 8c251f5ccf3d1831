"""The in-process VMM: build a VM from a `VmConfig`, boot it on vCPU threads, report how it ended.

Life cycle (each step raises `VmStateError` when called out of order)::

    vmm = Vmm()
    vmm.configure(VmConfig(kernel=..., initrd=..., vcpus=2, memory_mib=512))
    vmm.add_device(make_virtio_device)   # optional, before start
    vmm.start()
    status = vmm.wait(timeout=60)        # GuestExit, or None on timeout
    vmm.close()                          # stops what still runs; frees every fd and thread
"""

from __future__ import annotations

import contextlib
import enum
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from kata_virtio import GuestMemory, InterruptTrigger, VirtioDevice
from kata_vmm import _cpu
from kata_vmm._acpi import MmioDeviceDescription, build_tables
from kata_vmm._bindings import kvm as k
from kata_vmm._bus import Bus, BusDevice
from kata_vmm._errors import ConfigError, KvmError, VmStateError
from kata_vmm._event_loop import EventLoop
from kata_vmm._eventfd import EventFd, IrqFd
from kata_vmm._kvm import Kvm, Vcpu, Vm
from kata_vmm._layout import (
    ACPI_MAX_SIZE,
    ACPI_SLEEP_CONTROL_PORT,
    ACPI_START,
    I8042_DATA_PORT,
    KVM_IDENTITY_MAP_START,
    KVM_TSS_START,
    SERIAL_IRQ,
    SERIAL_PORT_BASE,
    SERIAL_PORT_SIZE,
    VIRTIO_MMIO_SLOT_SIZE,
    VIRTIO_MMIO_SLOTS,
    MiB,
    ram_ranges,
    virtio_mmio_slot,
)
from kata_vmm._loader import BootPlan, BootProtocol, load_kernel
from kata_vmm._memory import GuestAddress, GuestMemoryMmap
from kata_vmm._poller import DevicePoller
from kata_vmm._specs import DeviceSpec, build_device
from kata_vmm._vcpu import ExitKind, GuestExit, VcpuState, VcpuThread, install_kick_handler
from kata_vmm._virtio import VirtioMmioDevice
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
    """Back RAM with memfds, so another process (vhost-user) can map it."""
    devices: list[DeviceSpec] = field(default_factory=list)
    """Virtio devices (vsock, block, net, fs, rng), each on its own virtio-mmio slot, in this order."""

    def validate(self, max_vcpus: int) -> None:
        """Raise `ConfigError` for values no VM can have."""
        if not 1 <= self.vcpus <= min(max_vcpus, 255):
            raise ConfigError(
                f"vcpus must be between 1 and {min(max_vcpus, 255)} on this host, not {self.vcpus}"
            )
        if not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise ConfigError(f"memory must be at least {MIN_MEMORY_MIB} MiB, not {self.memory_mib} MiB")


class VmmState(enum.Enum):
    """Life-cycle state of a `Vmm`."""

    NEW = "new"
    CONFIGURED = "configured"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"
    CLOSED = "closed"


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


@dataclass(frozen=True)
class VmmStatistics:
    """Counters of a running or finished VM."""

    exits: dict[str, int]
    exit_seconds: dict[str, float]
    io_ports: dict[int, int]
    run_seconds: float
    wall_seconds: float
    unhandled_pio: int
    unhandled_mmio: int
    console_bytes_out: int
    console_bytes_in: int
    per_vcpu: list[dict[str, int]] = field(default_factory=list)
    setup_seconds: dict[str, float] = field(default_factory=dict)
    """Host-side set-up phases before the first KVM_RUN (configure, ACPI, kernel load, vCPU creation)."""


class Vmm:
    """One virtual machine with its vCPU threads and event thread."""

    def __init__(self) -> None:
        self.state = VmmState.NEW
        self.config: VmConfig | None = None
        self.kvm: Kvm | None = None
        self.vm: Vm | None = None
        self.memory: GuestMemoryMmap | None = None
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.event_loop: EventLoop | None = None
        self.serial: Serial | None = None
        self.boot_plan: BootPlan | None = None
        self._irqfds: list[IrqFd] = []
        self._vcpus: list[Vcpu] = []
        self._threads: list[VcpuThread] = []
        self._mmio_slots: list[MmioSlot] = []
        self._virtio: list[VirtioMmioDevice] = []
        self._poller: DevicePoller | None = None
        self._exit: GuestExit | None = None
        self._exit_event = threading.Event()
        self._exit_fd = EventFd()
        self._lock = threading.Lock()
        self._started_at = 0.0
        self._ended_at = 0.0
        self._restore_input_blocking: tuple[int, bool] | None = None
        self._setup: dict[str, float] = {}

    # --- configuration ---------------------------------------------------------------------------
    def configure(self, config: VmConfig) -> None:
        """Open KVM, create the VM, its RAM, irqchip, PIT and legacy devices (nothing runs yet)."""
        self._require(VmmState.NEW)
        t0 = time.monotonic()
        try:
            self.kvm = Kvm()
            config.validate(self.kvm.max_vcpus())
            for cap, name in (
                (k.KVM_CAP_IRQCHIP, "IRQCHIP"),
                (k.KVM_CAP_IRQFD, "IRQFD"),
                (k.KVM_CAP_IOEVENTFD, "IOEVENTFD"),
                (k.KVM_CAP_IMMEDIATE_EXIT, "IMMEDIATE_EXIT"),
                (k.KVM_CAP_PIT2, "PIT2"),
                (k.KVM_CAP_USER_MEMORY, "USER_MEMORY"),
            ):
                if not self.kvm.check_extension(cap):
                    raise ConfigError(f"this host's KVM lacks KVM_CAP_{name}")
            self.config = config
            self.vm = self.kvm.create_vm()
            self.memory = GuestMemoryMmap(ram_ranges(config.memory_mib * MiB), shared=config.shared_memory)
            for slot, region in enumerate(self.memory.regions):
                self.vm.set_user_memory_region(slot, region.guest_addr, region.size, region.host_addr)
            self.vm.set_identity_map_addr(KVM_IDENTITY_MAP_START)
            self.vm.set_tss_addr(KVM_TSS_START)
            self.vm.create_irqchip()
            self.vm.create_pit2()
            self._setup_legacy_devices(config)
            self.event_loop = EventLoop()
            for spec in config.devices:
                self._add_virtio(build_device(spec))
        except BaseException:
            self._release()
            raise
        self._setup["configure"] = time.monotonic() - t0
        self.state = VmmState.CONFIGURED

    def _setup_legacy_devices(self, config: VmConfig) -> None:
        assert self.vm is not None
        irq = IrqFd(self.vm, SERIAL_IRQ)
        self._irqfds.append(irq)
        self.serial = Serial(irq, config.console_output)
        self.pio_bus.insert(self.serial, SERIAL_PORT_BASE, SERIAL_PORT_SIZE)
        self.pio_bus.insert(I8042Device(self._guest_reset), I8042_DATA_PORT, 5)
        self.pio_bus.insert(
            AcpiPowerDevice(self._guest_power_off, self._guest_reset), ACPI_SLEEP_CONTROL_PORT, 3
        )

    def add_virtio_device(self, device: VirtioDevice, slot: MmioSlot | None = None) -> MmioSlot:
        """Put a kata-virtio device on ``slot`` (a `VmmBuilder` assigned it) or the next virtio-mmio slot,
        served on the event thread.

        QueueNotify reaches the event thread through one ioeventfd per queue, interrupts go out through
        the slot's irqfd, the device's `watched()` fds are polled on the event thread. The VMM owns the
        device from here on (`close` closes it), also when this raises.
        """
        self._require(VmmState.CONFIGURED)
        return self._add_virtio(device, slot)

    def _add_virtio(self, device: VirtioDevice, slot: MmioSlot | None = None) -> MmioSlot:
        assert self.vm is not None and self.event_loop is not None
        vm, loop = self.vm, self.event_loop
        made: list[VirtioMmioDevice] = []

        def factory(memory: GuestMemory, irq: InterruptTrigger, slot: MmioSlot) -> BusDevice:
            assert isinstance(irq, IrqFd)
            made.append(VirtioMmioDevice(vm, device, memory, irq, slot.base))
            return made[0]

        try:
            slot = self._add_slot(factory, slot)
        except BaseException:
            device.close()
            raise
        made[0].attach(loop)
        self._virtio.append(made[0])
        return slot

    def add_device(self, factory: DeviceFactory) -> MmioSlot:
        """Give a device the next virtio-mmio slot (address, GSI, irqfd); the DSDT describes it at start."""
        self._require(VmmState.CONFIGURED)
        return self._add_slot(factory)

    def _add_slot(self, factory: DeviceFactory, slot: MmioSlot | None = None) -> MmioSlot:
        """Put the device ``factory`` makes on ``slot`` (a `VmmBuilder` assigned it) or the next free one."""
        assert self.vm is not None and self.memory is not None
        if slot is None:
            slot = MmioSlot.at(len(self._mmio_slots))
        elif slot != MmioSlot.at(slot.index) or any(s.index == slot.index for s in self._mmio_slots):
            raise ConfigError(f"virtio-mmio slot {slot.index} is taken or not a slot of this layout")
        base, gsi = slot.base, slot.gsi
        irq = IrqFd(self.vm, gsi)
        self._irqfds.append(irq)
        try:
            device = factory(self.memory, irq, slot)
        except BaseException:
            self._irqfds.remove(irq)
            irq.close()
            raise
        self.mmio_bus.insert(device, base, VIRTIO_MMIO_SLOT_SIZE)
        self._mmio_slots.append(slot)
        return slot

    # --- running -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the kernel, write the ACPI tables, create the vCPUs and start all threads."""
        self._require(VmmState.CONFIGURED)
        assert self.kvm is not None and self.vm is not None and self.memory is not None and self.config
        config = self.config
        install_kick_handler()
        t0 = time.monotonic()
        descriptions = [MmioDeviceDescription(s.base, s.size, s.gsi) for s in self._mmio_slots]
        tables = build_tables(ACPI_START, config.vcpus, descriptions)
        if tables.size > ACPI_MAX_SIZE:
            raise ConfigError("ACPI tables do not fit their reserved area")
        for addr, blob in tables.blobs:
            self.memory.write(addr, blob)
        t1 = time.monotonic()
        self.boot_plan = load_kernel(
            self.memory, config.kernel, config.cmdline, config.initrd, tables.rsdp_addr
        )
        t2 = time.monotonic()
        supported = self.kvm.supported_cpuid()
        tsc_deadline = bool(self.kvm.check_extension(k.KVM_CAP_TSC_DEADLINE_TIMER))
        msrs = _cpu.boot_msrs()
        for vcpu_id in range(config.vcpus):
            vcpu = self.vm.create_vcpu(vcpu_id)
            self._vcpus.append(vcpu)
            vcpu.set_cpuid2(_cpu.cpuid_for_vcpu(supported, vcpu_id, config.vcpus, tsc_deadline=tsc_deadline))
            vcpu.set_msrs(msrs)
            _cpu.setup_fpu(vcpu)
            _cpu.setup_lapic(vcpu)
        bsp = self._vcpus[0]
        if self.boot_plan.protocol is BootProtocol.LINUX_64:
            _cpu.setup_long_mode(bsp, self.memory, self.boot_plan.entry, self.boot_plan.boot_info)
        else:
            _cpu.setup_protected_mode(bsp, self.memory, self.boot_plan.entry, self.boot_plan.boot_info)
        t3 = time.monotonic()
        self._setup.update(acpi=t1 - t0, load_kernel=t2 - t1, create_vcpus=t3 - t2)
        self._start_threads()

    def _start_threads(self) -> None:
        assert self.config is not None and self.serial is not None
        loop = self.event_loop
        assert loop is not None
        if self._virtio:
            self._poller = DevicePoller(loop, [d.device for d in self._virtio])
        loop.add_ticker(self.serial.flush)
        if self.config.console_input is not None:
            self._watch_console_input(loop, self.config.console_input)
        self._threads = [VcpuThread(v, self.pio_bus, self.mmio_bus, self._guest_exited) for v in self._vcpus]
        self._started_at = time.monotonic()
        self.state = VmmState.RUNNING
        loop.start()
        for t in self._threads:
            t.start()

    def _watch_console_input(self, loop: EventLoop, fd: int) -> None:
        serial = self.serial
        assert serial is not None
        self._restore_input_blocking = (fd, os.get_blocking(fd))
        os.set_blocking(fd, False)
        pending = bytearray()
        eof = False

        def on_input(_mask: int) -> None:
            nonlocal eof
            if eof:
                return
            if not pending:
                try:
                    data = os.read(fd, 4096)
                except BlockingIOError:
                    return
                if not data:  # EOF: stop watching, the console stays usable for output
                    eof = True
                    loop.remove_reader(fd)
                    return
                pending.extend(data)
            taken = serial.enqueue_input(bytes(pending))
            del pending[:taken]

        def retry_pending() -> None:
            if pending:
                taken = serial.enqueue_input(bytes(pending))
                del pending[:taken]

        try:
            loop.add_reader(fd, on_input)
        except PermissionError:
            # regular files and /dev/null cannot be polled (they are always ready): read them on every tick
            loop.add_ticker(lambda: on_input(0))
        loop.add_ticker(retry_pending)

    def _guest_power_off(self) -> None:
        self._guest_exited(GuestExit(ExitKind.POWER_OFF, None, "guest powered off (ACPI S5)"))

    def _guest_reset(self) -> None:
        self._guest_exited(GuestExit(ExitKind.RESET, None, "guest requested a reset"))

    def _guest_exited(self, event: GuestExit) -> None:
        """Record the first guest exit and stop every vCPU (called from any thread)."""
        with self._lock:
            if self._exit is None:
                self._exit = event
                self._ended_at = time.monotonic()
        for t in self._threads:
            t.stop()
        self._exit_event.set()
        if self._exit_fd.fd >= 0:
            self._exit_fd.write()

    def exit_fd(self) -> int:
        """An fd that becomes readable once the guest has stopped, and stays readable (do not read it).

        Lets an event loop (trio's ``wait_readable``, asyncio's ``add_reader``) notice a guest exit without
        parking a thread in `wait`; after it fires, `wait` returns at once. Valid until `close`.
        """
        if self._exit_fd.fd < 0:
            raise VmStateError("exit_fd() after close()")
        return self._exit_fd.fd

    def wait(self, timeout: float | None = None) -> GuestExit | None:
        """Block until the guest stops (returns how) or ``timeout`` seconds pass (returns None)."""
        if self.state in (VmmState.NEW, VmmState.CONFIGURED):
            raise VmStateError("wait() before start()")
        if not self._exit_event.wait(timeout):
            return None
        self._join_vcpus()
        return self._exit

    def _join_vcpus(self) -> None:
        for t in self._threads:
            t.stop()
        for t in self._threads:
            t.join(timeout=10)
        if self.serial is not None:
            self.serial.flush()
        if self.state in (VmmState.RUNNING, VmmState.PAUSED):
            self.state = VmmState.EXITED

    def stop(self) -> GuestExit:
        """Stop the guest now (as if the power cord were pulled) and return how it ended."""
        if self.state in (VmmState.NEW, VmmState.CONFIGURED):
            raise VmStateError("stop() before start()")
        self._guest_exited(GuestExit(ExitKind.STOPPED, None, "stopped by the host"))
        self._join_vcpus()
        assert self._exit is not None
        return self._exit

    def stop_nowait(self) -> None:
        """Ask the guest to stop without waiting (safe from a signal handler or any thread)."""
        if self.state in (VmmState.RUNNING, VmmState.PAUSED):
            self._guest_exited(GuestExit(ExitKind.STOPPED, None, "stopped by the host"))

    def pause(self) -> None:
        """Pause every vCPU (returns once none runs guest code)."""
        self._require(VmmState.RUNNING)
        for t in self._threads:
            t.pause()
        self.state = VmmState.PAUSED

    def resume(self) -> None:
        """Resume after `pause`."""
        self._require(VmmState.PAUSED)
        for t in self._threads:
            t.resume()
        self.state = VmmState.RUNNING

    @property
    def exit_status(self) -> GuestExit | None:
        """How the guest ended, once it has."""
        return self._exit

    def vcpu_states(self) -> list[VcpuState]:
        """State of each vCPU thread."""
        return [t.state for t in self._threads]

    def threads(self) -> list[threading.Thread]:
        """Every OS thread this VMM started (vCPUs and the event thread)."""
        out = [t.thread for t in self._threads]
        if self.event_loop is not None:
            out.append(self.event_loop.thread)
        return out

    def statistics(self) -> VmmStatistics:
        """Exit counts by reason, time in exits, console traffic."""
        exits: dict[str, int] = {}
        exit_ns: dict[str, int] = {}
        ports: dict[int, int] = {}
        run_ns = 0
        per_vcpu = []
        for t in self._threads:
            s = t.stats
            for name, n in list(s.exits.items()):
                exits[name] = exits.get(name, 0) + n
            for name, ns in list(s.exit_ns.items()):
                exit_ns[name] = exit_ns.get(name, 0) + ns
            for port, n in list(s.io_ports.items()):
                ports[port] = ports.get(port, 0) + n
            run_ns += s.run_ns
            per_vcpu.append(dict(s.exits))
        end = self._ended_at or time.monotonic()
        return VmmStatistics(
            exits=exits,
            exit_seconds={name: ns / 1e9 for name, ns in exit_ns.items()},
            io_ports=ports,
            run_seconds=run_ns / 1e9,
            wall_seconds=(end - self._started_at) if self._started_at else 0.0,
            unhandled_pio=self.pio_bus.unhandled_reads + self.pio_bus.unhandled_writes,
            unhandled_mmio=self.mmio_bus.unhandled_reads + self.mmio_bus.unhandled_writes,
            console_bytes_out=self.serial.bytes_out if self.serial else 0,
            console_bytes_in=self.serial.bytes_in if self.serial else 0,
            per_vcpu=per_vcpu,
            setup_seconds=dict(self._setup),
        )

    # --- teardown ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop anything still running and release every thread, fd and mapping (idempotent)."""
        if self.state is VmmState.CLOSED:
            return
        if self._threads and any(t.thread.is_alive() for t in self._threads):
            self._guest_exited(GuestExit(ExitKind.STOPPED, None, "closed by the host"))
            self._join_vcpus()
        self._release()
        self._exit_fd.close()
        self.state = VmmState.CLOSED

    def _release(self) -> None:
        errors: list[BaseException] = []
        if self.event_loop is not None:
            self.event_loop.stop()
        for dev in self._virtio:
            try:
                dev.close()
            except Exception as err:  # keep releasing the rest
                errors.append(err)
        self._virtio = []
        if self._restore_input_blocking is not None:
            fd, blocking = self._restore_input_blocking
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)
            self._restore_input_blocking = None
        for irq in self._irqfds:
            try:
                irq.close()
            except KvmError as err:
                errors.append(err)
        self._irqfds = []
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus = []
        if self.vm is not None:
            self.vm.close()
        if self.memory is not None:
            self.memory.close()
        if self.kvm is not None:
            self.kvm.close()

    def _require(self, state: VmmState) -> None:
        if self.state is not state:
            raise VmStateError(f"operation needs a {state.value} VM; this one is {self.state.value}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
