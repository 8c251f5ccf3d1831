"""mount/bind/umount helpers and the MountLedger against the real kernel (root: they mount in a tmp dir)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from kata_resources import (
    MountError,
    MountLedger,
    ResourceError,
    ShareLayout,
    bind,
    is_mountpoint,
    mount_rootfs,
    mounts_below,
    parse_options,
    read_mount_record,
    umount,
    undo_mount_record,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("needs_root")]


@dataclass(frozen=True)
class M:
    type: str
    source: str
    options: tuple[str, ...] = ()


def _overlay(scratch: Path) -> tuple[M, Path, Path]:
    lower, upper, work = (scratch / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "hello").write_text("from lower\n")
    opts = (f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}")
    return M("overlay", "overlay", opts), lower, upper


def test_bind_readonly_refuses_writes_and_umount_reports_not_mounted(scratch: Path) -> None:
    src, dst = scratch / "src", scratch / "dst"
    src.mkdir()
    dst.mkdir()
    bind(src, dst, readonly=True)
    try:
        assert is_mountpoint(dst)
        with pytest.raises(OSError):
            (dst / "x").write_text("no")
    finally:
        assert umount(dst)
    assert not umount(dst)  # nothing mounted any more: False, not an error
    assert not is_mountpoint(dst)


def test_mount_error_names_target_and_errno(scratch: Path) -> None:
    with pytest.raises(MountError) as info:
        from kata_resources import mount

        mount("none", scratch / "missing", "tmpfs")
    assert info.value.errno == 2
    assert "missing" in str(info.value)


def test_overlay_rootfs_writes_go_to_upper_and_ledger_undo_leaves_nothing(scratch: Path) -> None:
    record = scratch / "state" / "mounts.json"
    rootfs_mount, lower, upper = _overlay(scratch)
    layout = ShareLayout("sb", host_root=scratch / "sandboxes")
    ledger = layout.ledger(record)
    assert layout.create(ledger) == layout.shared_dir
    target = layout.rootfs_host_path("c1")
    mount_rootfs([rootfs_mount], target, ledger)
    assert (target / "hello").read_text() == "from lower\n"
    (target / "new").write_text("x")
    assert (upper / "new").exists() and not (lower / "new").exists()
    # The guest's view (shared/) gets the rootfs by propagation, writable where the rootfs is...
    assert (layout.shared_dir / "c1" / "rootfs" / "new").read_text() == "x"
    # ...but nothing else in it is: no symlink can be planted where the host mounts.
    with pytest.raises(OSError):
        (layout.shared_dir / "c2").mkdir()
    saved = json.loads(record.read_text())
    assert saved["root"] == str(layout.sandbox_dir)
    assert [m["path"] for m in saved["mounts"]] == ["mounts", "shared", "mounts/c1/rootfs"]
    assert all(isinstance(m["mount_id"], int) for m in saved["mounts"])
    with pytest.raises(Exception, match="still mounted"):
        layout.remove()
    assert ledger.undo() == [str(target), str(layout.shared_dir), str(layout.mounts_dir)]
    assert mounts_below(scratch) == []
    saved_record = read_mount_record(record)
    assert saved_record is not None and saved_record.entries == []
    layout.remove()
    assert not layout.sandbox_dir.exists()


def test_bind_rootfs_from_containerd_bind_mount(scratch: Path) -> None:
    src = scratch / "snap"
    src.mkdir()
    (src / "f").write_text("snap")
    ledger = MountLedger()
    target = scratch / "rootfs"
    mount_rootfs([M("bind", str(src), ("rbind", "ro"))], target, ledger)
    assert (target / "f").read_text() == "snap"
    with pytest.raises(OSError):
        (target / "g").write_text("ro")
    ledger.undo()
    assert not is_mountpoint(target)


def test_no_rootfs_mounts_binds_the_bundle_rootfs(scratch: Path) -> None:
    bundle_rootfs = scratch / "bundle" / "rootfs"
    bundle_rootfs.mkdir(parents=True)
    (bundle_rootfs / "etc").mkdir()
    ledger = MountLedger()
    mount_rootfs([], scratch / "t", ledger, bundle_rootfs=bundle_rootfs)
    assert (scratch / "t" / "etc").is_dir()
    ledger.undo()
    assert mounts_below(scratch) == []


def test_failed_rootfs_mount_undoes_earlier_ones(scratch: Path) -> None:
    good, _, _ = _overlay(scratch)
    bad = M("overlay", "overlay", (f"lowerdir={scratch / 'nope'}",))
    ledger = MountLedger()
    with pytest.raises(MountError):
        mount_rootfs([good, bad], scratch / "t", ledger)
    assert ledger.mounts == []
    assert mounts_below(scratch) == []


def test_undo_below_only_touches_that_subtree_and_stacked_mounts_unwind(scratch: Path) -> None:
    ledger = MountLedger()
    a, b, src = scratch / "a", scratch / "b", scratch / "src"
    for d in (a, b, src):
        d.mkdir()
    ledger.mount("tmpfs", a, "tmpfs")
    ledger.mount("tmpfs", a, "tmpfs")  # stacked
    ledger.bind(src, b)
    assert ledger.undo(below=a) == [str(a), str(a)]
    assert mounts_below(scratch) == [str(b)]
    assert ledger.mounts == [str(b)]
    ledger.undo()
    assert mounts_below(scratch) == []


def test_crash_record_is_undone_newest_first(scratch: Path) -> None:
    record = scratch / "mounts.json"
    ledger = MountLedger.to_file(record)
    outer, src = scratch / "outer", scratch / "src"
    outer.mkdir()
    src.mkdir()
    ledger.mount("tmpfs", outer, "tmpfs")
    (outer / "inner").mkdir()
    ledger.bind(src, outer / "inner")
    del ledger  # the shim "crashed": only the file is left
    saved = read_mount_record(record)
    assert saved is not None
    assert [str(saved.root / e.path) for e in saved.entries] == [str(outer), str(outer / "inner")]
    assert undo_mount_record(record) == [str(outer / "inner"), str(outer)]
    assert mounts_below(scratch) == []
    assert not record.exists()


def test_parse_options_splits_flags_from_data() -> None:
    flags, data = parse_options(["ro", "nosuid", "rprivate", "lowerdir=/a", "rw", "size=1k"])
    assert flags == 0x1 | 0x2
    assert data == "lowerdir=/a,size=1k"


def test_undo_leaves_a_recorded_mount_that_moved_and_reports_it(scratch: Path) -> None:
    root = scratch / "sb"
    (root / "a" / "inner").mkdir(parents=True)
    ledger = MountLedger(root=root)
    ledger.mount("tmpfs", root / "a" / "inner", "tmpfs")
    (root / "a").rename(root / "b")  # the recorded path now names nothing; the mount lives on elsewhere
    (root / "a").symlink_to(root / "b")
    try:
        with pytest.raises(MountError, match="left alone"):
            ledger.undo()
        assert is_mountpoint(root / "b" / "inner")
        assert ledger.mounts == [str(root / "a" / "inner")]  # kept, for a later look
    finally:
        umount(root / "b" / "inner")


def test_ledger_refuses_targets_outside_its_root(scratch: Path) -> None:
    ledger = MountLedger(root=scratch / "sb")
    (scratch / "sb").mkdir()
    (scratch / "sb" / "out").symlink_to(scratch)
    for target in (Path("/etc/x"), "../x", scratch / "sb" / ".." / "x"):
        with pytest.raises(ResourceError):
            ledger.mkdir(target)
    with pytest.raises(ResourceError):
        ledger.mkdir(scratch / "sb" / "out" / "x")  # a symlink on the way
    with pytest.raises(MountError):
        ledger.mount("tmpfs", scratch / "sb" / "out", "tmpfs")
    assert not (scratch / "x").exists()
    assert ledger.mounts == []


def test_mount_flag_names_still_import_from_their_old_home() -> None:
    import kata_resources
    import kata_sys_util
    from kata_resources import MS_BIND, MS_SLAVE  # type: ignore[attr-defined]

    assert (MS_BIND, MS_SLAVE, kata_resources.MNT_DETACH) == (
        kata_sys_util.MS_BIND,
        kata_sys_util.MS_SLAVE,
        kata_sys_util.MNT_DETACH,
    )
    with pytest.raises(AttributeError):
        kata_resources.MS_NOT_A_FLAG  # noqa: B018
