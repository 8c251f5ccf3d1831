"""Issue 11: a hypothesis state machine of FUSE operations a hostile guest interleaves with device resets.

Invariants after every step: the server holds exactly the fds the guest's references account for (no fd
leak), every host file holds only bytes written through its own handles (no cross-file write), and the
server's tables match the guest's view (bounded by what the guest holds, nothing cached behind it).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kata_virtio import FuseServer
from kata_virtio import _fuse as F
from kata_virtio.testing import FuseClient, FuseError, fuse_request

ROOT = F.FUSE_ROOT_ID
FILES = ["a", "b", "c"]
DIR_ENTRIES = 300


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class FuseGuest(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="fuse-sm-"))
        for name in FILES:
            (self.base / name).write_bytes(b"")
        (self.base / "dir").mkdir()
        for i in range(DIR_ENTRIES):
            (self.base / "dir" / f"entry-{i:04d}").write_bytes(b"")
        self.fds_before = _fds()
        self.server = FuseServer(self.base)
        self.client = FuseClient(self.server)
        self.client.init()
        self.nlookup: dict[str, int] = {}
        self.node: dict[str, int] = {}
        self.files: list[tuple[str, int]] = []  # (name, fh) the guest holds open
        self.dirs: list[tuple[int, int]] = []  # (fh, next offset)
        self.stale: list[tuple[str, int, int]] = []  # (name, nodeid, fh) from before a reset
        self.lookups_by_readdirplus = 0

    def teardown(self) -> None:
        self.server.close()
        assert _fds() == self.fds_before  # every fd the server opened is closed
        shutil.rmtree(self.base)

    # -- rules ---------------------------------------------------------------------------------

    @rule(name=st.sampled_from([*FILES, "dir"]))
    def lookup(self, name: str) -> None:
        node, _ = self.client.lookup(ROOT, name)
        assert self.node.setdefault(name, node) == node
        self.nlookup[name] = self.nlookup.get(name, 0) + 1

    @precondition(lambda self: self.nlookup)
    @rule(data=st.data())
    def forget(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.nlookup)))
        count = data.draw(st.integers(1, self.nlookup[name]))
        self.server.handle(fuse_request(F.FUSE_FORGET, self.node[name], F.FUSE_FORGET_IN.pack(count)))
        self.nlookup[name] -= count
        if not self.nlookup[name]:
            del self.nlookup[name], self.node[name]

    @precondition(lambda self: any(n in self.nlookup for n in FILES))
    @rule(data=st.data())
    def open(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from([n for n in FILES if n in self.nlookup]))
        self.files.append((name, self.client.open(self.node[name], os.O_RDWR)))

    @precondition(lambda self: self.files)
    @rule(data=st.data(), offset=st.integers(0, 4096), size=st.integers(1, 512))
    def write(self, data: st.DataObject, offset: int, size: int) -> None:
        name, fh = data.draw(st.sampled_from(self.files))
        node = self.node.get(name, ROOT)  # the guest may have forgotten the inode: the handle stays good
        assert self.client.write(node, fh, offset, name.encode() * size) == size

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        name, fh = self.files.pop(data.draw(st.integers(0, len(self.files) - 1)))
        self.client.release(self.node.get(name, ROOT), fh)

    @precondition(lambda self: "dir" in self.nlookup)
    @rule()
    def opendir(self) -> None:
        out = self.client.call(F.FUSE_OPENDIR, self.node["dir"], F.FUSE_OPEN_IN.pack(0, 0))
        self.dirs.append((F.FUSE_OPEN_OUT.unpack(out)[0], 0))

    @precondition(lambda self: self.dirs and "dir" in self.nlookup)
    @rule(data=st.data(), plus=st.booleans(), size=st.sampled_from([512, 4096, 65536]))
    def readdir(self, data: st.DataObject, plus: bool, size: int) -> None:
        i = data.draw(st.integers(0, len(self.dirs) - 1))
        fh, offset = self.dirs[i]
        opcode = F.FUSE_READDIRPLUS if plus else F.FUSE_READDIR
        out = self.client.call(opcode, self.node["dir"], F.FUSE_READ_IN.pack(fh, offset, size, 0, 0, 0, 0))
        assert len(out) <= size
        pos = 0
        while pos < len(out):
            if plus:
                child = F.FUSE_ENTRY_OUT_HEAD.unpack_from(out, pos)[0]
                pos += F.FUSE_ENTRY_OUT_SIZE
                if child:  # a lookup reference the guest now holds: give it back as the kernel would
                    self.server.handle(fuse_request(F.FUSE_FORGET, child, F.FUSE_FORGET_IN.pack(1)))
            _ino, offset, namelen, _ = F.FUSE_DIRENT_HEAD.unpack_from(out, pos)
            pos += F.dirent_align(24 + namelen)
        self.dirs[i] = (fh, offset)

    @precondition(lambda self: self.dirs and "dir" in self.nlookup)
    @rule(data=st.data(), offset=st.integers(0, 2**64 - 1), plus=st.booleans())
    def readdir_at_a_made_up_offset(self, data: st.DataObject, offset: int, plus: bool) -> None:
        fh, _ = data.draw(st.sampled_from(self.dirs))
        opcode = F.FUSE_READDIRPLUS if plus else F.FUSE_READDIR
        request = fuse_request(opcode, self.node["dir"], F.FUSE_READ_IN.pack(fh, offset, 4096, 0, 0, 0, 0))
        reply = self.server.handle(request, 4096 + 16)
        assert reply is not None and len(reply) <= 4096 + 16
        if plus and len(reply) > 16:  # whatever it listed is a lookup reference the guest holds now
            pos = 16
            while pos < len(reply):
                child = F.FUSE_ENTRY_OUT_HEAD.unpack_from(reply, pos)[0]
                if child:
                    self.server.handle(fuse_request(F.FUSE_FORGET, child, F.FUSE_FORGET_IN.pack(1)))
                namelen = F.FUSE_DIRENT_HEAD.unpack_from(reply, pos + F.FUSE_ENTRY_OUT_SIZE)[2]
                pos += F.FUSE_ENTRY_OUT_SIZE + F.dirent_align(24 + namelen)

    @precondition(lambda self: self.dirs)
    @rule(data=st.data())
    def releasedir(self, data: st.DataObject) -> None:
        fh, _ = self.dirs.pop(data.draw(st.integers(0, len(self.dirs) - 1)))
        self.client.release(self.node.get("dir", ROOT), fh, F.FUSE_RELEASEDIR)

    @rule()
    def reset(self) -> None:
        self.stale += [(name, self.node.get(name, ROOT), fh) for name, fh in self.files]
        self.server.reset()
        self.nlookup.clear()
        self.node.clear()
        self.files.clear()
        self.dirs.clear()

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def write_stale(self, data: st.DataObject) -> None:
        _name, node, fh = data.draw(st.sampled_from(self.stale))
        try:
            self.client.write(node, fh, 0, b"X" * 64)
        except FuseError as e:
            assert e.errno == errno.EBADF
        else:
            raise AssertionError("a handle from before the reset still wrote")

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def tables_match_the_guest(self) -> None:
        assert self.server.open_handles == len(self.files) + len(self.dirs)
        assert self.server.inode_count == 1 + len(self.nlookup)

    @invariant()
    def no_fd_beyond_what_the_guest_holds(self) -> None:
        # the root fd, one O_PATH fd per known inode, one per open handle
        assert _fds() == self.fds_before + 1 + len(self.nlookup) + len(self.files) + len(self.dirs)

    @invariant()
    def files_hold_only_their_own_bytes(self) -> None:
        for name in FILES:
            assert set((self.base / name).read_bytes()) <= {0, ord(name)}, name


TestFuseGuest = FuseGuest.TestCase
TestFuseGuest.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)
