"""The FUSE server driven by the host's real kernel FUSE client through /dev/fuse (root).

/dev/fuse carries the same requests and replies as virtio-fs does, so this checks our replies
against the kernel's own parser: a coreutils workload on the mount must behave like on a disk.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shlex
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_virtio._fs_server import FuseServer

pytestmark = pytest.mark.root
_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


def _serve(fd: int, server: FuseServer) -> None:
    while True:
        try:
            request = os.read(fd, (1 << 20) + 8192)
        except OSError as err:
            if err.errno in (errno.EINTR, errno.ENOENT):
                continue  # ENOENT: the request was interrupted before we read it
            return  # ENODEV: unmounted
        reply = server.handle(request, (1 << 20) + 16)
        if reply is not None:
            try:
                os.write(fd, reply)
            except OSError as err:
                if err.errno != errno.ENOENT:  # the kernel gave up on an interrupted request
                    return


@pytest.fixture
def fuse_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    shared, mnt = tmp_path / "shared", tmp_path / "mnt"
    shared.mkdir()
    mnt.mkdir()
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions".encode()
    if _libc.mount(b"kata-virtio-test", os.fsencode(mnt), b"fuse", 0, opts) != 0:
        os.close(fd)
        pytest.skip(f"cannot mount fuse: {os.strerror(ctypes.get_errno())}")
    server = FuseServer(shared)
    thread = threading.Thread(target=_serve, args=(fd, server), name="fuse-test", daemon=True)
    thread.start()
    try:
        yield shared, mnt
    finally:
        _libc.umount2(os.fsencode(mnt), MNT_DETACH)
        thread.join(5)
        os.close(fd)
        server.close()


def _in_mount(mnt: Path, script: str) -> list[str]:
    """`sh -ec` running SCRIPT in MNT. The shell cds there itself: a child must never start with its cwd on
    the mount. CPython before 3.11.6 (Debian 12 has 3.11.2) holds the GIL across vfork() until the child
    execs, and a child whose chdir() needs a FUSE reply (attributes past their 1 s validity, a new name)
    waits for this process's serving thread, which waits for the GIL: a deadlock whenever the machine is
    slow enough for the attributes to expire (the child sits in request_wait_answer under fuse_permission)."""
    return ["sh", "-ec", f"cd {shlex.quote(str(mnt))}\n{script}"]


def _sh(script: str, cwd: Path) -> str:
    out = subprocess.run(_in_mount(cwd, script), check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_coreutils_workload_through_the_kernel(fuse_mount: tuple[Path, Path]) -> None:
    shared, mnt = fuse_mount
    (shared / "existing.txt").write_text("from the host\n")
    (shared / "d").mkdir()
    for i in range(50):
        (shared / "d" / f"f{i}").write_text(str(i))
    out = _sh(
        """
        cat existing.txt
        ls d | wc -l
        echo hello > new.txt; echo more >> new.txt; cat new.txt
        mkdir -p a/b/c; echo deep > a/b/c/file; mv a/b/c/file a/moved; cat a/moved
        ln -s existing.txt link; readlink link; cat link
        ln new.txt hard; stat -c %h new.txt
        dd if=/dev/urandom of=big bs=64k count=16 2>/dev/null; sha256sum big | cut -c1-64; cp big big.copy
        truncate -s 100 big; stat -c %s big
        chmod 600 new.txt; stat -c %a new.txt
        touch -d @1000000000 new.txt; stat -c %Y new.txt
        rm hard link; rmdir a/b/c a/b; rm a/moved; rmdir a
        find . -type f | sort | head -3
        df -P . | tail -1 | awk '{print ($2 > 0)}'
        """,
        mnt,
    )
    lines = out.split("\n")
    assert lines[0] == "from the host"
    assert lines[1] == "50"
    assert lines[2:4] == ["hello", "more"]
    assert lines[4] == "deep"
    assert lines[5:7] == ["existing.txt", "from the host"]
    assert lines[7] == "2"
    assert lines[8] == hashlib.sha256((shared / "big.copy").read_bytes()).hexdigest()
    assert lines[9] == "100" and lines[10] == "600" and lines[11] == "1000000000"
    assert lines[12:15] == ["./big", "./big.copy", "./d/f0"]
    assert lines[15] == "1"
    assert (shared / "new.txt").read_text() == "hello\nmore\n"
    assert sorted(os.listdir(shared)) == ["big", "big.copy", "d", "existing.txt", "new.txt"]


def test_swapped_symlink_under_an_open_directory_stays_inside(
    fuse_mount: tuple[Path, Path], tmp_path: Path
) -> None:
    shared, mnt = fuse_mount
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (shared / "sub").mkdir()
    (shared / "sub" / "inner").write_text("inner")
    ready, go = tmp_path / "ready", tmp_path / "go"
    # The shell's cwd pins sub's nodeid in the kernel: later names resolve against it, never re-looked up.
    script = (
        f"cd sub; cat inner; touch {ready}; while [ ! -e {go} ]; do sleep 0.02; done; "
        "cat secret 2>/dev/null || echo refused; echo planted > planted"
    )
    proc = subprocess.Popen(_in_mount(mnt, script), stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(500):
            if ready.exists():
                break
            threading.Event().wait(0.01)
        (shared / "sub").rename(shared / "sub-old")
        (shared / "sub").symlink_to(outside)  # swapped on the host behind the kernel's back
        go.touch()
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert out == "innerrefused\n"  # "inner" has no newline
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (shared / "sub-old" / "planted").read_text() == "planted\n"
