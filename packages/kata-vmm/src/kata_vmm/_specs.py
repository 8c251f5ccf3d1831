"""Device specs: what a virtio device is made of on the host, before anything is opened.

A spec is a frozen value (`VmConfig.devices`, `VmmBuilder.add_device`, the CLI's flags). `build()` opens its
host resources and returns the kata-virtio device; a spec that already holds one (a `NetSpec` with an open
tap ``fd``) gives it back with `release()` if it is never built. What a device needs from the host process
(virtio-fs: many fds) its spec's `build()` arranges, so the VMM treats every device alike.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from kata_sys_util import raise_nofile
from kata_virtio import (
    FsPolicy,
    VirtioBalloon,
    VirtioBlock,
    VirtioDevice,
    VirtioError,
    VirtioFs,
    VirtioNet,
    VirtioRng,
    VirtioVsock,
)
from kata_vmm._errors import ConfigError


@dataclass(frozen=True)
class VsockSpec:
    """Hybrid vsock: host clients connect to ``uds``; guest connections to port P go to ``<uds>_P``.

    ``connect_timeout``: seconds a host connection may wait for the guest to accept it (then it is closed).
    """

    uds: Path
    guest_cid: int = 3
    connect_timeout: float = 10.0

    def build(self) -> VirtioDevice:
        """Open the device (binds ``uds``)."""
        return VirtioVsock(self.uds, self.guest_cid, connect_timeout=self.connect_timeout)

    def release(self) -> None:
        """Nothing to give back: this spec holds no host resource before `build`."""


@dataclass(frozen=True)
class BlockSpec:
    """A raw image file as virtio-blk; with ``follow_symlinks`` False `build` refuses (ELOOP) a path whose
    last component is a symlink instead of following it."""

    path: Path
    read_only: bool = False
    follow_symlinks: bool = True

    def build(self) -> VirtioDevice:
        """Open the image."""
        return VirtioBlock(self.path, read_only=self.read_only, follow_symlinks=self.follow_symlinks)

    def release(self) -> None:
        """Nothing to give back: this spec holds no host resource before `build`."""


@dataclass(frozen=True)
class NetSpec:
    """virtio-net on tap ``tap`` (created if absent), optionally with a fixed MAC.

    With ``fd`` the tap is already open (e.g. opened inside another network namespace) and ``tap`` only
    names it; the device built takes the fd over (closing the device closes it)."""

    tap: str
    mac: str | None = None
    fd: int | None = None

    def build(self) -> VirtioDevice:
        """Open the tap (or wrap the open ``fd``, which the device then owns)."""
        if self.fd is not None:
            return VirtioNet(self.fd, self.mac)
        return VirtioNet.with_tap(self.tap, self.mac)

    def release(self) -> None:
        """Close ``fd`` (the spec owns it until a device is built from it)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)


@dataclass(frozen=True)
class FsSpec:
    """Inline virtio-fs sharing ``shared_dir`` under ``tag``; ``policy`` limits what the guest may create
    there (default: no device nodes, no setuid/setgid, no privileged xattrs, no chown)."""

    tag: str
    shared_dir: Path
    policy: FsPolicy = field(default_factory=FsPolicy)

    def build(self) -> VirtioDevice:
        """Open the shared directory."""
        if not self.shared_dir.is_dir():
            raise ConfigError(f"virtio-fs: {self.shared_dir} is not a directory")
        raise_nofile()  # the server holds an fd per inode and handle the guest knows
        return VirtioFs(self.tag, self.shared_dir, policy=self.policy)

    def release(self) -> None:
        """Nothing to give back: this spec holds no host resource before `build`."""


@dataclass(frozen=True)
class RngSpec:
    """virtio-rng fed from the host's getrandom()."""

    def build(self) -> VirtioDevice:
        """Create the device."""
        return VirtioRng()

    def release(self) -> None:
        """Nothing to give back: this spec holds no host resource before `build`."""


@dataclass(frozen=True)
class BalloonSpec:
    """virtio-balloon: the host asks for guest memory back (`Vmm.set_balloon`).

    ``stats_interval``: seconds between guest statistics refreshes (0: no statistics queue);
    ``free_page_reporting``: the guest reports free pages and the host discards them;
    ``deflate_on_oom``: the guest may deflate under memory pressure."""

    stats_interval: float = 0.0
    free_page_reporting: bool = False
    deflate_on_oom: bool = False

    def build(self) -> VirtioDevice:
        """Create the device (target 0: nothing inflated)."""
        return VirtioBalloon(
            stats_interval=self.stats_interval,
            free_page_reporting=self.free_page_reporting,
            deflate_on_oom=self.deflate_on_oom,
        )

    def release(self) -> None:
        """Nothing to give back: this spec holds no host resource before `build`."""


DeviceSpec = VsockSpec | BlockSpec | NetSpec | FsSpec | RngSpec | BalloonSpec
"""Every spec has `build()` (open host resources, return the device) and `release()` (give back what an
unbuilt spec holds)."""


def build_device(spec: DeviceSpec) -> VirtioDevice:
    """Open a spec's host resources; kata-virtio errors become `ConfigError`."""
    try:
        return spec.build()
    except VirtioError as err:
        raise ConfigError(str(err)) from err
    except OSError as err:
        raise ConfigError(f"{type(spec).__name__}: {err}") from err
