"""Issue 11 findings 1 and 2: a hostile guest against the share and the host's cleanup.

The guest reaches the host only through virtio-fs, i.e. it can write only where the exported directory
(`exported`, what the VMM's FUSE server or virtiofsd serves) is writable. Each scenario plays the guest by
writing there, and, for the paths the current layout no longer exposes, by writing directly where the old
layout let it write (the host-side path of `<cid>/rootfs` and `<cid>`), then checks that the host's mount,
unmount and delete never follow what it planted. Each runs in a private mount namespace (conftest).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kata_resources import (
    MountLedger,
    ResourceError,
    ShareLayout,
    mount_rootfs,
    mounts_below,
    share_volumes,
    umount,
)
from kata_shim.persist import MOUNTS_FILE, SandboxState, StateStore, cleanup_sandbox, sandbox_dir

pytestmark = pytest.mark.root

Isolated = Callable[[Callable[[Path], None]], None]


@dataclass(frozen=True)
class M:
    """A containerd rootfs mount (`target`: containerd 2's sub-path below the rootfs)."""

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""


def _raw_mount_points() -> list[bytes]:
    # Read as bytes with exactly the kernel's four escapes undone (independent of the code under test).
    points = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            field = line.split(b" ")[4]
            for esc, raw in ((b"\\040", b" "), (b"\\011", b"\t"), (b"\\012", b"\n"), (b"\\134", b"\\")):
                field = field.replace(esc, raw)
            points.append(field)
    return points


def _mounted_at(path: Path) -> bool:
    return os.fsencode(path) in _raw_mount_points()


def _mounted_below(path: Path) -> list[bytes]:
    top = os.fsencode(path)
    return [p for p in _raw_mount_points() if p == top or p.startswith(top + b"/")]


def _sandbox(base: Path, record: Path | None = None) -> tuple[ShareLayout, MountLedger, Path]:
    """A sandbox's share as the shim makes it: (layout, ledger, the directory exported to the guest)."""
    layout = ShareLayout("sb", host_root=base / "sandboxes")
    record = record or base / "state" / "sb" / MOUNTS_FILE
    # Also runs against main (no ledger on the layout there), so a test fails there by the attack working.
    if hasattr(layout, "ledger"):
        ledger = layout.ledger(record)
        exported = layout.create(ledger)
    else:
        ledger = MountLedger.to_file(record)
        exported = layout.create()
    return layout, ledger, exported


def _host_dir(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_exported_share_is_read_only_outside_rootfs_and_volumes(isolated: Isolated) -> None:
    """Finding 1: the guest can neither plant links where the host mounts nor fill the host's /run."""

    def scenario(base: Path) -> None:
        layout, ledger, exported = _sandbox(base)
        src = _host_dir(base / "image", hello="from the image")
        mount_rootfs([M("bind", str(src), ("rbind",))], layout.rootfs_host_path("c1"), ledger)
        # The container's own rootfs stays writable for the guest...
        assert (exported / "c1" / "rootfs" / "hello").read_text() == "from the image"
        (exported / "c1" / "rootfs" / "new").write_text("guest file")
        # ...nothing around it is.
        attempts: list[Callable[[], object]] = [
            (exported / "c2").mkdir,
            lambda: (exported / "c2").symlink_to("/etc"),
            lambda: (exported / "c1" / "volumes").symlink_to("/etc"),
            lambda: (exported / "fill").write_bytes(b"\0" * 65536),
            lambda: (exported / "c1").rename(exported / "c1-moved"),
        ]
        for attempt in attempts:
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno in (errno.EROFS, errno.EBUSY, errno.EPERM)
        ledger.undo()
        layout.remove()
        assert _mounted_below(base) == []

    isolated(scenario)


def test_rootfs_mount_does_not_follow_a_guest_symlink(isolated: Isolated) -> None:
    """Finding 1: a symlink at `<cid>/rootfs` must not make the host mount attacker content elsewhere."""

    def scenario(base: Path) -> None:
        layout, ledger, _ = _sandbox(base)
        victim = _host_dir(base / "host-etc", passwd="root:x:0:0")
        attacker = _host_dir(base / "attacker", passwd="evil")
        target = layout.rootfs_host_path("c1")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(victim)  # what the guest could plant through the old read-write share
        with pytest.raises((OSError, ResourceError)):
            mount_rootfs([M("bind", str(attacker), ("rbind",))], target, ledger)
        assert not _mounted_at(victim)
        assert (victim / "passwd").read_text() == "root:x:0:0"

    isolated(scenario)


def test_rootfs_sub_mount_does_not_follow_a_symlink_inside_the_rootfs(isolated: Isolated) -> None:
    """Finding 1: the rootfs stays guest-writable, so a containerd 2 mount with a `target` below it must not
    follow a symlink the guest left there (e.g. in a reused writable layer)."""

    def scenario(base: Path) -> None:
        layout, ledger, _ = _sandbox(base)
        victim = _host_dir(base / "host-lib", keep="host data")
        layer = _host_dir(base / "layer")
        (layer / "sub").symlink_to(victim)  # written by the guest through the writable rootfs
        extra = _host_dir(base / "extra", evil="x")
        mounts = [M("bind", str(layer), ("rbind",)), M("bind", str(extra), ("rbind",), target="sub")]
        with pytest.raises((OSError, ResourceError)):
            mount_rootfs(mounts, layout.rootfs_host_path("c1"), ledger)
        assert not _mounted_at(victim)
        assert sorted(p.name for p in victim.iterdir()) == ["keep"]
        assert _mounted_below(layout.rootfs_host_path("c1")) == []  # the first mount was rolled back

    isolated(scenario)


def test_volume_bind_does_not_follow_a_guest_symlink(isolated: Isolated) -> None:
    """Finding 1: a symlink at `<cid>/volumes` must not redirect a volume bind onto a host directory."""

    def scenario(base: Path) -> None:
        layout, ledger, _ = _sandbox(base)
        victim = _host_dir(base / "host-dir", keep="host data")
        volume = _host_dir(base / "volume", data="volume data")
        volumes = layout.container_dir("c1") / "volumes"
        volumes.parent.mkdir(parents=True, exist_ok=True)
        volumes.symlink_to(victim)
        mounts = [{"destination": "/data", "type": "bind", "source": str(volume), "options": ["rbind"]}]
        with pytest.raises((OSError, ResourceError)):
            share_volumes(mounts, layout, "c1", ledger)
        assert _mounted_below(victim) == []
        assert sorted(p.name for p in victim.iterdir()) == ["keep"]

    isolated(scenario)


def test_container_delete_does_not_unmount_a_host_mount_after_guest_rename_and_symlink(
    isolated: Isolated,
) -> None:
    """Finding 1: rename `<cid>` away and link it to a host dir holding a mount at `rootfs`: delete must
    leave the host's mount alone (and must not delete through the moved rootfs either)."""

    def scenario(base: Path) -> None:
        layout, ledger, _ = _sandbox(base)
        host_mount = base / "host" / "rootfs"
        host_mount.mkdir(parents=True)
        assert os.system(f"mount -t tmpfs host-tmpfs {host_mount}") == 0
        (host_mount / "marker").write_text("host tmpfs")
        image = _host_dir(base / "image", hello="image")
        mount_rootfs([M("bind", str(image), ("rbind",))], layout.rootfs_host_path("c1"), ledger)
        cdir = layout.container_dir("c1")
        cdir.rename(cdir.with_name("c1-moved"))  # what the guest could do through the old share
        cdir.symlink_to(base / "host")
        try:
            ledger.undo(below=cdir)
            layout.remove_container("c1")
        except (OSError, ResourceError):
            pass  # refusing is the right answer
        assert _mounted_at(host_mount)
        assert (host_mount / "marker").read_text() == "host tmpfs"
        assert (image / "hello").read_text() == "image"

    isolated(scenario)


@pytest.mark.parametrize("ledger_lost", [False, True], ids=["with-ledger", "ledger-lost"])
def test_crash_cleanup_keeps_host_files_behind_a_non_ascii_volume(
    isolated: Isolated, ledger_lost: bool
) -> None:
    """Finding 2: volume `données 1`, shim crash, `delete`'s cleanup: the host file behind the volume stays
    (mountinfo unescaping, umount's ENOENT and rmtree through a live mount deleted it)."""

    def scenario(base: Path) -> None:
        store = StateStore(base / "run", shared_root=base / "sandboxes")
        store.save(SandboxState("sb"))
        record = sandbox_dir("sb", store.root) / MOUNTS_FILE
        layout, ledger, _ = _sandbox(base, record)
        data = _host_dir(base / "données 1", precious="keep me")
        mounts = [
            {"destination": "/data/données 1", "type": "bind", "source": str(data), "options": ["rbind"]}
        ]
        share_volumes(mounts, layout, "c1", ledger)
        del ledger  # the shim crashed; containerd runs `delete`
        if ledger_lost:
            record.unlink()
        report = cleanup_sandbox("sb", store, kill_shim=False)
        assert (data / "precious").read_text() == "keep me"
        assert _mounted_below(base) == [], report
        assert not layout.sandbox_dir.exists(), report
        assert not sandbox_dir("sb", store.root).exists(), report

    isolated(scenario)


_names = st.text(
    st.characters(exclude_characters="/\0", exclude_categories=["Cs"]), min_size=1, max_size=24
).filter(lambda n: n not in {".", ".."})


def test_mountinfo_round_trips_hostile_mount_point_names(isolated: Isolated) -> None:
    """Finding 2: a mount point named with spaces, tabs, newlines, backslashes or non-ASCII is found by
    `mounts_below` under its real name and unmounted by `umount` (hypothesis, real kernel)."""

    def scenario(base: Path) -> None:
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(_names)
        def round_trip(name: str) -> None:
            point = base / name
            point.mkdir()
            try:
                assert os.spawnvp(os.P_WAIT, "mount", ["mount", "-t", "tmpfs", "t", str(point)]) == 0
                assert mounts_below(base) == [str(point)]
                assert umount(point)
                assert mounts_below(base) == []
            finally:
                if _mounted_at(point):
                    os.spawnvp(os.P_WAIT, "umount", ["umount", "-l", str(point)])
                point.rmdir()

        round_trip()

    isolated(scenario)
