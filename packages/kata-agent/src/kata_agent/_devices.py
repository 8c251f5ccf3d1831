"""CreateContainerRequest.devices: guest device nodes made visible inside the container."""

from __future__ import annotations

import os
import stat
from typing import Any

import trio

from kata_proto import ttrpc

#: Device types whose `vm_path` is a node (or a /dev/disk/by-path name) in the guest.
BLOCK_DEVICE_TYPES = ("blk", "mmioblk", "virtio-blk")


def guest_block_node(name: str) -> str:
    """The guest node a block device's name means: a /dev path, or a PCI path/virtio-mmio address that names
    one under /dev/disk/by-path (how kata-agent's device handlers find it); NotFound otherwise."""
    if name.startswith("/dev/"):
        return name
    by_path = os.path.join("/dev/disk/by-path", name)
    if os.path.exists(by_path):
        return os.path.realpath(by_path)
    raise ttrpc.NotFound(f"block device {name!r} not found in the guest")


#: Seconds a hot-plugged block device's node may take to appear (upstream's default hotplug_timeout).
HOTPLUG_TIMEOUT = 3.0


async def wait_for_devices(devices: list[Any], timeout: float = HOTPLUG_TIMEOUT) -> None:  # noqa: ASYNC109
    """Give each block device's guest node up to ``timeout`` seconds to appear (a hot-plugged disk's
    driver may still be probing when CreateContainer comes); `add_devices` reports what is still missing."""
    with trio.move_on_after(timeout):
        for dev in devices:
            if dev.type not in BLOCK_DEVICE_TYPES:
                continue
            while True:
                try:
                    node = guest_block_node(dev.vm_path)
                except ttrpc.NotFound:
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
