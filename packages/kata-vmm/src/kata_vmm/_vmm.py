"""The running VM: its vCPU threads and event thread, how the guest ended, statistics, teardown.

What the VM is made of is its `Machine` (``_machine.py``); `VmmBuilder` (``_builder.py``) decides which
devices go on which slot and builds it. The life cycle (each step raises `VmStateError` out of order)::

    vmm = VmmBuilder(VmConfig(kernel=..., vcpus=2, memory_mib=512)).build()   # or, step by step:
    vmm = Vmm(); vmm.configure(VmConfig(...)); vmm.add_device(make_device)     # (lower level, kept)
    vmm.start()
    status = vmm.wait(timeout=60)        # GuestExit, or None on timeout
    vmm.close()                          # stops what still runs; frees every fd and thread

A running VM pauses, is snapshotted into a directory and resumes (or closes); `Vmm.restore` recreates a VM
from that directory, paused, as it was at the snapshot (``_snapshot.py`` describes the files)::

    vmm.pause(); vmm.snapshot(directory); vmm.resume()
    clone = Vmm.restore(directory, config)   # PAUSED: same registers, memory (copy-on-write), devices
    clone.resume()
"""

from __future__ import annotations

import contextlib
import enum
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar

from kata_sys_util import GuestClock
from kata_upcall import UPCALL_PORT
from kata_virtio import (
    BALLOON_PAGE_SIZE,
    FuseStatistics,
    VirtioBalloon,
    VirtioDevice,
    VirtioError,
    VirtioFs,
    VirtioMem,
    VirtioVsock,
)
from kata_vmm import _snapshot as snap
from kata_vmm._bus import Bus
from kata_vmm._errors import ConfigError, KvmError, SnapshotError, VmmError, VmStateError
from kata_vmm._event_loop import EventLoop
from kata_vmm._eventfd import EventFd, IrqFd
from kata_vmm._kvm import Kvm, Vcpu, Vm
from kata_vmm._layout import MiB, ram_ranges
from kata_vmm._loader import BootPlan
from kata_vmm._machine import (
    DEFAULT_CMDLINE,
    MAX_MEMORY_MIB,
    MIN_MEMORY_MIB,
    DeviceFactory,
    Machine,
    MmioSlot,
    VmConfig,
)
from kata_vmm._memory import GuestMemoryMmap
from kata_vmm._poller import DevicePoller
from kata_vmm._specs import DeviceSpec, build_device
from kata_vmm._vcpu import ExitKind, GuestExit, VcpuState, VcpuThread, install_kick_handler
from kata_vmm._virtio import VirtioMmioDevice, run_on_loop
from kata_vmm.devices import Serial

__all__ = [  # the configuration names kept importable from here (their home is _machine.py)
    "DEFAULT_CMDLINE",
    "MAX_MEMORY_MIB",
    "MIN_MEMORY_MIB",
    "BalloonStatus",
    "DeviceFactory",
    "HotplugMemoryStatus",
    "MmioSlot",
    "VmConfig",
    "Vmm",
    "VmmState",
    "VmmStatistics",
    "snapshot_config",
]


_D = TypeVar("_D", bound=VirtioDevice)


