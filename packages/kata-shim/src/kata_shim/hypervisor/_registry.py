"""Hypervisor back-ends by `[runtime] hypervisor_name`."""

from __future__ import annotations

from typing import cast

from kata_shim._lazy import load_entry
from kata_shim.hypervisor._base import Hypervisor, HypervisorConfig, HypervisorFactory

HYPERVISORS: dict[str, str] = {
    "dragonball": "kata_shim.hypervisor._dragonball:Dragonball",
    "qemu": "kata_shim.hypervisor._qemu:Qemu",
    "clh": "kata_shim.hypervisor._clh:CloudHypervisor",
    "firecracker": "kata_shim.hypervisor._firecracker:Firecracker",
}
"""`hypervisor_name` -> import string of a `HypervisorFactory` (a class taking a `HypervisorConfig`)."""


def hypervisor_factory(name: str) -> HypervisorFactory:
    """The back-end class for `name`; raises `UnknownNameError` (a KeyError) for an unknown name."""
    return cast(HypervisorFactory, load_entry(HYPERVISORS, name, "hypervisor"))


def new_hypervisor(name: str, config: HypervisorConfig) -> Hypervisor:
    """Build the back-end `name` for one VM (nothing runs until `prepare_vm`/`start_vm`)."""
    return hypervisor_factory(name)(config)
