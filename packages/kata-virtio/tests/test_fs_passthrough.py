"""The two halves of the FUSE server on their own: `PassthroughFs` without the wire format, and
`FuseServer`'s decoding against a recording stand-in for the operations (no host filesystem)."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kata_virtio import _fuse as F
from kata_virtio.fs import MAX_WRITE, FuseServer, PassthroughFs, ReplyErrno
from kata_virtio.testing import fuse_reply, fuse_request

ROOT = F.FUSE_ROOT_ID
CRED = (os.geteuid(), os.getegid())


@pytest.fixture
def share(tmp_path: Path) -> Iterator[tuple[Path, PassthroughFs]]:
    shared = tmp_path / "shared"
    shared.mkdir()
    (tmp_path / "secret").write_text("outside")
    fs = PassthroughFs(shared)
    yield shared, fs
    fs.close()


def _errno(call: Any, *args: Any, **kwargs: Any) -> int:
    try:
        call(*args, **kwargs)
    except ReplyErrno as err:
        return err.errno
    except OSError as err:
        return err.errno or 0
    return 0


@pytest.mark.parametrize(("name", "err"), [(b"..", errno.EPERM), (b".", errno.EPERM), (b"a/b", errno.EINVAL)])
def test_passthrough_refuses_names_that_are_not_one_component(
    share: tuple[Path, PassthroughFs], name: bytes, err: int
) -> None:
    _, fs = share
    with fs.lock:
        assert _errno(fs.lookup, ROOT, name) == err
        assert _errno(fs.mkdir, ROOT, name, 0o755, umask=0, cred=CRED) == err


def test_passthrough_create_write_read_forget(share: tuple[Path, PassthroughFs]) -> None:
    shared, fs = share
    with fs.lock:
        node, st, fh = fs.create(ROOT, b"f", os.O_RDWR, 0o100644, umask=0o022, cred=CRED)
    assert stat.S_ISREG(st.st_mode) and fs.inode_count == 2 and fs.open_handles == 1
    assert fs.write(fh, 0, b"hello") == 5 and fs.read(fh, 1, 3) == b"ell"
    assert (shared / "f").read_bytes() == b"hello"
    with fs.lock:
        fs.release(fh)
        fs.forget(node, 1)
    assert fs.inode_count == 1 and fs.open_handles == 0
    with fs.lock:
        assert _errno(fs.getattr, node) == errno.ENOENT


def test_passthrough_never_opens_through_a_symlink(share: tuple[Path, PassthroughFs]) -> None:
    shared, fs = share
    (shared / "link").symlink_to("../secret")
    with fs.lock:
        node, st = fs.lookup(ROOT, b"link")
        assert stat.S_ISLNK(st.st_mode) and fs.readlink(node) == b"../secret"
        assert _errno(fs.open, node, os.O_RDONLY) == errno.ELOOP
        assert _errno(fs.create, ROOT, b"link", os.O_RDWR, 0o644, umask=0, cred=CRED) != 0


def test_passthrough_applies_its_policy(share: tuple[Path, PassthroughFs]) -> None:
    shared, fs = share
    with fs.lock:
        assert _errno(
            fs.mknod, ROOT, b"null", stat.S_IFCHR | 0o666, os.makedev(1, 3), umask=0, cred=CRED
        ) == (errno.EPERM)
        _, st, _ = fs.create(ROOT, b"s", os.O_RDWR, 0o104755, umask=0, cred=CRED)
        assert not st.st_mode & stat.S_ISUID
        assert _errno(fs.setxattr, ROOT, b"trusted.x", b"1", 0) == errno.EPERM
    assert not (shared / "null").exists()


def test_passthrough_release_all_keeps_the_root(share: tuple[Path, PassthroughFs]) -> None:
    shared, fs = share
    (shared / "d").mkdir()
    with fs.lock:
        node, _ = fs.lookup(ROOT, b"d")
        fs.opendir(node)
        fs.release_all()
        assert fs.inode_count == 1 and fs.open_handles == 0
        assert fs.lookup(ROOT, b"d")[0] != ROOT


class RecordingFs:
    """Stands in for `PassthroughFs`: records each operation the server decoded."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        def op(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args + tuple(kwargs.values())))
            return {"read": b"x" * min(args[2], 8), "write": len(args[2]), "lseek": 0}.get(name)

        return op


