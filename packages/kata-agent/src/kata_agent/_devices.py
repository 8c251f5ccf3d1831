"""CreateContainerRequest.devices: guest device nodes made visible inside the container."""

from __future__ import annotations

import glob
import os
import re
import stat
from collections.abc import Iterable
from typing import Any

import trio

from kata_proto import ttrpc

#: Device types whose `vm_path` is a node (or a /dev/disk/by-path name) in the guest.
BLOCK_DEVICE_TYPES = ("blk", "mmioblk", "virtio-blk")
#: Storage drivers whose `source` names a block device.
BLOCK_STORAGE_DRIVERS = ("blk", "mmioblk")
#: sysfs directory of PCI domain 0's root bus, where a PCI path starts.
PCI_ROOT = "/sys/devices/pci0000:00"
#: Where the guest's block device nodes are (devtmpfs).
DEV_DIR = "/dev"
#: A PCI path as upstream's PciPath writes it: the slot on the root bus, then the slot behind each bridge
#: (hex, function 0 implied), e.g. "1b/00" for the device behind the root port in slot 0x1b.
_PCI_PATH = re.compile(r"^[0-9a-fA-F]{2}(/[0-9a-fA-F]{2}){0,7}$")


def pci_device_sysfs(pci_path: str, root: str = "") -> str:
    """The sysfs directory of the PCI device at ``pci_path``: from the root bus, each bridge's ``pci_bus/``
    names the bus behind it (how kata-agent's ``pcipath_to_sysfs`` walks it); NotFound when a step is
    missing (not plugged yet)."""
    if not _PCI_PATH.match(pci_path):
        raise ttrpc.InvalidArgument(f"PCI path {pci_path!r} is not bb/dd/... (hex slots)")
    root = root or PCI_ROOT
    bus = os.path.basename(root).removeprefix("pci")
    path = root
    slots = pci_path.lower().split("/")
    for n, slot in enumerate(slots):
        if int(slot, 16) > 0x1F:
            raise ttrpc.InvalidArgument(f"PCI path {pci_path!r}: slot {slot} over 1f")
        path = os.path.join(path, f"{bus}:{slot}.0")
        if n == len(slots) - 1:
            break
        try:
            buses = os.listdir(os.path.join(path, "pci_bus"))
        except OSError as err:
            raise ttrpc.NotFound(f"PCI path {pci_path!r}: no bus behind {path}") from err
        if len(buses) != 1:
            raise ttrpc.NotFound(f"PCI path {pci_path!r}: {len(buses)} buses behind {path}")
        bus = buses[0]
    if not os.path.isdir(path):
        raise ttrpc.NotFound(f"PCI path {pci_path!r}: no device at {path}")
    return path


def pci_block_node(pci_path: str, root: str = "") -> str:
    """The /dev node of the virtio-blk disk at ``pci_path`` (``<device>/virtio<N>/block/<name>``); NotFound
    until the guest has probed it."""
    device = pci_device_sysfs(pci_path, root)
    names = sorted(glob.glob(os.path.join(glob.escape(device), "virtio*", "block", "*")))
    if not names:
        raise ttrpc.NotFound(f"block device at PCI path {pci_path!r} not found in the guest")
    return os.path.join(DEV_DIR, os.path.basename(names[0]))


def guest_block_node(name: str) -> str:
    """The guest node a block device's name means: a /dev path, a PCI path ("1b/00", through sysfs, as
    kata-agent's virtio-blk-pci handler), or a virtio-mmio address that names one under /dev/disk/by-path;
    NotFound otherwise."""
    if name.startswith("/dev/"):
        return name
    if _PCI_PATH.match(name):
        return pci_block_node(name)
    by_path = os.path.join("/dev/disk/by-path", name)
    if os.path.exists(by_path):
        return os.path.realpath(by_path)
    raise ttrpc.NotFound(f"block device {name!r} not found in the guest")


#: Seconds a hot-plugged block device's node may take to appear (upstream's default hotplug_timeout).
HOTPLUG_TIMEOUT = 3.0


async def wait_for_devices(devices: list[Any], timeout: float = HOTPLUG_TIMEOUT) -> None:  # noqa: ASYNC109
    """Give each block device's guest node up to ``timeout`` seconds to appear (a hot-plugged disk's
    driver may still be probing when CreateContainer comes); `add_devices` reports what is still missing."""
    await wait_for_block_nodes((d.vm_path for d in devices if d.type in BLOCK_DEVICE_TYPES), timeout)


async def wait_for_storages(storages: list[Any], timeout: float = HOTPLUG_TIMEOUT) -> None:  # noqa: ASYNC109
    """As `wait_for_devices`, for the block storages' sources (a hot-plugged rootfs disk)."""
    await wait_for_block_nodes((s.source for s in storages if s.driver in BLOCK_STORAGE_DRIVERS), timeout)


async def wait_for_block_nodes(names: Iterable[str], timeout: float = HOTPLUG_TIMEOUT) -> None:  # noqa: ASYNC109
    """Until each name resolves (`guest_block_node`) to a node that exists, or ``timeout`` passed."""
    with trio.move_on_after(timeout):
        for name in names:
            while True:
                try:
                    node = guest_block_node(name)
                except ttrpc.NotFound:  # not there yet (InvalidArgument: never; it goes up)
                    node = ""
                if node and await trio.Path(node).exists():
                    break
                await trio.sleep(0.05)


def add_devices(config: dict[str, Any], devices: list[Any]) -> None:
    """Add each device to `linux.devices` (node in the container) and allow it in the device cgroup."""
    linux = config.setdefault("linux", {})
    for dev in devices:
        if dev.type not in BLOCK_DEVICE_TYPES:
            raise ttrpc.InvalidArgument(f"unsupported device type {dev.type!r}")
        if not dev.container_path.startswith("/"):
            raise ttrpc.InvalidArgument(f"device container_path {dev.container_path!r} is not absolute")
        node = guest_block_node(dev.vm_path)
        try:
            st = os.stat(node)
        except FileNotFoundError as err:
            raise ttrpc.NotFound(f"device {dev.vm_path!r} not found in the guest") from err
        if not stat.S_ISBLK(st.st_mode):
            raise ttrpc.InvalidArgument(f"{node} is not a block device")
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        linux.setdefault("devices", []).append(
            {
                "path": dev.container_path,
                "type": "b",
                "major": major,
                "minor": minor,
                "fileMode": stat.S_IMODE(st.st_mode),
                "uid": 0,
                "gid": 0,
            }
        )
        rules = linux.setdefault("resources", {}).setdefault("devices", [])
        rules.append({"allow": True, "type": "b", "major": major, "minor": minor, "access": "rwm"})
