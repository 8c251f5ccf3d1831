"""The hypervisor interface (`Hypervisor`, `HypervisorConfig`, device specs) and the back-end registry."""

from kata_shim.hypervisor._base import (
    BlockDevice,
    Device,
    DeviceInfo,
    Hypervisor,
    HypervisorConfig,
    HypervisorError,
    HypervisorFactory,
    NetworkDevice,
    ShareFsDevice,
)
from kata_shim.hypervisor._registry import HYPERVISORS, hypervisor_factory, new_hypervisor

__all__ = [
    "HYPERVISORS",
    "BlockDevice",
    "Device",
    "DeviceInfo",
    "Hypervisor",
    "HypervisorConfig",
    "HypervisorError",
    "HypervisorFactory",
    "NetworkDevice",
    "ShareFsDevice",
    "hypervisor_factory",
    "new_hypervisor",
]
