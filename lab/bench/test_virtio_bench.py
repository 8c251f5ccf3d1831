"""Host micro-benchmarks of kata-virtio's device paths through the fake driver queue (no guest, no KVM).

Run: .nox/tests/bin/pytest lab/bench/test_virtio_bench.py --benchmark-columns=mean,ops,rounds
They measure the Python cost per request of the queue + device logic; they never gate on a time.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from kata_virtio import VirtioBlock, VirtioFs, VirtioRng, VirtioVsock
from kata_virtio import _fuse as F
from kata_virtio._vsock import VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_RESPONSE, VSOCK_HDR
from kata_virtio.testing import DriverQueue, FakeGuestMemory, activate, fuse_reply, fuse_request, run_events

BLOCK = 64 * 1024


@pytest.fixture
def block(tmp_path: Path) -> Iterator[tuple[VirtioBlock, DriverQueue]]:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(16 << 20))
    dev = VirtioBlock(image, read_only=True)
    (dq,), _ = activate(dev, FakeGuestMemory(8 << 20), [256])
    yield dev, dq
    dev.close()


def test_block_read_64k(benchmark: BenchmarkFixture, block: tuple[VirtioBlock, DriverQueue]) -> None:
    """One 64 KiB virtio-blk read request: descriptor walk, preadv into guest memory, used ring."""
    dev, dq = block
    sectors = (16 << 20) // 512
    state = {"sector": 0}
    data_addr = dq.alloc(BLOCK)
    hdr_addr = dq.alloc(16)
    status_addr = dq.alloc(1)

    def one() -> None:
        dq.memory.write(hdr_addr, struct.pack("<IIQ", 0, 0, state["sector"]))
        state["sector"] = (state["sector"] + BLOCK // 512) % sectors
        dq.write_desc(0, hdr_addr, 16, 1, 1)
        dq.write_desc(1, data_addr, BLOCK, 3, 2)
        dq.write_desc(2, status_addr, 1, 2, 0)
        dq.publish(0)
        dev.notify(0)
        [(_, n)] = dq.get_used()
        assert n == BLOCK + 1

    dq._free = []  # descriptors 0-2 are managed by hand above
    benchmark(one)
    assert benchmark.stats is not None
    benchmark.extra_info["MB/s"] = round(BLOCK / benchmark.stats["mean"] / 1e6, 1)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[tuple[VirtioFs, DriverQueue]]:
    shared = tmp_path / "shared"
    shared.mkdir()
    for i in range(100):
        (shared / f"f{i}").write_bytes(os.urandom(4096))
    dev = VirtioFs("bench", shared)
    (_, req), _ = activate(dev, FakeGuestMemory(8 << 20), [64, 64])
    init = fuse_request(F.FUSE_INIT, 0, F.FUSE_INIT_IN.pack(7, 31, 0, 0))
    req.add_chain([(init, False), (80, True)])
    dev.notify(1)
    req.get_used()
    yield dev, req
    dev.close()


def test_fs_lookup_getattr_read_small_file(
    benchmark: BenchmarkFixture, fs: tuple[VirtioFs, DriverQueue]
) -> None:
    """LOOKUP + GETATTR + OPEN + READ 4 KiB + RELEASE + FORGET of a small file, each through the queue."""
    dev, q = fs
    counter = {"i": 0}

    def call(opcode: int, nodeid: int, body: bytes, space: int) -> bytes:
        head = q.add_chain([(fuse_request(opcode, nodeid, body), False), (space, True)], indirect=True)
        dev.notify(1)
        run_events(dev)  # READ is a worker's job: its answer comes through the device's event
        [(h, n)] = q.get_used()
        err, payload = fuse_reply(q.written(h, n))
        assert err == 0 and h == head
        return payload

    def one() -> None:
        name = f"f{counter['i'] % 100}".encode()
        counter["i"] += 1
        entry = call(F.FUSE_LOOKUP, 1, name + b"\0", 16 + 128)
        node = F.FUSE_ENTRY_OUT_HEAD.unpack_from(entry)[0]
        call(F.FUSE_GETATTR, node, F.FUSE_GETATTR_IN.pack(0, 0, 0), 16 + 104)
        fh = F.FUSE_OPEN_OUT.unpack(call(F.FUSE_OPEN, node, F.FUSE_OPEN_IN.pack(0, 0), 32))[0]
        assert len(call(F.FUSE_READ, node, F.FUSE_READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0), 16 + 4096)) == 4096
        call(F.FUSE_RELEASE, node, F.FUSE_RELEASE_IN.pack(fh, 0, 0, 0), 16)
        q.add_chain([(fuse_request(F.FUSE_FORGET, node, F.FUSE_FORGET_IN.pack(1)), False)])
        dev.notify(1)
        q.get_used()

    benchmark(one)
    assert benchmark.stats is not None
    benchmark.extra_info["files/s"] = round(1 / benchmark.stats["mean"])


def test_rng_4k(benchmark: BenchmarkFixture) -> None:
    """One 4 KiB virtio-rng request: the floor cost of a queue round trip."""
    dev = VirtioRng()
    (dq,), _ = activate(dev, FakeGuestMemory(1 << 20), [16])

    def one() -> None:
        dq.add_chain([(4096, True)])
        dev.notify(0)
        dq.get_used()

    benchmark(one)


@pytest.fixture
def vsock_conn(tmp_path: Path) -> Iterator[tuple[VirtioVsock, DriverQueue, DriverQueue, socket.socket]]:
    """An established host-initiated stream with 64 KiB guest receive buffers."""
    dev = VirtioVsock(tmp_path / "bench.sock")
    mem = FakeGuestMemory(32 << 20)
    (rx, tx, _), _ = activate(dev, mem, [256, 256, 16])
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(dev.uds_path)
    client.sendall(b"CONNECT 1024\n")
    _pump(dev)
    for _ in range(100):
        rx.add_chain([(VSOCK_HDR.size + 65536, True)], indirect=True)
    dev.notify(0)
    [(head, n)] = rx.get_used()
    req = VSOCK_HDR.unpack_from(rx.written(head, n))
    resp = VSOCK_HDR.pack(3, 2, 1024, req[2], 0, 1, VIRTIO_VSOCK_OP_RESPONSE, 0, 1 << 22, 0)
    tx.add_chain([(resp, False)])
    dev.notify(1)
    tx.get_used()
    _pump(dev)
    assert client.recv(64).startswith(b"OK ")
    yield dev, rx, tx, client
    client.close()
    dev.close()


def _pump(dev: VirtioVsock) -> None:
    for _ in range(1000):
        poller = select.poll()
        for fd, ev in dev.watched().items():
            poller.register(fd, ev)
        ready = poller.poll(0)
        if not ready:
            return
        for fd, ev in ready:
            dev.handle_event(fd, ev)


def test_vsock_host_to_guest_1mib(
    benchmark: BenchmarkFixture, vsock_conn: tuple[VirtioVsock, DriverQueue, DriverQueue, socket.socket]
) -> None:
    """1 MiB from a host unix socket into guest receive buffers (64 KiB RW packets), buffers recycled."""
    dev, rx, tx, client = vsock_conn
    port = next(iter(dev._conns))[0]
    chunk = os.urandom(64 * 1024)
    fwd = {"cnt": 0}

    def one() -> None:
        got = 0
        for _ in range(16):
            client.sendall(chunk)
            _pump(dev)
            for _head, n in rx.get_used():
                got += n - VSOCK_HDR.size
                rx.add_chain([(VSOCK_HDR.size + 65536, True)], indirect=True)
            dev.notify(0)
        assert got == 1 << 20
        # The guest driver reports what it consumed, as Linux does with CREDIT_UPDATE.
        fwd["cnt"] = (fwd["cnt"] + got) & 0xFFFFFFFF
        update = VSOCK_HDR.pack(3, 2, 1024, port, 0, 1, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, 1 << 22, fwd["cnt"])
        tx.add_chain([(update, False)])
        dev.notify(1)
        tx.get_used()

    benchmark(one)
    assert benchmark.stats is not None
    benchmark.extra_info["MB/s"] = round((1 << 20) / benchmark.stats["mean"] / 1e6, 1)
