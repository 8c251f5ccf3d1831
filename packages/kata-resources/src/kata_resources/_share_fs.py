"""The sandbox's shared directory: what the host shares with the guest through virtio-fs, and where.

The layout upstream adopted after CVE-2020-28914 (runtime-rs share_virtio_fs, the Go runtime's
"mounts"/"shared" pair), below ``<host_root>/<sandbox id>`` (mode 0700, host only):

- ``mounts/``: where the host mounts container rootfs and volumes (``mounts/<cid>/rootfs``,
  ``mounts/<cid>/volumes/<name>``) and stages whatever it writes for the guest. The guest never sees
  this path. It is a bind of itself with its own shared peer group, so mounts below it propagate.
- ``shared/``: a read-only, nosuid, nodev, recursive, slave bind of ``mounts/``: what virtio-fs exports
  under the tag ``kataShared``. The guest cannot create, rename or replace anything in it outside the
  rootfs and volume mounts themselves (which keep their own flags), so it can neither plant a symlink
  where the host will mount nor fill the host's /run.

The guest agent mounts the tag at ``/run/kata-containers/shared/containers``: a container's rootfs is
seen there as ``<cid>/rootfs``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import kata_sys_util as sys_util
from kata_resources._errors import ResourceError
from kata_resources._ledger import MountLedger
from kata_sys_util import MS_PRIVATE, MS_REC, MS_SHARED, MS_SLAVE

KATA_SHARED_TAG = "kataShared"
"""The virtio-fs tag of the shared directory (upstream's name)."""
HOST_SHARED_ROOT = Path("/run/kata-containers/shared/sandboxes")
GUEST_SHARED_DIR = "/run/kata-containers/shared/containers"
"""Where the guest agent mounts the shared directory."""
MOUNTS = "mounts"
SHARED = "shared"


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

    def __post_init__(self) -> None:
        if not self.sandbox_id or "/" in self.sandbox_id or self.sandbox_id in {".", ".."}:
            raise ResourceError(f"invalid sandbox id {self.sandbox_id!r}")

    @property
    def sandbox_dir(self) -> Path:
        """``<host_root>/<sandbox id>``: everything this layout creates is below it (the ledger's root)."""
        return self.host_root / self.sandbox_id

    @property
    def mounts_dir(self) -> Path:
        """``mounts/``: the host-only directory where rootfs and volumes are mounted."""
        return self.sandbox_dir / MOUNTS

    @property
    def shared_dir(self) -> Path:
        """``shared/``: the read-only view of ``mounts/`` exported to the guest."""
        return self.sandbox_dir / SHARED

    def container_dir(self, container_id: str) -> Path:
        """``mounts/<cid>`` on the host (seen by the guest as ``<guest_dir>/<cid>``)."""
        _check_name(container_id)
        return self.mounts_dir / container_id

    def rootfs_host_path(self, container_id: str) -> Path:
        """Where the container's rootfs is mounted on the host."""
        return self.container_dir(container_id) / "rootfs"

    def rootfs_guest_path(self, container_id: str) -> str:
        """Where the guest sees the container's rootfs (the OCI root.path sent to the agent)."""
        _check_name(container_id)
        return f"{self.guest_dir}/{container_id}/rootfs"

    def guest_path(self, host_path: Path) -> str:
        """The guest's path of a host path below ``mounts/``."""
        try:
            rel = host_path.relative_to(self.mounts_dir)
        except ValueError as err:
            raise ResourceError(f"{host_path} is not below {self.mounts_dir}") from err
        return f"{self.guest_dir}/{rel}" if str(rel) != "." else self.guest_dir

    def sandbox_storage(self) -> StorageSpec:
        """The CreateSandbox storage that mounts the shared directory in the guest."""
        return StorageSpec("virtio-fs", self.mount_tag, "virtiofs", self.guest_dir)

    def ledger(self, record: Path | None = None) -> MountLedger:
        """A ledger rooted at the sandbox directory (persisted to `record` if given)."""
        if record is None:
            return MountLedger(root=self.sandbox_dir)
        return MountLedger.to_file(record, root=self.sandbox_dir)

    def create(self, ledger: MountLedger | None = None) -> Path:
        """Create the layout: ``mounts/`` and its read-only slave view ``shared/``; returns ``shared/``
        (the directory to export). The two mounts go in `ledger` (its root must be the sandbox dir)."""
        if ledger is None:
            ledger = self.ledger()
        if ledger.root != self.sandbox_dir:
            raise ResourceError(f"ledger root {ledger.root} is not {self.sandbox_dir}")
        self.host_root.mkdir(parents=True, exist_ok=True, mode=0o711)
        try:
            self.sandbox_dir.mkdir(mode=0o700)
        except FileExistsError:
            if self.sandbox_dir.is_symlink() or not self.sandbox_dir.is_dir():
                raise ResourceError(f"{self.sandbox_dir} exists and is not a directory") from None
        made = ledger.mark()
        try:
            ledger.mkdir(MOUNTS, 0o755)
            ledger.mkdir(SHARED, 0o755)
            with ledger.root_fd() as root:
                mounts_fd = sys_util.open_beneath(root, MOUNTS)
            try:
                ledger.bind(mounts_fd, MOUNTS, recursive=False)
            finally:
                os.close(mounts_fd)
            # Its own peer group (private first: a bind of a shared /run would join the host's group).
            ledger.set_propagation(MOUNTS, MS_PRIVATE)
            ledger.set_propagation(MOUNTS, MS_SHARED)
            with ledger.root_fd() as root:
                mounts_fd = sys_util.open_beneath(root, MOUNTS)
            try:
                ledger.bind(mounts_fd, SHARED, readonly=True, recursive=True)
            finally:
                os.close(mounts_fd)
            ledger.set_propagation(SHARED, MS_SLAVE | MS_REC)
        except BaseException:
            ledger.undo_since(made)
            raise
        return self.shared_dir

    def _refuse_mounts_below(self, directory: Path, allowed: set[str]) -> None:
        left = [p for p in sys_util.mounts_below(directory) if p not in allowed]
        if left:
            raise ResourceError(f"still mounted below {directory}: {', '.join(left)}")

    def remove(self) -> None:
        """Take down ``shared/`` and ``mounts/`` and remove the sandbox's directory.

        `ResourceError` if a rootfs or volume is still mounted below it, or anything below it turns out
        to be a mount (removing through a mount would delete the container's or the host's files).
        """
        own = {str(self.mounts_dir), str(self.shared_dir)}
        self._refuse_mounts_below(self.sandbox_dir, own)
        try:
            root = os.open(self.sandbox_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            for name in (SHARED, MOUNTS):
                _umount_own(root, name)
        finally:
            os.close(root)
        self._remove_beneath(self.host_root, self.sandbox_id)
        # The per-sandbox root (…/sandboxes) stays: other sandboxes share it.

    def remove_container(self, container_id: str) -> None:
        """Remove ``mounts/<cid>``; `ResourceError` if something is still mounted below it."""
        directory = self.container_dir(container_id)
        self._refuse_mounts_below(directory, set())
        self._remove_beneath(self.sandbox_dir, f"{MOUNTS}/{container_id}")

    @staticmethod
    def _remove_beneath(parent: Path, rel: str) -> None:
        remove_tree(parent / rel, parent)


def remove_tree(path: Path, parent: Path | None = None) -> None:
    """Delete `path` (a file, a symlink itself or a tree) without following symlinks or crossing a mount.

    Everything is opened beneath `parent` (default: `path`'s parent, a trusted host directory).
    `ResourceError` naming what was left: a mount below `path` is never deleted through.
    """
    parent = parent if parent is not None else path.parent
    try:
        rel = str(path.relative_to(parent))
        fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except ValueError as err:
        raise ResourceError(f"{path} is not below {parent}") from err
    try:
        refused = sys_util.remove_beneath(fd, rel)
    except OSError as err:
        raise ResourceError(f"remove {path}: {err.strerror}") from err
    finally:
        os.close(fd)
    if refused:
        raise ResourceError(f"not removed, mounts below {parent}: {', '.join(refused)}")


def _umount_own(root: int, name: str) -> None:
    """Unmount the layout's own mounts at `name` (stacked ones too) while it opens to a mount root."""
    for _ in range(16):
        try:
            fd = sys_util.open_beneath(root, name)
        except FileNotFoundError:
            return
        try:
            if sys_util.mount_id(fd) == sys_util.mount_id(root):
                return
            try:
                sys_util.umount_fd(fd)
            except OSError as err:
                raise ResourceError(f"umount {name}: {err.strerror}") from err
        finally:
            os.close(fd)
    raise ResourceError(f"{name}: still a mount point after 16 unmounts")


def _check_name(name: str) -> None:
    if not name or "/" in name or name in {".", ".."}:
        raise ResourceError(f"invalid container id {name!r}")
