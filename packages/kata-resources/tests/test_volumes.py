"""OCI mount classification (pure) and sharing host bind sources through the shared directory (root)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kata_resources import (
    MountLedger,
    ResourceError,
    ShareLayout,
    VolumeError,
    VolumeKind,
    classify,
    mounts_below,
    share_volumes,
)

DEFAULTS: list[dict[str, Any]] = [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
]


def test_classify_leaves_kernel_filesystems_to_the_guest() -> None:
    plans = classify(DEFAULTS)
    assert [p.kind for p in plans] == [VolumeKind.GUEST] * len(DEFAULTS)
    assert [p.mount for p in plans] == DEFAULTS


def test_classify_binds_are_shared_and_host_shm_becomes_guest_shm() -> None:
    plans = classify(
        [
            {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind", "ro"]},
            {"destination": "/data", "type": "none", "source": "/srv", "options": ["bind"]},
            {"destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind"]},
        ]
    )
    assert [p.kind for p in plans] == [VolumeKind.SHARED, VolumeKind.SHARED, VolumeKind.SHM]


def test_classify_rejects_relative_destination() -> None:
    with pytest.raises(VolumeError):
        classify([{"destination": "data", "type": "tmpfs", "source": "tmpfs"}])


def test_layout_paths_match_the_guest_side() -> None:
    layout = ShareLayout("sb1")
    assert str(layout.shared_dir) == "/run/kata-containers/shared/sandboxes/sb1/shared"
    assert layout.rootfs_guest_path("c1") == "/run/kata-containers/shared/containers/c1/rootfs"
    assert layout.guest_path(layout.rootfs_host_path("c1")) == layout.rootfs_guest_path("c1")
    storage = layout.sandbox_storage()
    assert (storage.driver, storage.source, storage.fstype, storage.mount_point) == (
        "virtio-fs",
        "kataShared",
        "virtiofs",
        "/run/kata-containers/shared/containers",
    )
    with pytest.raises(ResourceError):
        ShareLayout("../x")
    with pytest.raises(ResourceError):
        layout.container_dir("a/b")


@pytest.mark.root
@pytest.mark.usefixtures("needs_root")
def test_share_volumes_binds_files_and_dirs_read_only_where_asked(scratch: Path) -> None:
    host_file = scratch / "hosts"
    host_file.write_text("127.0.0.1 localhost\n")
    host_dir = scratch / "data"
    host_dir.mkdir()
    (host_dir / "a").write_text("A")
    layout = ShareLayout("sb", host_root=scratch / "sandboxes", guest_dir="/g")
    layout.create()
    ledger = MountLedger()
    mounts = [
        *DEFAULTS,
        {"destination": "/etc/hosts", "type": "bind", "source": str(host_file), "options": ["rbind", "ro"]},
        {"destination": "/data", "type": "bind", "source": str(host_dir), "options": ["rbind", "rprivate"]},
        {"destination": "/dev/shm", "type": "bind", "source": str(host_dir), "options": ["rbind"]},
    ]
    guest = share_volumes(mounts, layout, "c1", ledger)
    assert guest[: len(DEFAULTS)] == DEFAULTS
    hosts, data, shm = guest[len(DEFAULTS) :]
    assert hosts["source"].startswith("/g/c1/volumes/") and hosts["options"] == ["rbind", "ro"]
    assert data["options"] == ["rbind"]  # host propagation dropped
    assert shm["type"] == "tmpfs" and shm["destination"] == "/dev/shm"
    host_side = layout.shared_dir / hosts["source"].removeprefix("/g/")
    assert host_side.read_text() == "127.0.0.1 localhost\n"
    with pytest.raises(OSError):
        host_side.write_text("no")
    assert (layout.shared_dir / data["source"].removeprefix("/g/") / "a").read_text() == "A"
    assert len(ledger.mounts) == 2
    ledger.undo(below=layout.container_dir("c1"))
    layout.remove_container("c1")
    layout.remove()
    assert mounts_below(scratch) == []


@pytest.mark.root
@pytest.mark.usefixtures("needs_root")
def test_share_volumes_missing_source_fails_and_undoes(scratch: Path) -> None:
    layout = ShareLayout("sb", host_root=scratch / "sandboxes")
    layout.create()
    ok = scratch / "ok"
    ok.mkdir()
    ledger = MountLedger()
    mounts = [
        {"destination": "/ok", "type": "bind", "source": str(ok)},
        {"destination": "/missing", "type": "bind", "source": str(scratch / "nope")},
    ]
    with pytest.raises(VolumeError, match="nope"):
        share_volumes(mounts, layout, "c1", ledger)
    assert ledger.mounts == []
    layout.remove()
    assert mounts_below(scratch) == []