@pytest.fixture
def decoding(tmp_path: Path) -> Iterator[tuple[FuseServer, RecordingFs]]:
    server = FuseServer(tmp_path)
    real = server.fs
    fake = RecordingFs()
    server.fs = fake  # type: ignore[assignment]
    yield server, fake
    real.close()


def _call(server: FuseServer, opcode: int, body: bytes, space: int = 1 << 20) -> int:
    return fuse_reply(server.handle(fuse_request(opcode, ROOT, body), space))[0]


@pytest.mark.parametrize(
    ("opcode", "body"),
    [
        (F.FUSE_WRITE, F.FUSE_WRITE_IN.pack(1, 0, 10, 0, 0, 0, 0) + b"short"),  # size beyond the body
        (F.FUSE_SETXATTR, F.FUSE_SETXATTR_IN.pack(10, 0) + b"user.a\0v"),  # value beyond the body
        (F.FUSE_SETXATTR, F.FUSE_SETXATTR_IN.pack(0, 0) + b"\0"),  # empty name
        (F.FUSE_GETXATTR, F.FUSE_GETXATTR_IN.pack(0, 0) + b"\0"),
        (F.FUSE_LSEEK, F.FUSE_LSEEK_IN.pack(1, 0, 99, 0)),  # unknown whence
        (F.FUSE_LSEEK, F.FUSE_LSEEK_IN.pack(1, 1 << 63, 0, 0)),
        (F.FUSE_FALLOCATE, F.FUSE_FALLOCATE_IN.pack(1, 1 << 63, 1, 0, 0)),
        (F.FUSE_READDIR, F.FUSE_READ_IN.pack(1, 1 << 63, 4096, 0, 0, 0, 0)),
        (F.FUSE_SYMLINK, b"no-nul-terminated-target"),
        (F.FUSE_MKNOD, b"\0" * 4),  # shorter than fuse_mknod_in
    ],
    ids=["write", "setxattr-value", "setxattr-name", "getxattr-name", "whence", "lseek", "fallocate",
         "readdir", "symlink", "mknod"],
)  # fmt: skip
def test_server_refuses_bad_guest_lengths_before_any_operation(
    decoding: tuple[FuseServer, RecordingFs], opcode: int, body: bytes
) -> None:
    server, fake = decoding
    assert _call(server, opcode, body) == -errno.EINVAL
    assert fake.calls == []


def test_server_caps_a_read_at_the_reply_space_and_max_write(
    decoding: tuple[FuseServer, RecordingFs],
) -> None:
    server, fake = decoding
    _call(server, F.FUSE_READ, F.FUSE_READ_IN.pack(7, 0, 1 << 30, 0, 0, 0, 0), space=16 + 100)
    _call(server, F.FUSE_READ, F.FUSE_READ_IN.pack(7, 0, 1 << 30, 0, 0, 0, 0))
    assert fake.calls == [("read", (7, 0, 100)), ("read", (7, 0, MAX_WRITE))]


def test_server_hands_the_operation_decoded_arguments(decoding: tuple[FuseServer, RecordingFs]) -> None:
    server, fake = decoding
    _call(server, F.FUSE_WRITE, F.FUSE_WRITE_IN.pack(3, 4096, 5, 0, 0, 0, 0) + b"hello")
    _call(server, F.FUSE_RENAME2, F.FUSE_RENAME2_IN.pack(9, 1, 0) + b"old\0new\0")
    assert fake.calls == [("write", (3, 4096, b"hello")), ("rename", (ROOT, b"old", 9, b"new", 1))]
