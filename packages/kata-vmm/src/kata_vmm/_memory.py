"""Guest RAM: file-backed mappings registered with KVM as memory slots, with bounds-checked access.

A fresh VM's RAM is a memfd per region mapped MAP_SHARED, so a snapshot of memory is writing that file
out (`GuestMemoryMmap.save`, sparse: holes and zero pages stay holes) and another process (a vhost-user
daemon) can map it too. A restored VM maps the saved files MAP_PRIVATE (`GuestMemoryMmap.from_files`):
copy-on-write, every clone of one snapshot shares the file's page-cache pages until it writes them.

`GuestMemoryMmap` satisfies ``kata_virtio.GuestMemory``; every access outside
RAM raises `GuestMemoryError`, a subclass of both `VmmError` and
``kata_virtio.GuestAddressError``.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
from dataclasses import dataclass, field
from typing import NewType

from kata_vmm._errors import ConfigError, GuestMemoryError, SnapshotError

GuestAddress = NewType("GuestAddress", int)
"""A guest-physical address; never a host pointer or an offset into a host mapping."""


@dataclass
class MemoryRegion:
    """One contiguous guest-physical range backed by one host mapping."""

    guest_addr: GuestAddress
    size: int
    mapping: mmap.mmap
    fd: int = -1
    """The memfd behind a MAP_SHARED region; -1 for a private (copy-on-write) mapping of a saved file."""
    hotplug: bool = False
    """A virtio-mem region: mapped and in a KVM slot, but not boot RAM (not in the e820 map)."""
    host_addr: int = field(init=False)
    _anchor: ctypes.Array[ctypes.c_char] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # The ctypes view pins the mapping (mmap will not close under it) and yields the host address.
        self._anchor = (ctypes.c_char * self.size).from_buffer(self.mapping)
        self.host_addr = ctypes.addressof(self._anchor)

    @property
    def end(self) -> int:
        """First guest-physical address past the region."""
        return self.guest_addr + self.size

    def contains(self, addr: int, size: int) -> bool:
        """Whether ``[addr, addr + size)`` lies inside this region."""
        return self.guest_addr <= addr and addr + size <= self.end

    def close(self) -> None:
        """Unmap the region (no view into it may remain)."""
        del self._anchor
        self.mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GuestMemoryMmap:
    """The guest's RAM: non-overlapping regions, sorted by guest address."""

    def __init__(
        self,
        ranges: list[tuple[GuestAddress, int]],
        *,
        shared: bool = False,
        files: list[int] | None = None,
        hotplug: tuple[GuestAddress, int] | None = None,
    ) -> None:
        """Map one memfd-backed region per ``(guest_addr, size)`` (MAP_SHARED, so a snapshot is writing
        the memfd out and a vhost-user daemon can map it: ``shared`` is kept for callers that ask for
        that explicitly and changes nothing now).

        With ``files`` (one open fd per range, sorted by guest address; the caller keeps and closes
        them), each region maps its saved file instead: MAP_PRIVATE, copy-on-write, or, with ``shared``,
        a fresh memfd filled from the file (a vhost-user daemon must see the guest's writes).

        ``hotplug`` adds one more region above every RAM range, a fresh memfd (its pages exist only once
        the guest touches them: memfds are not charged up front) flagged `MemoryRegion.hotplug`: the
        memory a virtio-mem device hands out."""
        self.regions: list[MemoryRegion] = []
        try:
            last_end = -1
            ordered = sorted(ranges)
            if files is not None and len(files) != len(ordered):
                raise ConfigError(f"{len(files)} memory files for {len(ordered)} regions")
            for i, (guest_addr, size) in enumerate(ordered):
                if size <= 0 or size % mmap.PAGESIZE or guest_addr % mmap.PAGESIZE:
                    raise ConfigError(f"memory region {guest_addr:#x}+{size:#x} is not page aligned")
                if guest_addr < last_end:
                    raise ConfigError(f"memory region at {guest_addr:#x} overlaps the previous one")
                last_end = guest_addr + size
                source = None if files is None else files[i]
                self.regions.append(self._map(guest_addr, size, source, copy=shared))
            if hotplug is not None:
                guest_addr, size = hotplug
                if size <= 0 or size % mmap.PAGESIZE or guest_addr % mmap.PAGESIZE or guest_addr < last_end:
                    raise ConfigError(
                        f"hot-plug region {guest_addr:#x}+{size:#x} is unaligned or overlaps RAM"
                    )
                region = self._map(guest_addr, size, None, copy=False)
                region.hotplug = True
                self.regions.append(region)
        except BaseException:
            self.close()
            raise
        self._starts = [r.guest_addr for r in self.regions]

    @classmethod
    def from_files(
        cls, ranges: list[tuple[GuestAddress, int]], files: list[int], *, shared: bool = False
    ) -> GuestMemoryMmap:
        """RAM restored from saved memory files (see the constructor's ``files``)."""
        return cls(ranges, shared=shared, files=files)

    @staticmethod
    def _map(guest_addr: GuestAddress, size: int, source: int | None, *, copy: bool) -> MemoryRegion:
        try:
            if source is not None:
                if os.fstat(source).st_size != size:
                    raise SnapshotError(
                        f"memory file of region {guest_addr:#x} holds {os.fstat(source).st_size} bytes, "
                        f"not {size}"
                    )
                if not copy:
                    prot = mmap.PROT_READ | mmap.PROT_WRITE
                    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0)
                    return MemoryRegion(guest_addr, size, mmap.mmap(source, size, flags, prot))
            fd = os.memfd_create(f"kata-vmm-ram-{guest_addr:x}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                if source is not None:
                    _copy_sparse(source, fd, size)
                mapping = mmap.mmap(fd, size, mmap.MAP_SHARED)
            except BaseException:
                os.close(fd)
                raise
            return MemoryRegion(guest_addr, size, mapping, fd)
        except OSError as err:
            raise ConfigError(f"cannot map {size // (1 << 20)} MiB of guest memory: {err.strerror}") from err

    def save(self, fds: list[int]) -> None:
        """Write each region into its fd (a fresh, empty file each; `regions` order), sparse: ranges that
        are holes in the memfd, and chunks of zeros, are left as holes. Run with every vCPU paused."""
        if len(fds) != len(self.regions):
            raise SnapshotError(f"{len(fds)} memory files for {len(self.regions)} regions")
        for region, fd in zip(self.regions, fds, strict=True):
            try:
                os.ftruncate(fd, region.size)
                view = memoryview(region.mapping)
                try:
                    for start, end in _data_ranges(region.fd, region.size):
                        for off in range(start, end, SAVE_CHUNK):
                            # a copy compares with memcmp (a memoryview compares item by item: 10x slower)
                            chunk = bytes(view[off : min(end, off + SAVE_CHUNK)])
                            if chunk != _ZERO_CHUNK[: len(chunk)]:
                                _pwrite_all(fd, memoryview(chunk), off)
                finally:
                    view.release()
            except OSError as err:
                raise SnapshotError(f"cannot write guest memory: {err.strerror}") from err

    @property
    def size(self) -> int:
        """Total boot RAM in bytes (the hot-plug region not counted)."""
        return sum(r.size for r in self.regions if not r.hotplug)

    def _find(self, addr: int) -> MemoryRegion | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self.regions[i].end:
            return self.regions[i]
        return None

    def region_of(self, addr: int, size: int) -> MemoryRegion:
        """The one region holding all of ``[addr, addr + size)``; raises `GuestMemoryError` otherwise."""
        region = self._find(addr) if addr >= 0 and size >= 0 else None
        if region is None or not region.contains(addr, size):
            raise GuestMemoryError(f"guest range {addr:#x}+{size:#x} is not inside one RAM region")
        return region

    def check_range(self, addr: int, size: int) -> None:
        """Raise `GuestMemoryError` unless every byte of ``[addr, addr + size)`` is RAM."""
        self._chunks(addr, size)

    def _chunks(self, addr: int, size: int) -> list[tuple[MemoryRegion, int, int]]:
        if addr < 0 or size < 0:
            raise GuestMemoryError(f"invalid guest range {addr:#x}+{size:#x}")
        chunks = []
        pos, left = addr, size
        while left:
            region = self._find(pos)
            if region is None:
                raise GuestMemoryError(f"guest range {addr:#x}+{size:#x} leaves RAM at {pos:#x}")
            n = min(left, region.end - pos)
            chunks.append((region, pos - region.guest_addr, n))
            pos += n
            left -= n
        return chunks

    def _within_one(self, addr: int, size: int) -> tuple[mmap.mmap, int] | None:
        """(mapping, offset) when ``[addr, addr + size)`` lies in one region: the common case, served
        without building a chunk list (device queues access guest memory a few times per request)."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or size < 0:
            return None
        region = self.regions[i]
        off = addr - region.guest_addr
        if off + size > region.size:
            return None
        return region.mapping, off

    def read(self, addr: int, size: int) -> bytes:
        """Copy ``size`` bytes from guest-physical ``addr`` (may span adjacent regions)."""
        one = self._within_one(addr, size)
        if one is not None:
            mapping, off = one
            return mapping[off : off + size]
        chunks = self._chunks(addr, size)
        if len(chunks) == 1:
            region, off, n = chunks[0]
            return region.mapping[off : off + n]
        return b"".join(region.mapping[off : off + n] for region, off, n in chunks)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at guest-physical ``addr``."""
        data = memoryview(data).cast("B")
        one = self._within_one(addr, len(data))
        if one is not None:
            mapping, off = one
            mapping[off : off + len(data)] = data
            return
        pos = 0
        for region, off, n in self._chunks(addr, len(data)):
            region.mapping[off : off + n] = data[pos : pos + n]
            pos += n

    def view(self, addr: int, size: int) -> memoryview:
        """A writable zero-copy view of ``[addr, addr + size)``; the range must lie in one region.

        Release views before `close`; a live view makes closing fail.
        """
        one = self._within_one(addr, size)
        if one is None:
            raise GuestMemoryError(f"guest range {addr:#x}+{size:#x} is not inside one RAM region")
        mapping, off = one
        return memoryview(mapping)[off : off + size]

    def discard(self, addr: int, size: int) -> None:
        """Give the host pages behind ``[addr, addr + size)`` back (`kata_virtio.GuestMemory.discard`).

        A memfd region (MAP_SHARED) punches a hole with MADV_REMOVE: MADV_DONTNEED on a shared mapping
        only drops the page-table entries and keeps the memfd's pages. A copy-on-write region (restored
        from a snapshot) drops its private copies with MADV_DONTNEED and reads the file again. The whole
        range must be RAM (it may span adjacent regions) and page aligned; else `GuestMemoryError` and
        nothing is discarded."""
        if addr % mmap.PAGESIZE or size % mmap.PAGESIZE:
            raise GuestMemoryError(f"discard of {addr:#x}+{size:#x} is not page aligned")
        for region, off, n in self._chunks(addr, size):  # checks every byte before touching any
            advice = MADV_REMOVE if region.fd >= 0 else mmap.MADV_DONTNEED
            try:
                region.mapping.madvise(advice, off, n)
            except OSError as err:
                raise GuestMemoryError(f"cannot discard {addr:#x}+{size:#x}: {err.strerror}") from err

    def read_u32(self, addr: int) -> int:
        """A little-endian u32 at ``addr``."""
        return int.from_bytes(self.read(addr, 4), "little")

    def write_u32(self, addr: int, value: int) -> None:
        """Store a little-endian u32 at ``addr``."""
        self.write(addr, value.to_bytes(4, "little"))

    def write_u64(self, addr: int, value: int) -> None:
        """Store a little-endian u64 at ``addr``."""
        self.write(addr, value.to_bytes(8, "little"))

    def host_address(self, addr: int) -> int:
        """The host virtual address backing guest-physical ``addr``."""
        region = self.region_of(addr, 1)
        return region.host_addr + (addr - region.guest_addr)

    def close(self) -> None:
        """Unmap every region (and close its memfd)."""
        for region in self.regions:
            region.close()
        self.regions = []
        self._starts = []


MADV_REMOVE = getattr(mmap, "MADV_REMOVE", 9)
"""madvise(2): free a shared mapping's backing store (a hole in the memfd)."""

SAVE_CHUNK = 1 << 20
"""Bytes compared with zeros (and written unless they are) at a time when saving memory."""
_ZERO_CHUNK = bytes(SAVE_CHUNK)


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The ranges of ``fd`` that hold data (SEEK_DATA/SEEK_HOLE); all of ``[0, size)`` without an fd."""
    if fd < 0:
        return [(0, size)]
    ranges = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == 6:  # ENXIO: no data past pos
                break
            return [(0, size)]  # no SEEK_DATA here: treat everything as data
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        ranges.append((start, end))
        pos = end
    return ranges


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _copy_sparse(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes of file ``src`` into ``dst`` at the same offsets, skipping the holes."""
    for start, end in _data_ranges(src, size):
        off = start
        while off < end:
            piece = os.pread(src, min(SAVE_CHUNK, end - off), off)
            if not piece:
                raise SnapshotError(f"memory file ends at {off:#x}, before {end:#x}")
            _pwrite_all(dst, memoryview(piece), off)
            off += len(piece)
