"""The virtio-fs device moves FUSE requests between the fake queue and the server."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kata_virtio import DeviceError, VirtioFs
from kata_virtio import _fuse as F
from kata_virtio.testing import FakeGuestMemory, activate, fuse_reply, fuse_request, run_events


def test_config_space_holds_tag_and_queue_count(tmp_path: Path) -> None:
    dev = VirtioFs("kataShared", tmp_path, num_request_queues=2)
    tag, n = struct.unpack("<36sI", dev.read_config(0, 40))
    assert tag.rstrip(b"\0") == b"kataShared" and n == 2
    assert len(dev.queue_max_sizes) == 3 and dev.device_type == 26
    dev.close()
    with pytest.raises(DeviceError):
        VirtioFs("x" * 37, tmp_path)


def test_requests_on_request_queue_and_forget_on_hiprio(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"contents")
    dev = VirtioFs("tag", tmp_path)
    mem = FakeGuestMemory(4 << 20)
    (hiprio, req), irq = activate(dev, mem, [64, 64])
    init = fuse_request(F.FUSE_INIT, 0, F.FUSE_INIT_IN.pack(7, 37, 0, 0) + bytes(48), unique=2)
    look = fuse_request(F.FUSE_LOOKUP, 1, b"f\0", unique=4)
    h1 = req.add_chain([(init, False), (16 + 64, True)])
    h2 = req.add_chain([(look[:40], False), (look[40:], False), (16, True), (128, True)], indirect=True)
    dev.notify(1)
    used = dict(req.get_used())
    assert used[h1] == 80 and fuse_reply(req.written(h1))[0] == 0
    err, entry = fuse_reply(req.written(h2, used[h2]))
    assert err == 0 and F.FUSE_ATTR.unpack_from(entry, 40)[1] == 8
    nodeid = F.FUSE_ENTRY_OUT_HEAD.unpack_from(entry)[0]
    assert irq.used == [1]
    forget = hiprio.add_chain([(fuse_request(F.FUSE_FORGET, nodeid, F.FUSE_FORGET_IN.pack(1)), False)])
    dev.notify(0)
    assert hiprio.get_used() == [(forget, 0)]
    assert dev.server.inode_count == 1
    dev.reset()
    dev.close()


def test_reply_larger_than_buffer_is_erange(tmp_path: Path) -> None:
    dev = VirtioFs("tag", tmp_path)
    mem = FakeGuestMemory(1 << 20)
    (_, req), _ = activate(dev, mem, [16, 16])
    head = req.add_chain([(fuse_request(F.FUSE_GETATTR, 1, bytes(16)), False), (32, True)])
    dev.notify(1)
    [(h, n)] = req.get_used()
    assert h == head and n == 16
    assert fuse_reply(req.written(head, n))[0] < 0
    dev.close()


def test_oversized_request_chain_is_refused_without_copying(tmp_path: Path) -> None:
    dev = VirtioFs("tag", tmp_path)
    mem = FakeGuestMemory(4 << 20)
    (_, req), irq = activate(dev, mem, [16, 16])
    request = fuse_request(F.FUSE_WRITE, 1, bytes(40))
    # The same 1 MiB region listed three times: 3 MiB of "request", more than any real one.
    big = req.alloc(1 << 20)
    mem.write(big, request)
    req.write_desc(0, big, 1 << 20, 1, 1)
    req.write_desc(1, big, 1 << 20, 1, 2)
    req.write_desc(2, big, 1 << 20, 1, 3)
    out = req.alloc(64)
    req.write_desc(3, out, 64, 2, 0)
    req.publish(0)
    dev.notify(1)
    run_events(dev)  # a WRITE is a worker's job
    [(head, n)] = req.get_used()
    err, _ = fuse_reply(mem.read(out, n))
    assert head == 0 and err < 0 and irq.needs_reset == []
    dev.close()
