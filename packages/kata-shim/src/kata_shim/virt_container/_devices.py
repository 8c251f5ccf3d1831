"""A container's block devices (OCI ``linux.devices`` of type "b"), hot-plugged into the pod's VM.

As runtime-rs does for a raw block volume or ``ctr run --device``: the host device is found by its
major:minor (the OCI entry names only the container path), hot-plugged as virtio-blk
(`Hypervisor.add_device` of a `BlockDevice`), and CreateContainer's ``devices`` tell the agent which guest
node to show at the container path (type ``mmioblk`` on virtio-mmio, ``blk`` on PCI; the guest node's own
major:minor replaces the host's). Removed again with the container.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from kata_agent_client import Device
from kata_shim.hypervisor._base import BlockDevice, Hypervisor, HypervisorError
from kata_shim.runtime._base import InvalidArgument

log = logging.getLogger("kata_shim.virt_container")

SYS_DEV_BLOCK = Path("/sys/dev/block")


@dataclass
class PluggedDevices:
    """What one container hot-plugged: the back-end's devices, and the agent's view of them."""

    block: list[BlockDevice] = field(default_factory=list)
    agent: list[Device] = field(default_factory=list)


def block_entries(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``linux.devices`` entries of type "b" (block) of an OCI spec."""
    devices = (spec.get("linux") or {}).get("devices") or []
    return [d for d in devices if isinstance(d, dict) and d.get("type") == "b"]


def host_block_device(major: int, minor: int, sys_dev_block: Path = SYS_DEV_BLOCK) -> Path:
    """The host's /dev node of block device ``major:minor`` (its DEVNAME in sysfs, checked to be that
    device); `InvalidArgument` when the host has none."""
    try:
        uevent = (sys_dev_block / f"{major}:{minor}" / "uevent").read_text()
    except OSError as err:
        raise InvalidArgument(f"no host block device {major}:{minor}") from err
    names = [line.split("=", 1)[1] for line in uevent.splitlines() if line.startswith("DEVNAME=")]
    name = names[0] if names else ""
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise InvalidArgument(f"host block device {major}:{minor} has no usable name")
    node = Path("/dev") / name
    try:
        st = os.stat(node)
    except OSError as err:
        raise InvalidArgument(f"host block device {major}:{minor}: {node}: {err}") from err
    if not stat.S_ISBLK(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != (major, minor):
        raise InvalidArgument(f"{node} is not block device {major}:{minor}")
    return node


async def plug_block_devices(hv: Hypervisor, container_id: str, spec: dict[str, Any]) -> PluggedDevices:
    """Hot-plug each block device of ``spec`` and say what the agent is to show where; on failure what was
    plugged is removed again and the error raised (`InvalidArgument`, `HypervisorError`)."""
    plugged = PluggedDevices()
    entries = block_entries(spec)
    if not entries:
        return plugged
    caps = hv.capabilities()
    if not caps.block_device_hotplug:
        raise InvalidArgument(
            f"container {container_id}: block devices need block hot-plug, which {hv.name} does not have"
        )
    kind = "mmioblk" if caps.device_addressing == "mmio" else "blk"
    try:
        for entry in entries:
            path = entry.get("path")
            if not isinstance(path, str) or not path.startswith("/"):
                raise InvalidArgument(f"container {container_id}: device path {path!r} is not absolute")
            try:
                major, minor = int(entry["major"]), int(entry["minor"])
            except (KeyError, TypeError, ValueError) as err:
                raise InvalidArgument(f"container {container_id}: device {path}: no major/minor") from err
            device = BlockDevice(host_block_device(major, minor), device_id=f"{container_id}:{path}")
            info = await hv.add_device(device)
            plugged.block.append(device)
            vm_path = info.guest_path or info.pci_path
            plugged.agent.append(Device(vm_path=vm_path, container_path=path, type=kind, id=device.device_id))
            log.info(
                "container %s: %s (host %s) is %s in the guest", container_id, path, device.path, vm_path
            )
    except BaseException:
        with trio.CancelScope(shield=True):
            await unplug_block_devices(hv, container_id, plugged)
        raise
    return plugged


async def unplug_block_devices(hv: Hypervisor, container_id: str, plugged: PluggedDevices) -> list[str]:
    """Remove the container's hot-plugged block devices (the container is gone); the errors, as text."""
    errors = []
    for device in reversed(plugged.block):
        try:
            await hv.remove_device(device)
        except HypervisorError as err:
            errors.append(f"removing {device.path}: {err}")
    plugged.block.clear()
    plugged.agent.clear()
    if errors:
        log.warning("container %s: %s", container_id, "; ".join(errors))
    return errors


def without_block_entries(spec: dict[str, Any]) -> dict[str, Any]:
    """The guest spec without the host's block ``linux.devices`` (the agent adds the guest's own)."""
    linux = spec.get("linux")
    if not isinstance(linux, dict) or not block_entries(spec):
        return spec
    devices = [d for d in linux.get("devices") or [] if not (isinstance(d, dict) and d.get("type") == "b")]
    return {**spec, "linux": {**linux, "devices": devices}}
