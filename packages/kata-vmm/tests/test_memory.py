"""Guest memory: bounds checks, region lookup, the kata-virtio GuestMemory contract."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kata_virtio import GuestAddressError, GuestMemory
from kata_vmm._errors import ConfigError, GuestMemoryError, SnapshotError, VmmError
from kata_vmm._layout import HIGH_RAM_START, MMIO_GAP_START, MiB, ram_ranges, virtio_mmio_slot
from kata_vmm._memory import GuestAddress, GuestMemoryMmap

PAGE = 4096


@pytest.fixture
def mem() -> Iterator[GuestMemoryMmap]:
    # two adjacent regions and one after a hole: [0, 2p) [2p, 4p) hole [8p, 9p)
    m = GuestMemoryMmap(
        [(GuestAddress(0), 2 * PAGE), (GuestAddress(2 * PAGE), 2 * PAGE), (GuestAddress(8 * PAGE), PAGE)]
    )
    yield m
    m.close()


def test_guest_memory_satisfies_kata_virtio_protocol(mem: GuestMemoryMmap) -> None:
    assert isinstance(mem, GuestMemory)


def test_out_of_range_error_is_both_vmm_and_virtio_error() -> None:
    assert issubclass(GuestMemoryError, VmmError)
    assert issubclass(GuestMemoryError, GuestAddressError)


def test_write_then_read_round_trips_across_adjacent_regions(mem: GuestMemoryMmap) -> None:
    data = bytes(range(256)) * 2
    mem.write(2 * PAGE - 100, data)
    assert mem.read(2 * PAGE - 100, len(data)) == data


@pytest.mark.parametrize(
    ("addr", "size"),
    [(4 * PAGE - 1, 2), (4 * PAGE, 1), (9 * PAGE - 4, 8), (9 * PAGE, 1), (-1, 1), (1 << 40, 1)],
)
def test_access_outside_ram_raises(mem: GuestMemoryMmap, addr: int, size: int) -> None:
    with pytest.raises(GuestAddressError):
        mem.read(addr, size)
    with pytest.raises(GuestMemoryError):
        mem.write(addr, b"x" * size)


def test_failed_write_that_crosses_a_hole_reports_error(mem: GuestMemoryMmap) -> None:
    with pytest.raises(GuestMemoryError, match="leaves RAM"):
        mem.write(4 * PAGE - 2, b"abcd")


def test_view_is_zero_copy_and_limited_to_one_region(mem: GuestMemoryMmap) -> None:
    view = mem.view(8 * PAGE + 16, 4)
    view[:] = b"WXYZ"
    view.release()
    assert mem.read(8 * PAGE + 16, 4) == b"WXYZ"
    with pytest.raises(GuestMemoryError):
        mem.view(2 * PAGE - 2, 4)


def test_host_address_is_stable_and_distinct_per_region(mem: GuestMemoryMmap) -> None:
    a = mem.host_address(0)
    assert mem.host_address(100) == a + 100
    assert mem.host_address(8 * PAGE) != a + 8 * PAGE or mem.regions[2].host_addr == a + 8 * PAGE


def test_overlapping_or_unaligned_regions_are_rejected() -> None:
    with pytest.raises(ConfigError):
        GuestMemoryMmap([(GuestAddress(0), 2 * PAGE), (GuestAddress(PAGE), PAGE)])
    with pytest.raises(ConfigError):
        GuestMemoryMmap([(GuestAddress(0), 100)])


def test_shared_memory_is_backed_by_a_memfd() -> None:
    m = GuestMemoryMmap([(GuestAddress(0), PAGE)], shared=True)
    try:
        assert m.regions[0].fd >= 0
        m.write_u32(8, 0xDEADBEEF)
        assert m.read_u32(8) == 0xDEADBEEF
    finally:
        m.close()


def test_ram_is_memfd_backed_from_the_start() -> None:
    m = GuestMemoryMmap([(GuestAddress(0), PAGE)])
    try:
        assert m.regions[0].fd >= 0  # a snapshot of memory is writing that file out
    finally:
        m.close()


def _saved(tmp_path: Path, m: GuestMemoryMmap) -> list[Path]:
    paths = [tmp_path / f"mem-{i}" for i in range(len(m.regions))]
    fds = [os.open(p, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600) for p in paths]
    try:
        m.save(fds)
    finally:
        for fd in fds:
            os.close(fd)
    return paths


def test_saved_memory_is_sparse_and_restores_copy_on_write(tmp_path: Path) -> None:
    size = 64 * MiB
    m = GuestMemoryMmap([(GuestAddress(0), size), (GuestAddress(size + PAGE), 4 * PAGE)])
    try:
        m.write(5 * MiB, b"hello")
        m.write(size + PAGE, b"high")
        paths = _saved(tmp_path, m)
    finally:
        m.close()
    assert paths[0].stat().st_size == size
    assert paths[0].stat().st_blocks * 512 <= 2 * MiB  # the untouched 63 MiB stay holes
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        clones = [GuestMemoryMmap.from_files([(0, size), (size + PAGE, 4 * PAGE)], fds) for _ in range(2)]
    finally:
        for fd in fds:
            os.close(fd)
    try:
        for clone in clones:
            assert clone.read(5 * MiB, 5) == b"hello" and clone.read(size + PAGE, 4) == b"high"
            assert clone.regions[0].fd == -1  # a private mapping of the file
        clones[0].write(5 * MiB, b"HELLO")  # copy-on-write: neither the file nor the sibling sees it
        assert clones[1].read(5 * MiB, 5) == b"hello"
        assert paths[0].read_bytes()[5 * MiB : 5 * MiB + 5] == b"hello"
        (tmp_path / "again").mkdir()
        again = _saved(tmp_path / "again", clones[0])
        assert again[0].read_bytes()[5 * MiB : 5 * MiB + 5] == b"HELLO"
    finally:
        for clone in clones:
            clone.close()


def test_shared_restore_copies_the_file_into_a_memfd(tmp_path: Path) -> None:
    m = GuestMemoryMmap([(GuestAddress(0), 4 * PAGE)])
    try:
        m.write(PAGE, b"data")
        [path] = _saved(tmp_path, m)
    finally:
        m.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        clone = GuestMemoryMmap.from_files([(0, 4 * PAGE)], [fd], shared=True)
    finally:
        os.close(fd)
    try:
        assert clone.regions[0].fd >= 0 and clone.read(PAGE, 4) == b"data"
    finally:
        clone.close()


def test_memory_file_of_another_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(bytes(PAGE))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(SnapshotError, match="holds 4096 bytes"):
            GuestMemoryMmap.from_files([(0, 2 * PAGE)], [fd])
    finally:
        os.close(fd)


@settings(max_examples=60, deadline=None)
@given(
    addr=st.integers(min_value=-16, max_value=10 * PAGE), size=st.integers(min_value=0, max_value=3 * PAGE)
)
def test_read_succeeds_exactly_when_range_is_ram(addr: int, size: int) -> None:
    m = GuestMemoryMmap([(GuestAddress(0), 4 * PAGE), (GuestAddress(8 * PAGE), PAGE)])
    try:
        # no byte of an empty range lies outside RAM, so only its address must be valid
        in_ram = addr + size <= 4 * PAGE or (addr >= 8 * PAGE and addr + size <= 9 * PAGE)
        inside = addr >= 0 and (size == 0 or in_ram)
        if inside:
            assert len(m.read(addr, size)) == size
        else:
            with pytest.raises(GuestMemoryError):
                m.read(addr, size)
    finally:
        m.close()


def test_ram_ranges_split_around_the_mmio_gap() -> None:
    assert ram_ranges(512 * MiB) == [(0, 512 * MiB)]
    assert ram_ranges(4096 * MiB) == [(0, MMIO_GAP_START), (HIGH_RAM_START, 4096 * MiB - MMIO_GAP_START)]


def test_virtio_mmio_slots_are_page_spaced_with_their_own_irq() -> None:
    assert virtio_mmio_slot(0) == (0xD000_0000, 5)
    assert virtio_mmio_slot(2) == (0xD000_2000, 7)
    with pytest.raises(ValueError):
        virtio_mmio_slot(32)


def test_discard_frees_memfd_pages_and_reads_zeros(mem: GuestMemoryMmap) -> None:
    from kata_vmm._memory import _data_ranges

    mem.write(PAGE, b"\xaa" * 3 * PAGE)  # pages 1..3, across the two adjacent regions
    mem.discard(PAGE, 2 * PAGE)
    first, second = mem.regions[0], mem.regions[1]
    # holes in the memfds again (looked at before reading: a read fault on shmem allocates a page)
    assert _data_ranges(first.fd, first.size) == []
    assert _data_ranges(second.fd, second.size) == [(PAGE, 2 * PAGE)]
    assert mem.read(PAGE, 2 * PAGE) == bytes(2 * PAGE)
    assert mem.read(3 * PAGE, 4) == b"\xaa" * 4


@pytest.mark.parametrize(
    ("addr", "size"),
    [(1, PAGE), (0, 100), (3 * PAGE, 2 * PAGE), (7 * PAGE, 2 * PAGE), (-PAGE, PAGE), (8 * PAGE, 2 * PAGE)],
)
def test_discard_refuses_unaligned_or_non_ram_and_discards_nothing(
    mem: GuestMemoryMmap, addr: int, size: int
) -> None:
    mem.write(0, b"\x55" * 4 * PAGE)
    mem.write(8 * PAGE, b"\x55" * PAGE)
    with pytest.raises(GuestMemoryError):
        mem.discard(addr, size)
    assert mem.read(0, 4 * PAGE) == b"\x55" * 4 * PAGE
    assert mem.read(8 * PAGE, PAGE) == b"\x55" * PAGE


def test_discard_of_a_copy_on_write_region_drops_private_pages(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    path.write_bytes(b"\x11" * 2 * PAGE)
    fd = os.open(path, os.O_RDONLY)
    try:
        m = GuestMemoryMmap.from_files([(GuestAddress(0), 2 * PAGE)], [fd])
        try:
            m.write(0, b"\x22" * 2 * PAGE)
            m.discard(0, PAGE)
            assert m.read(0, 2) == b"\x11\x11"  # the file again
            assert m.read(PAGE, 2) == b"\x22\x22"
        finally:
            m.close()
    finally:
        os.close(fd)
