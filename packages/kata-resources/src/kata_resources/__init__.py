"""Host resources for a sandbox: the shared directory, container rootfs mounts and volumes.

layout = ShareLayout("sb1")
ledger = layout.ledger(Path("/run/kata/sb1/mounts.json"))   # records what it mounts, with mount ids
exported = layout.create(ledger)      # mounts/ (host only) and shared/ (its read-only slave view)
mount_rootfs(containerd_mounts, layout.rootfs_host_path("c1"), ledger)
guest_mounts = share_volumes(spec["mounts"], layout, "c1", ledger)
...
ledger.undo(); layout.remove()        # never unmounts or deletes anything the ledger did not make
"""

from kata_resources.__about__ import __version__
from kata_resources._errors import MountError, ResourceError, VolumeError
from kata_resources._ledger import (
    LedgerEntry,
    MountLedger,
    MountRecord,
    Recorder,
    read_mount_record,
    undo_mount_record,
    unmount_below,
    write_mount_record,
)
from kata_resources._mount import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_SHARED,
    MS_SLAVE,
    bind,
    is_mountpoint,
    mount,
    mounts_below,
    parse_options,
    umount,
)
from kata_resources._rootfs import MountLike, mount_rootfs
from kata_resources._share_fs import (
    GUEST_SHARED_DIR,
    HOST_SHARED_ROOT,
    KATA_SHARED_TAG,
    ShareLayout,
    StorageSpec,
    remove_tree,
)
from kata_resources._volumes import VolumeKind, VolumePlan, classify, share_volumes

__all__ = [
    "GUEST_SHARED_DIR",
    "HOST_SHARED_ROOT",
    "KATA_SHARED_TAG",
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "MS_SHARED",
    "MS_SLAVE",
    "LedgerEntry",
    "MountError",
    "MountLedger",
    "MountLike",
    "MountRecord",
    "Recorder",
    "ResourceError",
    "ShareLayout",
    "StorageSpec",
    "VolumeError",
    "VolumeKind",
    "VolumePlan",
    "__version__",
    "bind",
    "classify",
    "is_mountpoint",
    "mount",
    "mount_rootfs",
    "mounts_below",
    "parse_options",
    "read_mount_record",
    "remove_tree",
    "share_volumes",
    "umount",
    "undo_mount_record",
    "unmount_below",
    "write_mount_record",
]
