"""The pod's one /dev/shm: a guest tmpfs sized from the sandbox's OCI spec, shared by its containers.

As upstream does, the sandbox container's ``/dev/shm`` mount gives the size: containerd's CRI plugin
binds a host tmpfs there (``.../sandboxes/<id>/shm``, sized from the pod's ``shm_size``), so its
statfs(2) size is the pod's; a tmpfs mount states it as ``size=``. Nothing usable gives upstream's
default, 64 MiB. CreateSandbox gets an ``ephemeral`` tmpfs storage of that size at
``/run/kata-containers/sandbox/shm`` and every container binds it on its own ``/dev/shm``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from kata_resources._share_fs import StorageSpec

#: Where the agent mounts the pod's shm tmpfs in the guest.
GUEST_SANDBOX_SHM = "/run/kata-containers/sandbox/shm"
#: upstream's DefaultShmSize
DEFAULT_SHM_SIZE = 64 << 20

_SIZE = re.compile(r"^(\d+)([kKmMgG]?)$")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _size_option(options: Iterable[str]) -> int | None:
    for opt in options:
        if opt.startswith("size="):
            found = _SIZE.match(opt.removeprefix("size="))
            if found:
                return int(found.group(1)) * _UNITS[found.group(2).lower()]
    return None


def pod_shm_size(mounts: Iterable[dict[str, Any]], default: int = DEFAULT_SHM_SIZE) -> int:
    """The size of the pod's /dev/shm from the sandbox container's OCI ``mounts``."""
    for mount in mounts:
        if mount.get("destination") != "/dev/shm":
            continue
        options = list(mount.get("options") or [])
        size = _size_option(options)
        if size:
            return size
        source = mount.get("source") or ""
        if (mount.get("type") == "bind" or "bind" in options or "rbind" in options) and source.startswith(
            "/"
        ):
            try:
                st = os.statvfs(source)
            except OSError:
                return default
            return st.f_blocks * st.f_frsize or default
    return default


def pod_shm_storage(size: int) -> StorageSpec:
    """The CreateSandbox storage: a tmpfs of ``size`` bytes at `GUEST_SANDBOX_SHM`."""
    return StorageSpec(
        driver="ephemeral",
        source="shm",
        fstype="tmpfs",
        mount_point=GUEST_SANDBOX_SHM,
        options=("noexec", "nosuid", "nodev", "mode=1777", f"size={size}"),
    )


def pod_shm_mount() -> dict[str, Any]:
    """The OCI mount that puts the pod's shm on a container's /dev/shm."""
    return {"destination": "/dev/shm", "type": "bind", "source": GUEST_SANDBOX_SHM, "options": ["rbind"]}
