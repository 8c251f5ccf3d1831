"""The sandbox's shared directory: what the host shares with the guest through virtio-fs, and where.

Host side: ``<host_root>/<sandbox id>/shared`` is exported under the virtio-fs tag ``kataShared``;
the guest agent mounts that tag at ``/run/kata-containers/shared/containers`` (a CreateSandbox storage).
A container's rootfs is mounted on the host at ``shared/<cid>/rootfs`` and is seen in the guest at
``/run/kata-containers/shared/containers/<cid>/rootfs``; its shared volumes go to ``shared/<cid>/volumes``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kata_resources._errors import ResourceError
from kata_resources._mount import mounts_below

KATA_SHARED_TAG = "kataShared"
"""The virtio-fs tag of the shared directory (upstream's name)."""
HOST_SHARED_ROOT = Path("/run/kata-containers/shared/sandboxes")
GUEST_SHARED_DIR = "/run/kata-containers/shared/containers"
"""Where the guest agent mounts the shared directory."""


@dataclass(frozen=True)
class StorageSpec:
    """A storage for the agent's CreateSandbox/CreateContainer (grpc.Storage's fields)."""

    driver: str
    source: str
    fstype: str
    mount_point: str
    options: tuple[str, ...] = ()
    driver_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShareLayout:
    """Paths of one sandbox's shared directory, on the host and in the guest."""

    sandbox_id: str
    host_root: Path = HOST_SHARED_ROOT
    guest_dir: str = GUEST_SHARED_DIR
    mount_tag: str = KATA_SHARED_TAG
    _checked: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.sandbox_id or "/" in self.sandbox_id or self.sandbox_id in {".", ".."}:
            raise ResourceError(f"invalid sandbox id {self.sandbox_id!r}")

    @property
    def sandbox_dir(self) -> Path:
        """``<host_root>/<sandbox id>``: everything this layout creates is below it."""
        return self.host_root / self.sandbox_id

    @property
    def shared_dir(self) -> Path:
        """The host directory exported to the guest."""
        return self.sandbox_dir / "shared"

    def container_dir(self, container_id: str) -> Path:
        """``shared/<cid>`` on the host."""
        _check_name(container_id)
        return self.shared_dir / container_id

    def rootfs_host_path(self, container_id: str) -> Path:
        """Where the container's rootfs is mounted on the host."""
        return self.container_dir(container_id) / "rootfs"

    def rootfs_guest_path(self, container_id: str) -> str:
        """Where the guest sees the container's rootfs (the OCI root.path sent to the agent)."""
        _check_name(container_id)
        return f"{self.guest_dir}/{container_id}/rootfs"

    def guest_path(self, host_path: Path) -> str:
        """The guest's path of a host path below the shared directory."""
        try:
            rel = host_path.relative_to(self.shared_dir)
        except ValueError as err:
            raise ResourceError(f"{host_path} is not below {self.shared_dir}") from err
        return f"{self.guest_dir}/{rel}" if str(rel) != "." else self.guest_dir

    def sandbox_storage(self) -> StorageSpec:
        """The CreateSandbox storage that mounts the shared directory in the guest."""
        return StorageSpec("virtio-fs", self.mount_tag, "virtiofs", self.guest_dir)

    def create(self) -> Path:
        """Create the shared directory (mode 0750); returns it."""
        self.shared_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        return self.shared_dir

    def remove(self) -> None:
        """Remove the sandbox's directory; `ResourceError` if anything is still mounted below it
        (removing through a mount would delete the container's files)."""
        left = mounts_below(self.sandbox_dir)
        if left:
            raise ResourceError(f"still mounted below {self.sandbox_dir}: {', '.join(left)}")
        shutil.rmtree(self.sandbox_dir, ignore_errors=True)
        # The per-sandbox root (…/sandboxes) stays: other sandboxes share it.

    def remove_container(self, container_id: str) -> None:
        """Remove ``shared/<cid>``; `ResourceError` if something is still mounted below it."""
        directory = self.container_dir(container_id)
        left = mounts_below(directory)
        if left:
            raise ResourceError(f"still mounted below {directory}: {', '.join(left)}")
        shutil.rmtree(directory, ignore_errors=True)


def _check_name(name: str) -> None:
    if not name or "/" in name or name in {".", ".."}:
        raise ResourceError(f"invalid container id {name!r}")
