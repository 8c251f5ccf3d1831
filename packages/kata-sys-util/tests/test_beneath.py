"""Path operations beneath a root: no symlink, '..' or absolute path is ever followed, and removal never
crosses a mount. Run with openat2 and with the O_NOFOLLOW walk used where openat2 is missing."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import kata_sys_util._beneath as beneath
from kata_sys_util import (
    MS_NODEV,
    MS_NOSUID,
    MS_RDONLY,
    bind_beneath,
    create_file_beneath,
    find_mount,
    mkdir_beneath,
    mount_id,
    mounts_below,
    open_beneath,
    opened_beneath,
    remove_beneath,
    umount,
    umount_fd,
    write_atomic,
)


@pytest.fixture(params=["openat2", "walk"])
def root(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, int]]:
    """A scratch directory and an O_PATH fd of it; nothing may stay mounted below it."""
    if request.param == "walk":
        monkeypatch.setitem(beneath._openat2, "missing", True)
    base = Path(tempfile.mkdtemp(prefix="ksu-"))
    fd = os.open(base, os.O_PATH | os.O_DIRECTORY)
    try:
        yield base, fd
    finally:
        os.close(fd)
        left = mounts_below(base)
        for point in left:
            umount(point)
        shutil.rmtree(base, ignore_errors=True)
        assert not left


def test_symlinks_dotdot_and_absolute_paths_are_refused(root: tuple[Path, int]) -> None:
    base, fd = root
    (base / "d").mkdir()
    (base / "d" / "link").symlink_to("/etc")
    (base / "flink").symlink_to("/etc/passwd")
    for rel, codes in [
        ("d/link", {errno.ELOOP}),
        ("d/link/passwd", {errno.ELOOP, errno.ENOTDIR}),
        ("flink", {errno.ELOOP}),
        ("../etc", {errno.EXDEV}),
        ("/etc", {errno.EXDEV}),
    ]:
        with pytest.raises(OSError) as info:
            os.close(open_beneath(fd, rel))
        assert info.value.errno in codes, rel
    with pytest.raises(OSError):
        mkdir_beneath(fd, "d/link/x")
    with pytest.raises(OSError):
        create_file_beneath(fd, "flink")
    assert not Path("/etc/x").exists()


def test_mkdir_and_create_file(root: tuple[Path, int]) -> None:
    base, fd = root
    mkdir_beneath(fd, "a/b/c")
    mkdir_beneath(fd, "a/b/c")  # exists: fine
    create_file_beneath(fd, "a/b/f")
    create_file_beneath(fd, "a/b/f")
    assert (base / "a/b/c").is_dir() and (base / "a/b/f").is_file()


@pytest.mark.root
def test_bind_sets_flags_and_remove_refuses_to_cross_the_mount(root: tuple[Path, int]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mount(2))")
    base, fd = root
    src = Path(tempfile.mkdtemp(prefix="ksu-src-"))
    try:
        (src / "precious").write_text("keep")
        mkdir_beneath(fd, "m/vol")
        bind_beneath(src, fd, "m/vol", flags=MS_RDONLY | MS_NOSUID | MS_NODEV)
        with opened_beneath(fd, "m/vol") as vol:
            mid = mount_id(vol)
        info = find_mount(mid)
        assert info is not None and info.path == str(base / "m/vol")
        assert {"ro", "nosuid", "nodev"} <= set(info.options.split(","))
        assert remove_beneath(fd, "m") == ["m/vol"]
        assert (src / "precious").read_text() == "keep"
        with opened_beneath(fd, "m/vol") as vol:
            umount_fd(vol)
        assert find_mount(mid) is None
        assert remove_beneath(fd, "m") == []
        assert not (base / "m").exists()
    finally:
        shutil.rmtree(src)


def test_remove_deletes_symlinks_not_their_targets(root: tuple[Path, int]) -> None:
    base, fd = root
    victim = Path(tempfile.mkdtemp(prefix="ksu-victim-"))
    try:
        (victim / "f").write_text("keep")
        (base / "t").mkdir()
        (base / "t" / "l").symlink_to(victim)
        assert remove_beneath(fd, "t") == []
        assert (victim / "f").read_text() == "keep"
        assert remove_beneath(fd, "missing") == []
    finally:
        shutil.rmtree(victim)


def test_write_atomic_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    write_atomic(target, b"one")
    write_atomic(target, b"two", mode=0o640)
    assert target.read_bytes() == b"two"
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_mount_id_agrees_with_fdinfo_and_mountinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY)
    try:
        mid = mount_id(fd)
        info = find_mount(mid)
        assert info is not None and info.path == "/proc"

        class NoStatx:  # glibc before 2.28
            pass

        monkeypatch.setattr(beneath, "libc", NoStatx)
        assert mount_id(fd) == mid  # from /proc/self/fdinfo
    finally:
        os.close(fd)


def test_umount_of_a_missing_path_raises_instead_of_saying_not_mounted(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        umount(tmp_path / "missing")
    assert info.value.errno in (errno.ENOENT, errno.EPERM)
    assert info.value.filename == str(tmp_path / "missing")
