"""A pure-Python KVM VMM (our Dragonball): KVM bindings, guest memory, vCPUs, boot, ACPI, legacy devices.

Hot-plug through upcall (`hot_add_virtio`, `hot_remove_virtio`, `hot_add_vcpus`, `hot_remove_vcpus`,
`upcall_connector`) needs trio and is imported on first use: ``import kata_vmm`` does not import trio.
"""

from typing import TYPE_CHECKING, Any

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
from kata_vmm._specs import BalloonSpec, BlockSpec, DeviceSpec, FsSpec, NetSpec, RngSpec, VsockSpec
from kata_vmm._vcpu import ExitKind, GuestExit, VcpuState, install_kick_handler
from kata_vmm._vmm import BalloonStatus, HotplugMemoryStatus, Vmm, VmmState, VmmStatistics, snapshot_config

if TYPE_CHECKING:
    from kata_vmm._hotplug import (
        hot_add_vcpus,
        hot_add_virtio,
        hot_remove_vcpus,
        hot_remove_virtio,
        upcall_connector,
    )

_HOTPLUG_NAMES = frozenset(
    {"hot_add_vcpus", "hot_add_virtio", "hot_remove_vcpus", "hot_remove_virtio", "upcall_connector"}
)


def __getattr__(name: str) -> Any:
    # the trio-based hot-plug helpers on first use
    if name in _HOTPLUG_NAMES:
        from kata_vmm import _hotplug

        return getattr(_hotplug, name)
    raise AttributeError(f"module 'kata_vmm' has no attribute {name!r}")


__all__ = [
    "SNAPSHOT_VERSION",
    "VIRTIO_MMIO_SLOTS",
    "BalloonSpec",
    "BalloonStatus",
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
    "HotplugMemoryStatus",
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
    "hot_add_vcpus",
    "hot_add_virtio",
    "hot_remove_vcpus",
    "hot_remove_virtio",
    "install_kick_handler",
    "open_tap",
    "snapshot_config",
    "upcall_connector",
    "virtio_mmio_slot",
]
