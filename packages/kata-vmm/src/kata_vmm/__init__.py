"""A pure-Python KVM VMM (our Dragonball): KVM bindings, guest memory, vCPUs, boot, ACPI, legacy devices."""

from kata_virtio import FsPolicy, VirtioError, open_tap
from kata_vmm.__about__ import __version__
from kata_vmm._builder import VmmBuilder
from kata_vmm._bus import Bus, BusDevice
from kata_vmm._errors import (
    ConfigError,
    GuestCrashError,
    GuestMemoryError,
    KernelLoadError,
    KvmError,
    SnapshotError,
    VmmError,
    VmStateError,
)
from kata_vmm._event_loop import EventLoop
from kata_vmm._eventfd import EventFd, IoEventFd, IrqFd
from kata_vmm._kvm import Kvm, Vcpu, Vm
from kata_vmm._layout import VIRTIO_MMIO_SLOTS, virtio_mmio_slot
from kata_vmm._machine import MmioSlot, VmConfig
from kata_vmm._memory import GuestAddress, GuestMemoryMmap
from kata_vmm._snapshot import SNAPSHOT_VERSION
from kata_vmm._specs import BlockSpec, DeviceSpec, FsSpec, NetSpec, RngSpec, VsockSpec
from kata_vmm._vcpu import ExitKind, GuestExit, VcpuState, install_kick_handler
from kata_vmm._vmm import Vmm, VmmState, VmmStatistics, snapshot_config

__all__ = [
    "SNAPSHOT_VERSION",
    "VIRTIO_MMIO_SLOTS",
    "BlockSpec",
    "Bus",
    "BusDevice",
    "ConfigError",
    "DeviceSpec",
    "EventFd",
    "EventLoop",
    "ExitKind",
    "FsPolicy",
    "FsSpec",
    "GuestAddress",
    "GuestCrashError",
    "GuestExit",
    "GuestMemoryError",
    "GuestMemoryMmap",
    "IoEventFd",
    "IrqFd",
    "KernelLoadError",
    "Kvm",
    "KvmError",
    "MmioSlot",
    "NetSpec",
    "RngSpec",
    "SnapshotError",
    "Vcpu",
    "VcpuState",
    "VirtioError",
    "Vm",
    "VmConfig",
    "VmStateError",
    "Vmm",
    "VmmBuilder",
    "VmmError",
    "VmmState",
    "VmmStatistics",
    "VsockSpec",
    "__version__",
    "install_kick_handler",
    "open_tap",
    "snapshot_config",
    "virtio_mmio_slot",
]
