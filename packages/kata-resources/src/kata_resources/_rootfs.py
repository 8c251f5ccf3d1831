"""A container's rootfs on the host: containerd's mount list mounted at the shared directory."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from kata_resources._errors import ResourceError
from kata_resources._ledger import MountLedger
from kata_sys_util import MS_BIND, MS_RDONLY, parse_options


class MountLike(Protocol):
    """One of containerd's mounts (containerd.types.Mount, or kata_shim's RootfsMount)."""

    @property
    def type(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def options(self) -> Sequence[str]: ...


def mount_rootfs(
    mounts: Sequence[MountLike], target: Path, ledger: MountLedger, *, bundle_rootfs: Path | None = None
) -> None:
    """Mount containerd's rootfs mounts on `target` (created if missing), in order, as mount.All does.

    `target` is below the ledger's root; it and every sub-target (containerd 2's ``Mount.target``, inside
    a rootfs the guest writes) are opened beneath the root without following symlinks. With no mounts
    the rootfs is a directory that already exists (`bundle_rootfs`, e.g. the bundle's rootfs, which
    containerd mounted itself): it is bind-mounted. On failure the mounts made so far are undone.
    """
    ledger.mkdir(target)
    made = ledger.mark()
    try:
        if not mounts:
            if bundle_rootfs is None or not bundle_rootfs.is_dir():
                raise ResourceError(f"no rootfs mounts and no rootfs directory at {bundle_rootfs}")
            ledger.bind(bundle_rootfs, target)
            return
        for m in mounts:
            options = list(m.options)
            flags, data = parse_options(options)
            # containerd 2 mounts may name a target below the rootfs (``Mount.target``).
            sub = str(getattr(m, "target", "") or "").strip("/")
            if sub and (sub.startswith("..") or "/../" in f"/{sub}/"):
                raise ResourceError(f"rootfs mount target {sub!r} leaves the rootfs")
            point = target / sub if sub else target
            if sub:
                ledger.mkdir(point)
            if m.type == "bind" or flags & MS_BIND:
                ledger.bind(m.source, point, readonly=bool(flags & MS_RDONLY), recursive="rbind" in options)
            else:
                ledger.mount(m.source, point, m.type, flags, data)
    except BaseException:
        ledger.undo_since(made)
        raise
