"""A container's block devices (OCI ``linux.devices`` of type "b") and block rootfs, hot-plugged into the
pod's VM.

As runtime-rs does for a raw block volume or ``ctr run --device``: the host device is found by its
major:minor (the OCI entry names only the container path), hot-plugged as virtio-blk
(`Hypervisor.add_device` of a `BlockDevice`), and CreateContainer's ``devices`` tell the agent which guest
node to show at the container path (type ``mmioblk`` on virtio-mmio, ``blk`` on PCI; the guest node's own
major:minor replaces the host's). Removed again with the container.

A rootfs that containerd hands over as one mount of a host block device (a block snapshotter such as
devmapper: ``ext4`` on ``/dev/dm-N``) is hot-plugged the same way and mounted by the agent (a ``mmioblk``
Storage) on the container's usual rootfs path, whose directory the host creates in the share (runtime-rs's
``BlockRootfs``); nothing is mounted on the host.

Upstream runtime-rs takes only a block device node there. We also take, by our own choice, one mount of a
filesystem whose source is a regular file with the ``loop`` option: what containerd 2.x's ``blockfile``
snapshotter returns (``ext4`` on ``<root>/snapshots/<id>``, options ``loop`` plus ``rw`` or ``ro``). The
file itself is the virtio-blk disk (no host loop device, no host mount); the back-end opens it without
following a symlink (`BlockDevice.follow_symlinks` False) and a symlink there is not taken at all. Options
only the host's mount(8) understands (``loop``, ``x-*``) are not handed to the guest's mount(2), which
would refuse them.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kata_agent_client import Device, Storage
from kata_shim.hypervisor._base import BlockDevice, Hypervisor, HypervisorError
from kata_shim.runtime._base import InvalidArgument, RootfsMount

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


#: Mount options for the host's mount(8), never the kernel's (mount(8): ``x-*`` are for userspace too).
HOST_ONLY_OPTIONS = frozenset({"loop"})


def guest_mount_options(options: Sequence[str]) -> list[str]:
    """``options`` without the host-only ones (`HOST_ONLY_OPTIONS`, ``x-*``), for the guest's mount(2)."""
    return [o for o in options if o not in HOST_ONLY_OPTIONS and not o.lower().startswith("x-")]


def is_loop_file_mount(mount: RootfsMount) -> bool:
    """A mount of a regular file (not a symlink to one) with the ``loop`` option: blockfile's snapshot."""
    if "loop" not in mount.options:
        return False
    try:
        return stat.S_ISREG(os.lstat(mount.source).st_mode)
    except (OSError, ValueError):
        return False


def block_rootfs_source(rootfs: Sequence[RootfsMount]) -> Path | None:
    """The host block device (runtime-rs ``is_block_rootfs``) or loop file (`is_loop_file_mount`: our
    addition, see the module) of a rootfs that is one mount of one."""
    if len(rootfs) != 1 or rootfs[0].type in ("bind", "overlay", "") or rootfs[0].target:
        return None
    if is_loop_file_mount(rootfs[0]):
        return Path(rootfs[0].source)
    try:
        st = os.stat(rootfs[0].source)  # devmapper's /dev/mapper/NAME is a symlink to /dev/dm-N
    except (OSError, ValueError):
        return None
    return Path(rootfs[0].source) if stat.S_ISBLK(st.st_mode) else None


async def plug_block_rootfs(
    hv: Hypervisor, container_id: str, rootfs: RootfsMount, guest_root: str, plugged: PluggedDevices
) -> Storage:
    """Hot-plug the rootfs' block device (added to ``plugged``) and return the Storage that has the agent
    mount it at ``guest_root``."""
    caps = hv.capabilities()
    device = BlockDevice(
        Path(rootfs.source),
        read_only="ro" in rootfs.options,
        device_id=f"{container_id}:rootfs",
        follow_symlinks=not is_loop_file_mount(rootfs),
    )
    info = await hv.add_device(device)
    plugged.block.append(device)
    driver = "mmioblk" if caps.device_addressing == "mmio" else "blk"
    source = info.guest_path or info.pci_path
    log.info(
        "container %s: rootfs %s (%s) is %s in the guest", container_id, rootfs.source, rootfs.type, source
    )
    options = guest_mount_options(rootfs.options)
    return Storage(driver, guest_root, source=source, fstype=rootfs.type, options=options)


async def plug_block_devices(
    hv: Hypervisor, container_id: str, spec: dict[str, Any], plugged: PluggedDevices
) -> None:
    """Hot-plug each block device of ``spec`` (added to ``plugged``, also when a later one fails: the
    caller unplugs them) and say in ``plugged.agent`` what the agent is to show where (`InvalidArgument`,
    `HypervisorError`)."""
    entries = block_entries(spec)
    if not entries:
        return
    caps = hv.capabilities()
    if not caps.block_device_hotplug:
        raise InvalidArgument(
            f"container {container_id}: block devices need block hot-plug, which {hv.name} does not have"
        )
    kind = "mmioblk" if caps.device_addressing == "mmio" else "blk"
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
        log.info("container %s: %s (host %s) is %s in the guest", container_id, path, device.path, vm_path)


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