class VmmState(enum.Enum):
    """Life-cycle state of a `Vmm`."""

    NEW = "new"
    CONFIGURED = "configured"
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"
    CLOSED = "closed"


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
    virtio_fs: dict[str, FuseStatistics] = field(default_factory=dict)
    """What each inline virtio-fs device served, by tag."""

    def summary(self, top: int = 6) -> str:
        """One line: vCPU run time against wall time, the ``top`` exit reasons by count (with their
        host seconds), what each virtio-fs device served."""
        ranked = sorted(self.exits.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        exits = ", ".join(f"{name} {n} ({self.exit_seconds.get(name, 0.0):.2f} s)" for name, n in ranked)
        parts = [f"vCPUs ran {self.run_seconds:.2f} s of {self.wall_seconds:.2f} s"]
        parts.append(f"exits: {exits or 'none'}")
        parts += [f"virtio-fs {tag}: {fs}" for tag, fs in sorted(self.virtio_fs.items())]
        return "; ".join(parts)


@dataclass(frozen=True)
class HotplugMemoryStatus:
    """The virtio-mem region of a VM (`Vmm.hotplug_memory`), in MiB."""

    region_mib: int
    requested_mib: int
    """What the host asked for (`Vmm.set_hotplug_memory`)."""
    plugged_mib: int
    """What the guest's driver has plugged so far (it follows requested_mib block by block)."""


@dataclass(frozen=True)
class BalloonStatus:
    """The balloon of a VM (`Vmm.balloon`)."""

    target_mib: int
    actual_mib: int
    """What the guest's driver reports it holds (the guest's word)."""
    stats: dict[str, int]
    """The guest's last statistics (empty without ``BalloonSpec.stats_interval``)."""


class Vmm:
    """One virtual machine with its vCPU threads and event thread."""

    def __init__(self) -> None:
        self.state = VmmState.NEW
        self.config: VmConfig | None = None
        self.machine = Machine()
        self._threads: list[VcpuThread] = []
        self._poller: DevicePoller | None = None
        self._exit: GuestExit | None = None
        self._exit_event = threading.Event()
        self._exit_fd = EventFd()
        self._lock = threading.Lock()
        self._plug_lock = threading.Lock()  # one hot-plug change at a time (never held by the event thread)
        self.guest_vcpus: set[int] = set()
        """APIC ids the guest runs: the boot vCPUs, then as `kata_vmm.hot_add_vcpus`/`hot_remove_vcpus`
        changed them (what the guest answered)."""
        self._started_at = 0.0
        self._ended_at = 0.0
        self._restore_input_blocking: tuple[int, bool] | None = None
        self._setup: dict[str, float] = {}
        # what each virtio device (in machine.virtio order) was built from, if the caller said
        self._specs: list[DeviceSpec | None] = []

    # the machine's parts, under the names callers have always used
    @property
    def kvm(self) -> Kvm | None:
        """The /dev/kvm handle (after `configure`)."""
        return self.machine.kvm

    @property
    def vm(self) -> Vm | None:
        """The VM fd (after `configure`)."""
        return self.machine.vm

    @property
    def memory(self) -> GuestMemoryMmap | None:
        """Guest RAM (after `configure`)."""
        return self.machine.memory

    @property
    def pio_bus(self) -> Bus:
        """The port-I/O bus."""
        return self.machine.pio_bus

    @property
    def mmio_bus(self) -> Bus:
        """The MMIO bus."""
        return self.machine.mmio_bus

    @property
    def event_loop(self) -> EventLoop | None:
        """The event thread's loop (after `configure`)."""
        return self.machine.event_loop

    @property
    def serial(self) -> Serial | None:
        """The 16550 console (after `configure`)."""
        return self.machine.serial

    @property
    def boot_plan(self) -> BootPlan | None:
        """Where the kernel was loaded and how it is entered (after `start`)."""
        return self.machine.boot_plan

    @property
    def _virtio(self) -> list[VirtioMmioDevice]:
        return self.machine.virtio

    @property
    def _vcpus(self) -> list[Vcpu]:
        return self.machine.vcpus

    @property
    def _mmio_slots(self) -> list[MmioSlot]:
        return self.machine.mmio_slots

    @property
    def _irqfds(self) -> list[IrqFd]:
        return self.machine.irqfds

    # --- configuration ---------------------------------------------------------------------------
    def configure(self, config: VmConfig) -> None:
        """Open KVM, create the VM, its RAM, irqchip, PIT and legacy devices (nothing runs yet).

        `VmmBuilder.build` calls this; ``config.devices`` go on the next slots, in order."""
        self._require(VmmState.NEW)
        t0 = time.monotonic()
        try:
            self.config = config
            self.machine.create(config, on_reset=self._guest_reset, on_power_off=self._guest_power_off)
            for spec in config.devices:
                self.machine.add_virtio(build_device(spec))
                self._specs.append(spec)
        except BaseException:
            self._release()
            raise
        self._setup["configure"] = time.monotonic() - t0
        self.state = VmmState.CONFIGURED

    def add_virtio_device(
        self, device: VirtioDevice, slot: MmioSlot | None = None, *, spec: DeviceSpec | None = None
    ) -> MmioSlot:
        """Put a kata-virtio device on ``slot`` (a `VmmBuilder` assigned it) or the next virtio-mmio slot,
        served on the event thread. ``spec``, the spec it was built from, goes into a snapshot (so
        `snapshot_config` can rebuild it); without it a restore needs a config naming the device.

        QueueNotify reaches the event thread through one ioeventfd per queue, interrupts go out through
        the slot's irqfd, the device's `watched()` fds are polled on the event thread. The VMM owns the
        device from here on (`close` closes it), also when this raises.
        """
        self._require(VmmState.CONFIGURED)
        placed = self.machine.add_virtio(device, slot)
        self._specs.append(spec)
        return placed

    def add_device(self, factory: DeviceFactory) -> MmioSlot:
        """Give a device the next virtio-mmio slot (address, GSI, irqfd); the DSDT describes it at start."""
        self._require(VmmState.CONFIGURED)
        return self.machine.add_slot(factory)

    # --- hot-plug (the host side; kata_vmm.hot_add_virtio tells the guest through upcall) -------------
    def plug_virtio(self, device: VirtioDevice) -> MmioSlot:
        """Put a kata-virtio device on the lowest free virtio-mmio slot of the running VM (any thread but
        the event thread): MMIO window, irqfd, doorbells and host fds served like a boot-time device.
        The guest does not see it until it is told (upcall AddMmio: `kata_vmm.hot_add_virtio`). The VMM
        owns the device from here on, also when this raises (`ConfigError` when every slot is taken)."""
        if self.state not in (VmmState.RUNNING, VmmState.PAUSED):
            device.close()
            raise VmStateError(f"plug_virtio() needs a running VM, not {self.state.value}")
        loop = self.event_loop
        assert loop is not None
        with self._plug_lock:
            if self._poller is None:  # no virtio device at boot: the poller starts with this one
                made: list[DevicePoller] = []
                run_on_loop(loop, lambda: made.append(DevicePoller(loop, [])))
                self._poller = made[0]
            return self.machine.plug_virtio(device, self._poller)

    def unplug_virtio(self, slot: MmioSlot) -> None:
        """Take the device on ``slot`` out of the running VM and close it (after the guest let it go:
        upcall DelMmio, `kata_vmm.hot_remove_virtio`); the slot is free again."""
        if self.state not in (VmmState.RUNNING, VmmState.PAUSED, VmmState.EXITED):
            raise VmStateError(f"unplug_virtio() needs a started VM, not {self.state.value}")
        with self._plug_lock:
            self.machine.unplug_virtio(slot, self._poller)

    def plug_vcpu(self) -> int:
        """Create the next vCPU of the running VM and start its ``kata-vcpu-N`` thread; returns its APIC id.

        The vCPU waits in KVM for the guest's INIT/SIPI, which the guest sends once told (upcall AddCpu:
        `kata_vmm.hot_add_vcpus`). `ConfigError` past `VmConfig.max_vcpus` (the MADT lists that many).
        KVM cannot destroy a vCPU: one the guest takes offline again stays, halted in KVM, for the next
        hot-add of its APIC id."""
        if self.state is not VmmState.RUNNING:
            raise VmStateError(f"plug_vcpu() needs a running VM, not {self.state.value}")
        with self._plug_lock:
            vcpu = self.machine.add_vcpu()
            thread = VcpuThread(vcpu, self.pio_bus, self.mmio_bus, self._guest_exited)
            with self._lock:
                self._threads = [*self._threads, thread]
                ended = self._exit is not None
            thread.start()
            if ended:  # the guest stopped meanwhile: so does the new vCPU
                thread.stop()
            return vcpu.id

    def upcall_socket(self) -> socket.socket:
        """A new in-process stream to the guest's upcall server (vsock port 219) through this VM's vsock
        device: the blocking socket `VirtioVsock.connect_local` returns (first ``OK <port>\\n``, so
        `Handshake.ACCEPT_LINE`). `VmStateError` without a vsock device."""
        for mmio in self._virtio:
            if isinstance(mmio.device, VirtioVsock):
                return mmio.device.connect_local(UPCALL_PORT)
        raise VmStateError("this VM has no vsock device: upcall needs one")

    # --- running -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the kernel, write the ACPI tables, create the vCPUs and start all threads."""
        self._require(VmmState.CONFIGURED)
        assert self.config is not None
        install_kick_handler()
        self._add_virtio_mem()
        self._setup.update(self.machine.prepare_boot(self.config))
        self.guest_vcpus = set(range(self.config.vcpus))
        self._start_threads()

    def _add_virtio_mem(self) -> None:
        """With ``memory_hotplug_mib``, the virtio-mem device serving the hot-plug region takes the slot
        after every device added so far (so a `VmmBuilder`'s slots stay as it said), cold-plugged."""
        assert self.config is not None
        region = self.config.hotplug_range()
        if region is None or self._find_device(VirtioMem) is not None:
            return
        addr, size = region
        self.machine.add_virtio(VirtioMem(addr, size))
        self._specs.append(None)  # made from the VmConfig, not a spec

    def _find_device(self, kind: type[_D]) -> _D | None:
        for mmio in self._virtio:
            if isinstance(mmio.device, kind):
                return mmio.device
        return None

    # --- memory: virtio-mem and the balloon (any thread; the guest's drivers follow asynchronously) ------
    def set_hotplug_memory(self, mib: int) -> None:
        """Ask the guest to plug ``mib`` MiB of the hot-plug region (a multiple of the 2 MiB block, up to
        ``memory_hotplug_mib``); less than now asks it to unplug. The guest's virtio_mem driver plugs block
        by block and onlines the memory (MemTotal grows); `hotplug_memory` shows how far it got."""
        device = self._require_started_device(VirtioMem, "memory_hotplug_mib")
        try:
            device.set_requested_size(mib * MiB)
        except VirtioError as err:
            raise ConfigError(str(err)) from err

    def hotplug_memory(self) -> HotplugMemoryStatus:
        """The virtio-mem region's size, requested and plugged MiB."""
        device = self._require_started_device(VirtioMem, "memory_hotplug_mib")
        return HotplugMemoryStatus(
            device.region_size // MiB, device.requested_size // MiB, device.plugged_size // MiB
        )

    def set_balloon(self, mib: int) -> None:
        """Ask the guest to give ``mib`` MiB back through the balloon (0: deflate it all)."""
        device = self._require_started_device(VirtioBalloon, "a BalloonSpec")
        try:
            device.set_target(mib * MiB // BALLOON_PAGE_SIZE)
        except VirtioError as err:
            raise ConfigError(str(err)) from err

    def balloon(self) -> BalloonStatus:
        """The balloon's target, the size the guest reports and its last statistics."""
        device = self._require_started_device(VirtioBalloon, "a BalloonSpec")
        pages_per_mib = MiB // BALLOON_PAGE_SIZE
        return BalloonStatus(
            device.target_pages // pages_per_mib, device.actual_pages // pages_per_mib, device.stats()
        )

    def _require_started_device(self, kind: type[_D], needs: str) -> _D:
        if self.state not in (VmmState.RUNNING, VmmState.PAUSED):
            raise VmStateError(f"needs a started VM, not {self.state.value}")
        device = self._find_device(kind)
        if device is None:
            raise ConfigError(f"this VM has no {kind.__name__} (configure it with {needs})")
        return device

    def _start_threads(self, *, paused: bool = False) -> None:
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
        self.state = VmmState.PAUSED if paused else VmmState.RUNNING
        loop.start()
        for t in self._threads:
            t.start(paused=paused)
        vsock = self._find_device(VirtioVsock)
        if vsock is not None and self._threads:
            # the guest's answers are awaited on its own clock: not refused for a host CPU it did not get
            vsock.muxer.clock = GuestClock(self._threads[0].thread.native_id).now

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
        for vcpu in self._vcpus:  # the guest's kvmclock then knows it was stopped (no soft-lockup report)
            with contextlib.suppress(KvmError):  # EINVAL until the guest enabled kvmclock
                vcpu.kvmclock_ctrl()

    def resume(self) -> None:
        """Resume after `pause`."""
        self._require(VmmState.PAUSED)
        for t in self._threads:
            t.resume()
        self.state = VmmState.RUNNING

    # --- snapshot and restore ------------------------------------------------------------------------
    def snapshot(self, directory: str | os.PathLike[str]) -> None:
        """Write this paused VM into ``directory`` (created; it must not exist): guest RAM (sparse
        files), every vCPU's and the VM's KVM state, the serial console's and each virtio device's
        registers and queues. The event thread serves no device meanwhile, so memory and device state
        agree. The VM stays paused (`resume` or `close` it). Raises `SnapshotError` (nothing is left
        behind) or `VmStateError` unless paused."""
        self._require(VmmState.PAUSED)
        assert self.config is not None and self.memory is not None and self.vm is not None
        if len(self._mmio_slots) != len(self._virtio):
            raise SnapshotError(
                "a device added with add_device (a factory, not a kata-virtio device) cannot be saved"
            )
        if self.config.memory_hotplug_mib:
            raise SnapshotError("a VM with memory hot-plug (virtio-mem) cannot be saved (not supported yet)")
        if len(self.machine.vcpus) != self.config.vcpus or len(self._specs) != len(self._virtio):
            raise SnapshotError("a VM with hot-plugged vCPUs or devices cannot be saved (not supported yet)")
        path = Path(directory)
        try:
            path.mkdir(mode=0o700)
        except OSError as err:
            raise SnapshotError(f"cannot create snapshot directory {path}: {err.strerror}") from err
        try:
            self._write_snapshot(path)
        except BaseException as err:
            shutil.rmtree(path, ignore_errors=True)
            if isinstance(err, (KvmError, OSError, ValueError)):
                raise SnapshotError(f"snapshot failed: {err}") from err
            raise

    def _write_snapshot(self, path: Path) -> None:
        assert self.config is not None and self.memory is not None and self.vm is not None
        assert self.kvm is not None and self.serial is not None
        memory = self.memory
        names = [snap.memory_file_name(i) for i in range(len(memory.regions))]
        fds = [os.open(path / n, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600) for n in names]
        captured: dict[str, Any] = {}

        def capture() -> None:
            # on the event thread (or in place without one): no device runs while memory is copied
            memory.save(fds)
            captured["devices"] = [
                {
                    "slot": slot.index,
                    "spec": snap.spec_to_json(spec) if spec else {"kind": snap.device_kind(dev.device)},
                    "transport": dev.transport.save(),
                }
                for slot, spec, dev in zip(self._virtio_slots(), self._specs, self._virtio, strict=True)
            ]
            captured["serial"] = self.serial.save_state() if self.serial else {}

        try:
            run_on_loop(self.event_loop, capture)
            for fd in fds:
                os.fsync(fd)
                os.fchmod(fd, 0o400)  # clones map it: a page no clone wrote yet is the file's
        finally:
            for fd in fds:
                os.close(fd)
        msr_indices = snap.msrs_to_save(self.kvm)
        manifest = {
            "config": {
                "vcpus": self.config.vcpus,
                "memory_mib": self.config.memory_mib,
                "kernel": str(self.config.kernel),
                "initrd": str(self.config.initrd) if self.config.initrd else None,
                "cmdline": self.config.cmdline,
            },
            "memory": [
                {"guest_addr": r.guest_addr, "size": r.size, "file": n}
                for r, n in zip(memory.regions, names, strict=True)
            ],
            "vm": snap.save_vm(self.vm),
            "vcpus": [snap.save_vcpu(v, msr_indices) for v in self._vcpus],
            **captured,
        }
        snap.write_manifest(path, manifest)

    def _virtio_slots(self) -> list[MmioSlot]:
        by_base: dict[int, MmioSlot] = {s.base: s for s in self._mmio_slots}
        return [by_base[d.base] for d in self._virtio]

    @classmethod
    def restore(cls, directory: str | os.PathLike[str], config: VmConfig | None = None) -> Vmm:
        """A new VM made from the snapshot in ``directory``, PAUSED as the snapshot was taken: RAM maps
        the memory files copy-on-write, vCPUs, irqchip, PIT, clock, console and virtio devices are as
        saved. `resume` runs it.

        ``config`` gives what is the restoring process's own: console output/input and the device specs
        (e.g. another vsock socket path per clone, a copy of a disk), which must be of the saved kinds in
        the saved order; its vCPU count and memory size must be the snapshot's (kernel, initrd and command
        line are ignored). Without it, `snapshot_config` (the saved values, no console). A snapshot of
        another format version, a corrupt one, or one that does not fit raises `SnapshotError`, and
        nothing (fd, thread, mapping, socket) is left behind."""
        path = Path(directory)
        manifest = snap.read_manifest(path)
        if config is None:
            config = snapshot_config(path, manifest)
        vmm = cls()
        try:
            vmm._restore(path, manifest, config)
        except BaseException as err:
            vmm.close()
            for spec in config.devices[len(vmm._specs) :]:
                spec.release()  # what the specs not built hold (a NetSpec's open tap), as VmmBuilder does
            if isinstance(err, SnapshotError):
                raise
            # AttributeError: a manifest member of the wrong JSON type (a list where an object belongs)
            wrapped = (VmmError, VirtioError, OSError, LookupError, TypeError, ValueError, AttributeError)
            if isinstance(err, wrapped):
                raise SnapshotError(f"cannot restore {path}: {err}") from err
                raise SnapshotError(f"cannot restore {path}: {err}") from err
            raise
        return vmm

    def _restore(self, path: Path, manifest: dict[str, Any], config: VmConfig) -> None:
        t0 = time.monotonic()
        saved = manifest.get("config", {})
        if config.memory_hotplug_mib:
            raise SnapshotError(
                "a VM with memory hot-plug (virtio-mem) cannot be restored (not supported yet)"
            )
        if (config.vcpus, config.memory_mib) != (saved.get("vcpus"), saved.get("memory_mib")):
            raise SnapshotError(
                f"the snapshot has {saved.get('vcpus')} vCPUs and {saved.get('memory_mib')} MiB, "
                f"the config {config.vcpus} and {config.memory_mib}"
            )
        devices = manifest["devices"]
        kinds = [d["spec"]["kind"] for d in devices]
        if kinds != [snap.spec_kind(s) for s in config.devices]:
            raise SnapshotError(
                f"the snapshot has devices {kinds}, the config {[snap.spec_kind(s) for s in config.devices]}"
            )
        if not isinstance(manifest["vcpus"], list) or len(manifest["vcpus"]) != config.vcpus:
            raise SnapshotError("the snapshot's vCPU states do not match its vCPU count")
        regions = manifest["memory"]
        layout = ram_ranges(config.memory_mib * MiB)
        if (
            not isinstance(regions, list)
            or [(m.get("guest_addr"), m.get("size")) if isinstance(m, dict) else m for m in regions] != layout
        ):
            raise SnapshotError("the snapshot's memory regions are not this VM's layout")
        fds: list[int] = []
        self.state = VmmState.CONFIGURED  # what close() releases from here on
        self.config = config
        try:
            for region in regions:
                fds.append(self._open_memory_file(path, region))
            self.machine.create(
                config, on_reset=self._guest_reset, on_power_off=self._guest_power_off, memory_files=fds
            )
        finally:
            for fd in fds:
                os.close(fd)
        assert self.memory is not None and self.vm is not None
        for spec, saved_dev in zip(config.devices, devices, strict=True):
            self.machine.add_virtio(build_device(spec), MmioSlot.at(snap._uint(saved_dev["slot"], 8, "slot")))
            self._specs.append(spec)
        snap.restore_vm(self.vm, manifest["vm"])
        for vcpu, state in zip(self.machine.create_vcpus(config.vcpus), manifest["vcpus"], strict=True):
            snap.restore_vcpu(vcpu, state)
        self.guest_vcpus = set(range(config.vcpus))
        for dev, saved_dev in zip(self._virtio, devices, strict=True):
            dev.transport.restore(saved_dev["transport"])
        assert self.serial is not None
        self.serial.restore_state(manifest["serial"])
        self._setup["restore"] = time.monotonic() - t0
        install_kick_handler()
        self._start_threads(paused=True)
        for dev in self._virtio:
            # a kick the guest made just before the pause may not have reached the saved device: ring
            # every doorbell once (a spurious notification only makes a device look at its rings)
            if dev.transport.activated:
                for bell in dev.doorbells:
                    bell.write(1)

    @staticmethod
    def _open_memory_file(path: Path, region: dict[str, Any]) -> int:
        name = region.get("file") if isinstance(region, dict) else None
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise SnapshotError(f"memory region entry {region!r} names no file of the snapshot")
        try:
            return os.open(path / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as err:
            raise SnapshotError(f"cannot open memory file {path / name}: {err.strerror}") from err

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
            virtio_fs={
                d.device.tag: d.device.server.statistics()
                for d in self._virtio
                if isinstance(d.device, VirtioFs)
            },
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
        errors: list[BaseException] = []  # collected so one failure does not stop the rest
        self.machine.stop_devices(errors)
        if self._restore_input_blocking is not None:
            fd, blocking = self._restore_input_blocking
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)
            self._restore_input_blocking = None
        self.machine.release(errors)

    def _require(self, state: VmmState) -> None:
        if self.state is not state:
            raise VmStateError(f"operation needs a {state.value} VM; this one is {self.state.value}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def snapshot_config(directory: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> VmConfig:
    """The `VmConfig` a snapshot was taken with (no console; device specs as recorded), for
    `Vmm.restore`; change what a clone needs with `dataclasses.replace`."""
    if manifest is None:
        manifest = snap.read_manifest(Path(directory))
    try:
        saved = manifest["config"]
        return VmConfig(
            kernel=Path(saved["kernel"]),
            initrd=Path(saved["initrd"]) if saved.get("initrd") else None,
            cmdline=str(saved["cmdline"]),
            vcpus=snap._uint(saved["vcpus"], 8, "vcpus"),
            memory_mib=snap._uint(saved["memory_mib"], 32, "memory_mib"),
            devices=[snap.spec_from_json(d["spec"]) for d in manifest["devices"]],
        )
    except (KeyError, TypeError) as err:
        raise SnapshotError(f"snapshot config is incomplete: {err!r}") from err
