"""The FUSE passthrough server: every opcode, confinement to the shared directory, hostile requests."""

from __future__ import annotations

import errno
import os
import resource
import signal
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kata_virtio import _fuse as F
from kata_virtio._fs_server import FsPolicy, FsServerError, FuseServer
from kata_virtio.testing import FuseClient as Client
from kata_virtio.testing import FuseError, fuse_reply, fuse_request

ROOT = F.FUSE_ROOT_ID


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path, FuseServer, Client]]:
    """shared/ is served; outside/ next to it must stay untouched."""
    shared, outside = tmp_path / "shared", tmp_path / "outside"
    shared.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("top secret")
    (shared / "hello.txt").write_text("hello world")
    (shared / "sub").mkdir()
    (shared / "sub" / "inner").write_text("inner")
    server = FuseServer(shared)
    client = Client(server)
    client.init()
    yield shared, outside, server, client
    server.close()


def test_init_negotiates_our_minor_and_flags(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    _, _, _, c = tree
    major, minor, readahead, flags, *_ = c.init()
    assert (major, minor, readahead) == (7, 31, 65536)
    assert flags & F.FUSE_DO_READDIRPLUS and flags & F.FUSE_MAX_PAGES
    out = c.call(F.FUSE_INIT, 0, F.FUSE_INIT_IN.pack(8, 0, 0, 0))
    assert F.FUSE_INIT_OUT.unpack(out)[0] == 7  # a newer major gets ours back and retries


def test_lookup_getattr_open_read(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    shared, _, _, c = tree
    node, attr = c.lookup(ROOT, "hello.txt")
    assert attr[0] == (shared / "hello.txt").stat().st_ino and attr[1] == 11
    assert c.getattr(node)[1] == 11
    fh = c.open(node)
    assert c.read(node, fh, 6, 100) == b"world"
    c.call(F.FUSE_FLUSH, node, F.FUSE_FLUSH_IN.pack(fh, 0, 0, 0))
    c.release(node, fh)
    assert tree[2].open_handles == 0


def test_lookup_reuses_nodeid_and_forget_drops_it(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    _, _, server, c = tree
    a, _ = c.lookup(ROOT, "hello.txt")
    b, _ = c.lookup(ROOT, "hello.txt")
    assert a == b and server.inode_count == 2
    assert server.handle(fuse_request(F.FUSE_FORGET, a, F.FUSE_FORGET_IN.pack(1))) is None
    assert server.inode_count == 2
    sub, _ = c.lookup(ROOT, "sub")
    body = F.FUSE_BATCH_FORGET_IN.pack(2, 0) + F.FUSE_FORGET_ONE.pack(a, 1) + F.FUSE_FORGET_ONE.pack(sub, 1)
    assert server.handle(fuse_request(F.FUSE_BATCH_FORGET, 0, body)) is None
    assert server.inode_count == 1
    with pytest.raises(FuseError) as e:
        c.getattr(a)
    assert e.value.errno == errno.ENOENT


def test_create_write_fsync_setattr_truncate(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    shared, _, _, c = tree
    node, fh = c.create(ROOT, "new.txt", flags=os.O_RDWR, mode=0o100640)
    assert c.write(node, fh, 0, b"0123456789") == 10
    c.call(F.FUSE_FSYNC, node, F.FUSE_FSYNC_IN.pack(fh, 1, 0))
    assert (shared / "new.txt").read_bytes() == b"0123456789"
    assert stat.S_IMODE((shared / "new.txt").stat().st_mode) == 0o640
    body = F.FUSE_SETATTR_IN.pack(
        F.FATTR_SIZE | F.FATTR_MODE, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0o600, 0, 0, 0, 0
    )
    attr = F.FUSE_ATTR.unpack_from(c.call(F.FUSE_SETATTR, node, body), 16)
    assert attr[1] == 4 and stat.S_IMODE(attr[9]) == 0o600
    body = F.FUSE_SETATTR_IN.pack(F.FATTR_MTIME | F.FATTR_ATIME, 0, 0, 0, 0, 5, 7, 0, 1, 2, 0, 0, 0, 0, 0, 0)
    c.call(F.FUSE_SETATTR, node, body)
    st_ = (shared / "new.txt").stat()
    assert (st_.st_atime_ns, st_.st_mtime_ns) == (5 * 10**9 + 1, 7 * 10**9 + 2)
    body = F.FUSE_SETATTR_IN.pack(F.FATTR_UID | F.FATTR_GID, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1234, 99, 0)
    with pytest.raises(FuseError) as e:
        c.call(F.FUSE_SETATTR, node, body)  # the default FsPolicy refuses ownership changes
    assert e.value.errno == errno.EPERM
    if os.geteuid() == 0:
        tree[2].policy = FsPolicy(allow_chown=True)
        c.call(F.FUSE_SETATTR, node, body)
        assert ((shared / "new.txt").stat().st_uid, (shared / "new.txt").stat().st_gid) == (1234, 99)
    c.release(node, fh)
    with pytest.raises(FuseError) as e:
        c.create(ROOT, "new.txt", flags=os.O_RDWR | os.O_EXCL)
    assert e.value.errno == errno.EEXIST


def test_new_nodes_belong_to_the_caller(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    shared, _, server, _ = tree
    if not server.set_owner:
        pytest.skip("chown of new nodes needs root")
    c = Client(server, uid=1000, gid=1001)
    c.mkdir(ROOT, "mine")
    assert ((shared / "mine").stat().st_uid, (shared / "mine").stat().st_gid) == (1000, 1001)


def test_directory_operations(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    shared, _, _, c = tree
    d = c.mkdir(ROOT, "dir", 0o750)
    assert stat.S_IMODE((shared / "dir").stat().st_mode) == 0o750
    c.call(F.FUSE_MKNOD, d, F.FUSE_MKNOD_IN.pack(stat.S_IFIFO | 0o644, 0, 0, 0) + b"fifo\0")
    assert stat.S_ISFIFO((shared / "dir" / "fifo").lstat().st_mode)
    c.call(F.FUSE_SYMLINK, d, b"ln\0/etc/passwd\0")
    ln, attr = c.lookup(d, "ln")
    assert stat.S_ISLNK(attr[9])
    assert c.call(F.FUSE_READLINK, ln) == b"/etc/passwd"
    hello, _ = c.lookup(ROOT, "hello.txt")
    c.call(F.FUSE_LINK, d, F.FUSE_LINK_IN.pack(hello) + b"hard\0")
    assert (shared / "dir" / "hard").stat().st_ino == (shared / "hello.txt").stat().st_ino
    c.call(F.FUSE_RENAME, d, F.FUSE_RENAME_IN.pack(ROOT) + b"hard\0moved\0")
    assert (shared / "moved").read_text() == "hello world"
    with pytest.raises(FuseError) as e:
        c.call(F.FUSE_RENAME2, ROOT, F.FUSE_RENAME2_IN.pack(ROOT, 1, 0) + b"moved\0hello.txt\0")
    assert e.value.errno == errno.EEXIST  # RENAME_NOREPLACE
    c.call(F.FUSE_RENAME2, ROOT, F.FUSE_RENAME2_IN.pack(d, 2, 0) + b"moved\0ln\0")  # RENAME_EXCHANGE
    assert (shared / "moved").is_symlink()
    names = {n for n, _ in c.readdir(d)}
    assert names == {".", "..", "fifo", "ln"}
    plus = dict(c.readdir(d, plus=True))
    assert plus["."] == 0 and plus["fifo"] != 0
    c.call(F.FUSE_UNLINK, d, b"fifo\0")
    c.call(F.FUSE_UNLINK, d, b"ln\0")
    c.call(F.FUSE_RMDIR, ROOT, b"dir\0")
    assert not (shared / "dir").exists()
    fh = F.FUSE_OPEN_OUT.unpack(c.call(F.FUSE_OPENDIR, ROOT, F.FUSE_OPEN_IN.pack(0, 0)))[0]
    c.call(F.FUSE_FSYNCDIR, ROOT, F.FUSE_FSYNC_IN.pack(fh, 0, 0))
    c.release(ROOT, fh, F.FUSE_RELEASEDIR)


def test_readdir_pages_through_a_large_directory(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    shared, _, _, c = tree
    for i in range(300):
        (shared / "sub" / f"file-{i:04d}").touch()
    sub, _ = c.lookup(ROOT, "sub")
    names = [n for n, _ in c.readdir(sub, size=1024)]
    assert len(names) == len(set(names)) == 303
    assert len(c.readdir(sub, plus=True, size=2048)) == 303


def test_statfs_access_xattr_fallocate_lseek(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    shared, _, server, c = tree
    blocks, *_ = F.FUSE_KSTATFS.unpack(c.call(F.FUSE_STATFS, ROOT))
    assert blocks == os.statvfs(shared).f_blocks
    node, fh = c.create(ROOT, "x", flags=os.O_RDWR, mode=0o100644)
    c.call(F.FUSE_ACCESS, node, F.FUSE_ACCESS_IN.pack(os.R_OK | os.W_OK, 0))
    with pytest.raises(FuseError):
        Client(server, uid=4242, gid=4242).call(F.FUSE_ACCESS, node, F.FUSE_ACCESS_IN.pack(os.W_OK, 0))
    try:
        c.call(F.FUSE_SETXATTR, node, F.FUSE_SETXATTR_IN.pack(3, 0) + b"user.k\0abc")
    except FuseError as err:
        if err.errno == errno.ENOTSUP:
            pytest.skip("the test filesystem has no user xattrs")
        raise
    assert c.call(F.FUSE_GETXATTR, node, F.FUSE_GETXATTR_IN.pack(0, 0) + b"user.k\0")[:4] == b"\3\0\0\0"
    assert c.call(F.FUSE_GETXATTR, node, F.FUSE_GETXATTR_IN.pack(16, 0) + b"user.k\0") == b"abc"
    with pytest.raises(FuseError) as e:
        c.call(F.FUSE_GETXATTR, node, F.FUSE_GETXATTR_IN.pack(1, 0) + b"user.k\0")
    assert e.value.errno == errno.ERANGE
    assert b"user.k\0" in c.call(F.FUSE_LISTXATTR, node, F.FUSE_GETXATTR_IN.pack(4096, 0))
    c.call(F.FUSE_REMOVEXATTR, node, b"user.k\0")
    assert os.listxattr(shared / "x") == []
    c.call(F.FUSE_FALLOCATE, node, F.FUSE_FALLOCATE_IN.pack(fh, 0, 8192, 0, 0))
    assert (shared / "x").stat().st_size == 8192
    assert F.FUSE_LSEEK_OUT.unpack(c.call(F.FUSE_LSEEK, node, F.FUSE_LSEEK_IN.pack(fh, 100, 0, 0))) == (100,)


def test_unknown_opcode_gets_enosys(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    _, _, server, _ = tree
    for opcode in (F.FUSE_GETLK, F.FUSE_IOCTL, F.FUSE_SETUPMAPPING, 999):
        err, _ = fuse_reply(server.handle(fuse_request(opcode, ROOT, bytes(64))))
        assert err == -errno.ENOSYS


def test_destroy_releases_every_handle(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    _, _, server, c = tree
    node, _ = c.lookup(ROOT, "hello.txt")
    c.open(node)
    c.call(F.FUSE_DESTROY, 0)
    assert server.open_handles == 0 and server.inode_count == 1


def test_malformed_requests_get_einval_not_exceptions(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    _, _, server, _ = tree
    assert server.handle(b"short") is None
    req = fuse_request(F.FUSE_LOOKUP, ROOT, b"hello.txt\0")
    err, _ = fuse_reply(server.handle(req[:-3] + b"\0"))  # header length disagrees with the buffer
    assert err == -errno.EINVAL
    err, _ = fuse_reply(server.handle(fuse_request(F.FUSE_READ, ROOT, b"\1\2")))
    assert err == -errno.EINVAL
    err, _ = fuse_reply(server.handle(fuse_request(F.FUSE_LOOKUP, ROOT, b"hello.txt\0"), reply_space=40))
    assert err == -errno.ERANGE


def test_missing_shared_dir(tmp_path: Path) -> None:
    with pytest.raises(FsServerError):
        FuseServer(tmp_path / "absent")


# -- confinement --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "../outside", "sub/inner", "/etc"])
def test_lookup_refuses_dotdot_and_paths(tree: tuple[Path, Path, FuseServer, Client], name: str) -> None:
    _, _, _, c = tree
    with pytest.raises(FuseError):
        c.lookup(ROOT, name)
    sub, _ = c.lookup(ROOT, "sub")
    with pytest.raises(FuseError):
        c.lookup(sub, name)


def test_absolute_symlink_is_never_followed(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    shared, outside, _, c = tree
    (shared / "esc").symlink_to(outside)
    (shared / "escfile").symlink_to(outside / "secret")
    esc, attr = c.lookup(ROOT, "esc")
    assert stat.S_ISLNK(attr[9])
    with pytest.raises(FuseError) as e:
        c.lookup(esc, "secret")  # the symlink is not a directory for us
    assert e.value.errno == errno.ENOTDIR
    escfile, _ = c.lookup(ROOT, "escfile")
    with pytest.raises(FuseError) as e:
        c.open(escfile)
    assert e.value.errno == errno.ELOOP
    with pytest.raises(FuseError):
        c.create(ROOT, "escfile", flags=os.O_RDWR | os.O_TRUNC)  # O_CREAT through a symlink
    # A dangling absolute symlink must not let CREATE make a file outside.
    (shared / "dangling").symlink_to(outside / "planted")
    with pytest.raises(FuseError):
        c.create(ROOT, "dangling", flags=os.O_WRONLY)
    assert not (outside / "planted").exists()
    assert (outside / "secret").read_text() == "top secret"


def test_symlink_swapped_in_after_lookup_stays_confined(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    shared, outside, _, c = tree
    sub, _ = c.lookup(ROOT, "sub")
    # The host-side tree changes under the guest: sub is replaced by a symlink to outside/.
    (shared / "sub").rename(shared / "sub-old")
    (shared / "sub").symlink_to(outside)
    with pytest.raises(FuseError):
        c.lookup(sub, "secret")  # still the old directory, which has no "secret"
    inner, _ = c.lookup(sub, "inner")
    fh = c.open(inner)
    assert c.read(inner, fh, 0, 100) == b"inner"
    node, fh2 = c.create(sub, "written", flags=os.O_RDWR)
    c.write(node, fh2, 0, b"data")
    assert (shared / "sub-old" / "written").read_bytes() == b"data"
    assert sorted(os.listdir(outside)) == ["secret"]
    names = {n for n, _ in c.readdir(sub)}
    assert "secret" not in names and "inner" in names


def test_hard_link_and_rename_cannot_target_outside(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    _, outside, _, c = tree
    hello, _ = c.lookup(ROOT, "hello.txt")
    for body in (b"../x\0", b"/tmp/x\0"):
        with pytest.raises(FuseError):
            c.call(F.FUSE_LINK, ROOT, F.FUSE_LINK_IN.pack(hello) + body)
    with pytest.raises(FuseError):
        c.call(F.FUSE_RENAME, ROOT, F.FUSE_RENAME_IN.pack(ROOT) + b"hello.txt\0../stolen\0")
    assert sorted(os.listdir(outside)) == ["secret"]


# -- hostile requests ----------------------------------------------------------------------------


@pytest.fixture
def fsize_limit() -> Iterator[None]:
    """Writes beyond 16 MiB fail with EFBIG while the fuzzer runs (random fallocate/truncate sizes)."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, old[1]))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, old)
    signal.signal(signal.SIGXFSZ, old_handler)


_names = st.sampled_from([b"hello.txt", b"sub", b"inner", b"new", b"..", b".", b"", b"a/b", b"ln", b"esc"])
#: The argument struct size of each opcode, so most generated requests get past parsing.
_HEAD = {
    F.FUSE_LOOKUP: 0, F.FUSE_FORGET: 8, F.FUSE_GETATTR: 16, F.FUSE_SETATTR: 88, F.FUSE_READLINK: 0,
    F.FUSE_SYMLINK: 0, F.FUSE_MKNOD: 16, F.FUSE_MKDIR: 8, F.FUSE_UNLINK: 0, F.FUSE_RMDIR: 0, F.FUSE_RENAME: 8,
    F.FUSE_LINK: 8, F.FUSE_OPEN: 8, F.FUSE_READ: 40, F.FUSE_WRITE: 40, F.FUSE_STATFS: 0, F.FUSE_RELEASE: 24,
    F.FUSE_FSYNC: 16, F.FUSE_SETXATTR: 8, F.FUSE_GETXATTR: 8, F.FUSE_LISTXATTR: 8, F.FUSE_REMOVEXATTR: 0,
    F.FUSE_FLUSH: 24, F.FUSE_INIT: 16, F.FUSE_OPENDIR: 8, F.FUSE_READDIR: 40, F.FUSE_RELEASEDIR: 24,
    F.FUSE_FSYNCDIR: 16, F.FUSE_ACCESS: 8, F.FUSE_CREATE: 16, F.FUSE_DESTROY: 0, F.FUSE_BATCH_FORGET: 8,
    F.FUSE_FALLOCATE: 32, F.FUSE_READDIRPLUS: 40, F.FUSE_RENAME2: 16, F.FUSE_LSEEK: 24,
}  # fmt: skip
_words = st.lists(st.sampled_from([0, 1, 2, 3, 7, 64, 0o100644, 0o40755, 2**31]), min_size=22, max_size=22)
_step = st.tuples(
    st.sampled_from(sorted(_HEAD)) | st.integers(0, 60),
    st.sampled_from([0, 1, 1, 2, 3, 4, 2**63]),
    _words,
    st.lists(_names, max_size=2),
    st.binary(max_size=64) | st.none(),  # a raw body instead of a plausible one
    st.integers(0, 4096),
)


def _body(opcode: int, words: list[int], names: list[bytes], raw: bytes | None) -> bytes:
    if raw is not None:
        return raw
    data = b"data" if opcode in (F.FUSE_WRITE, F.FUSE_SETXATTR) else b""
    return struct.pack("<22I", *words)[: _HEAD.get(opcode, 0)] + b"".join(n + b"\0" for n in names) + data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(_step, min_size=1, max_size=14))
def test_random_fuse_requests_only_get_replies(tmp_path: Path, fsize_limit: None, steps: list) -> None:  # type: ignore[type-arg]
    base = tmp_path / f"fz{os.getpid()}_{len(os.listdir(tmp_path))}"
    shared, outside = base / "shared", base / "outside"
    shared.mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("s")
    (shared / "hello.txt").write_text("hello")
    (shared / "sub").mkdir()
    (shared / "esc").symlink_to(outside)
    server = FuseServer(shared)
    try:
        for opcode, nodeid, words, names, raw, space in steps:
            request = fuse_request(opcode, nodeid, _body(opcode, words, names, raw))
            reply = server.handle(request, space + 16)
            if reply is not None:
                length, error, _ = struct.unpack_from("<IiQ", reply)
                assert length == len(reply) and length <= space + 16 + 16
                assert error <= 0
    finally:
        server.close()
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_text() == "s"
    assert sorted(os.listdir(base)) == ["outside", "shared"]


def test_special_files_are_never_opened_on_the_host(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    _, _, server, c = tree
    c.call(F.FUSE_MKNOD, ROOT, F.FUSE_MKNOD_IN.pack(stat.S_IFIFO | 0o666, 0, 0, 0) + b"pipe\0")
    nodes = [c.lookup(ROOT, "pipe")[0]]
    if server.set_owner:  # root, on a share that allows devices: a guest-made node for /dev/null (1:3)
        server.policy = FsPolicy(allow_device_nodes=True)
        c.call(
            F.FUSE_MKNOD, ROOT, F.FUSE_MKNOD_IN.pack(stat.S_IFCHR | 0o666, os.makedev(1, 3), 0, 0) + b"dev\0"
        )
        nodes.append(c.lookup(ROOT, "dev")[0])
    for node in nodes:
        for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            with pytest.raises(FuseError) as e:
                c.open(node, flags)  # a FIFO open would block the event thread forever
            assert e.value.errno == errno.EPERM


def test_create_over_an_existing_fifo_is_refused(tree: tuple[Path, Path, FuseServer, Client]) -> None:
    shared, _, _, c = tree
    os.mkfifo(shared / "pipe")
    for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
        with pytest.raises(FuseError) as e:
            c.create(ROOT, "pipe", flags=flags)  # an open would block the event thread
        assert e.value.errno == errno.EPERM
    with pytest.raises(FuseError) as e:
        c.create(ROOT, "pipe", flags=os.O_WRONLY | os.O_EXCL)
    assert e.value.errno == errno.EEXIST


def test_inode_and_handle_limits(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"f{i}").touch()
    server = FuseServer(tmp_path, max_inodes=3, max_handles=1)
    c = Client(server)
    try:
        a, _ = c.lookup(ROOT, "f0")
        c.lookup(ROOT, "f1")
        with pytest.raises(FuseError) as e:
            c.lookup(ROOT, "f2")
        assert e.value.errno == errno.ENFILE
        c.open(a)
        with pytest.raises(FuseError) as e:
            c.open(a)
        assert e.value.errno == errno.ENFILE
    finally:
        server.close()


def test_statistics_count_every_request_by_opcode_the_bad_ones_too(
    tree: tuple[Path, Path, FuseServer, Client],
) -> None:
    _, _, server, c = tree  # the fixture sent one INIT
    node, _ = c.lookup(ROOT, "hello.txt")
    c.lookup(ROOT, "sub")
    c.getattr(node)
    with pytest.raises(FuseError):
        c.lookup(ROOT, "missing")
    server.handle(fuse_request(F.FUSE_FORGET, node, F.FUSE_FORGET_IN.pack(1)))
    server.handle(fuse_request(99, ROOT, b""))  # an opcode nobody serves
    server.handle(b"\0" * 8)  # shorter than a header
    stats = server.statistics()
    assert stats.requests == {"INIT": 1, "LOOKUP": 3, "GETATTR": 1, "FORGET": 1, "OP99": 1, "OP0": 1}
    assert stats.total == 8 and stats.seconds > 0
    assert str(stats).startswith("8 requests in ") and str(stats).endswith(
        ": LOOKUP 3, FORGET 1, GETATTR 1, INIT 1, OP0 1, OP99 1"
    )
