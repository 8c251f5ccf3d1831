"""The hypervisor interface (`Hypervisor`, `Capabilities`, `HypervisorConfig`, device specs) and the back-end
registry."""

from kata_shim.hypervisor._base import (
    AgentTransport,
    BlockDevice,
    Capabilities,
    Device,
    DeviceAddressing,
    DeviceInfo,
    HotplugKind,
    Hypervisor,
    HypervisorConfig,
    HypervisorError,
    HypervisorFactory,
    MemoryConfig,
    NetworkDevice,
    ShareFsDevice,
)
from kata_shim.hypervisor._common import boot_report
from kata_shim.hypervisor._registry import HYPERVISORS, hypervisor_factory, new_hypervisor

__all__ = [
    "HYPERVISORS",
    "AgentTransport",
    "BlockDevice",
    "Capabilities",
    "Device",
    "DeviceAddressing",
    "DeviceInfo",
    "HotplugKind",
    "Hypervisor",
    "HypervisorConfig",
    "HypervisorError",
    "HypervisorFactory",
    "MemoryConfig",
    "NetworkDevice",
    "ShareFsDevice",
    "boot_report",
    "hypervisor_factory",
    "new_hypervisor",
]
