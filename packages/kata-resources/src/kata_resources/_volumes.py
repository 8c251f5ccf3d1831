"""A container's OCI mounts, classified and rewritten for the guest.

- bind mounts of host paths: the source is bind-mounted into the shared directory (read-only when the
  OCI mount is) and the guest mount binds it from there (as runtime-rs's share_fs volumes do);
- /dev/shm bound from the host (CRI's sandbox shm): a tmpfs of the guest's own instead;
- proc, sysfs, tmpfs, devpts, mqueue, cgroup and the like: left to the guest unchanged.
"""

from __future__ import annotations

import enum
import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kata_resources._errors import VolumeError
from kata_resources._ledger import MountLedger
from kata_resources._share_fs import ShareLayout
from kata_sys_util import PROPAGATION

SHM_SIZE = "size=65536k"
"""Size of the guest's /dev/shm tmpfs when the host offered its own (containerd's default)."""


class VolumeKind(enum.Enum):
    """How an OCI mount reaches the guest."""

    SHARED = "shared"
    """A host path, shared through the shared directory."""
    SHM = "shm"
    """/dev/shm from the host: replaced by a guest tmpfs."""
    GUEST = "guest"
    """A filesystem the guest makes itself (proc, tmpfs, sysfs...)."""


@dataclass(frozen=True)
class VolumePlan:
    """One OCI mount and what happens to it."""

    kind: VolumeKind
    mount: dict[str, Any]


def _is_bind(m: dict[str, Any]) -> bool:
    options = m.get("options") or []
    return m.get("type") == "bind" or "bind" in options or "rbind" in options


def classify(mounts: Sequence[dict[str, Any]]) -> list[VolumePlan]:
    """Decide, per OCI mount, how it reaches the guest (pure: looks only at the JSON)."""
    plans = []
    for m in mounts:
        destination = str(m.get("destination", ""))
        if not destination.startswith("/"):
            raise VolumeError(f"OCI mount destination {destination!r} is not absolute")
        if _is_bind(m):
            kind = VolumeKind.SHM if destination == "/dev/shm" else VolumeKind.SHARED
        else:
            kind = VolumeKind.GUEST
        plans.append(VolumePlan(kind, dict(m)))
    return plans


def _share_name(source: str, destination: str) -> str:
    digest = hashlib.sha256(f"{source}\0{destination}".encode()).hexdigest()[:16]
    base = os.path.basename(destination.rstrip("/")) or "root"
    return f"{digest}-{base}"


def share_volumes(
    mounts: Sequence[dict[str, Any]], layout: ShareLayout, container_id: str, ledger: MountLedger
) -> list[dict[str, Any]]:
    """Make the host side of every mount and return the guest's OCI mount list, in the same order.

    Host bind sources are mounted (nosuid, nodev) under ``mounts/<cid>/volumes/`` through fds opened
    beneath the sandbox directory; on failure what was mounted is undone.
    """
    volumes = layout.container_dir(container_id) / "volumes"
    made = ledger.mark()
    guest: list[dict[str, Any]] = []
    try:
        for plan in classify(mounts):
            m = plan.mount
            if plan.kind is VolumeKind.GUEST:
                guest.append(m)
            elif plan.kind is VolumeKind.SHM:
                guest.append(
                    {
                        "destination": "/dev/shm",
                        "type": "tmpfs",
                        "source": "shm",
                        "options": ["nosuid", "noexec", "nodev", "mode=1777", SHM_SIZE],
                    }
                )
            else:
                guest.append(_share_bind(m, volumes, layout, ledger))
    except BaseException:
        ledger.undo_since(made)
        raise
    return guest


def _share_bind(m: dict[str, Any], volumes: Path, layout: ShareLayout, ledger: MountLedger) -> dict[str, Any]:
    source = str(m.get("source", ""))
    if not source.startswith("/"):
        raise VolumeError(f"bind source {source!r} of {m.get('destination')} is not an absolute host path")
    try:
        st = os.stat(source)
    except OSError as err:
        raise VolumeError(f"bind mount source {source}: {err.strerror}") from err
    if stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
        raise VolumeError(f"bind mount of device {source} is not supported (needs a guest device)")
    options = [str(o) for o in m.get("options") or []]
    readonly = "ro" in options
    target = volumes / _share_name(source, str(m["destination"]))
    if stat.S_ISDIR(st.st_mode):
        ledger.mkdir(target)
    else:
        ledger.touch(target)
    ledger.bind(source, target, readonly=readonly, recursive="rbind" in options or m.get("type") == "bind")
    # The guest binds a directory it already has: keep bind/ro, drop host propagation settings.
    guest_options = [o for o in options if o not in PROPAGATION]
    if "bind" not in guest_options and "rbind" not in guest_options:
        guest_options.insert(0, "rbind")
    return {
        "destination": m["destination"],
        "type": "bind",
        "source": layout.guest_path(target),
        "options": guest_options,
    }
