"""Hostile descriptor tables thrown at whole devices: handled, or NEEDS_RESET; never an exception."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kata_virtio import VirtioBlock, VirtioDevice, VirtioFs, VirtioRng
from kata_virtio.testing import DriverQueue, FakeGuestMemory, activate

MEM_BASE, MEM_SIZE = 0x10000, 0x40000
_addr = st.sampled_from(
    [MEM_BASE + 0x20000, MEM_BASE + 0x30000, MEM_BASE + MEM_SIZE - 8, 0, 0x8000]
) | st.integers(0, 1 << 40)
_desc = st.tuples(
    _addr, st.sampled_from([0, 1, 16, 17, 512, 513, 4096, 0x10000]), st.integers(0, 7), st.integers(0, 9)
)
_content = st.binary(min_size=16, max_size=64)


def _run(dev: VirtioDevice, queue: int, descs: list, heads: list, blobs: list) -> None:  # type: ignore[type-arg]
    mem = FakeGuestMemory(MEM_SIZE, base=MEM_BASE)
    queues, irq = activate(dev, mem, [8] * len(dev.queue_max_sizes))
    dq: DriverQueue = queues[queue]
    # Plausible request headers where the descriptors point, so devices get past their first checks.
    for i, blob in enumerate(blobs):
        mem.write(MEM_BASE + 0x20000 + 0x1000 * i, blob)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        dq.write_desc(i, addr, length, flags, nxt)
    for h in heads:
        dq.publish(h)
    dev.notify(queue)  # must not raise
    dev.notify(queue)
    if irq.needs_reset:
        assert dev.broken
    assert len(mem.data) == MEM_SIZE


_blk_hdr = st.builds(
    lambda t, s: struct.pack("<IIQ", t, 0, s), st.sampled_from([0, 1, 4, 8, 11, 99]), st.integers(0, 200)
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descs=st.lists(_desc, min_size=8, max_size=8),
    heads=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    blobs=st.lists(_blk_hdr, min_size=1, max_size=16),
)
def test_block_survives_hostile_tables(tmp_path: Path, descs: list, heads: list, blobs: list) -> None:  # type: ignore[type-arg]
    image = tmp_path / "hostile.img"
    if not image.exists():
        image.write_bytes(bytes(64 * 1024))
    size = os.path.getsize(image)
    dev = VirtioBlock(image)
    try:
        _run(dev, 0, descs, heads, blobs)
    finally:
        dev.close()
    assert os.path.getsize(image) == size  # never written past its end


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    descs=st.lists(_desc, min_size=8, max_size=8),
    heads=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    blobs=st.lists(_content, min_size=1, max_size=16),
)
def test_fs_and_rng_survive_hostile_tables(tmp_path: Path, descs: list, heads: list, blobs: list) -> None:  # type: ignore[type-arg]
    shared = tmp_path / "shared"
    shared.mkdir(exist_ok=True)
    fs = VirtioFs("t", shared)
    try:
        _run(fs, 1, descs, heads, blobs)
    finally:
        fs.close()
    _run(VirtioRng(), 0, descs, heads, blobs)
