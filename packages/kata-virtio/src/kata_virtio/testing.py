"""Test utilities: a fake guest memory and a fake driver-side split virtqueue (like vm-virtio's mock)."""

from __future__ import annotations

import contextlib
import errno
import select
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from kata_virtio import _fuse as F
from kata_virtio._device import EventSource, VirtioDevice
from kata_virtio._memory import DISCARD_ALIGN, GuestAddressError
from kata_virtio._mmio import MmioTransport
from kata_virtio._queue import Queue
from kata_virtio._spec import (
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from kata_virtio.fs import FuseServer, VirtioFs

__all__ = [
    "BumpAllocator",
    "DriverQueue",
    "FakeDeviceInterrupt",
    "FakeGuestMemory",
    "FakeInterrupt",
    "FuseClient",
    "FuseError",
    "activate",
    "fuse_reply",
    "fuse_request",
    "mmio_bring_up",
]


class FakeGuestMemory:
    """Guest memory made of one bytearray at guest-physical ``base``; every access is bounds-checked."""

    def __init__(self, size: int, base: int = 0) -> None:
        self.base = base
        self.data = bytearray(size)
        self.discarded: list[tuple[int, int]] = []
        """Every range `discard` accepted, in order."""

    def _offset(self, addr: int, size: int) -> int:
        off = addr - self.base
        if size < 0 or off < 0 or off + size > len(self.data):
            raise GuestAddressError(f"guest range {addr:#x}+{size:#x} is outside guest memory")
        return off

    def read(self, addr: int, size: int) -> bytes:
        """Copy ``size`` bytes at ``addr``."""
        off = self._offset(addr, size)
        return bytes(self.data[off : off + size])

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to ``addr``."""
        off = self._offset(addr, len(data))
        self.data[off : off + len(data)] = data

    def view(self, addr: int, size: int) -> memoryview:
        """A writable view of ``[addr, addr+size)``."""
        off = self._offset(addr, size)
        return memoryview(self.data)[off : off + size]

    def discard(self, addr: int, size: int) -> None:
        """Zero ``[addr, addr+size)`` (page aligned, inside memory) and record it in `discarded`."""
        if addr % DISCARD_ALIGN or size % DISCARD_ALIGN:
            raise GuestAddressError(f"discard of {addr:#x}+{size:#x} is not page aligned")
        off = self._offset(addr, size)
        self.data[off : off + size] = bytes(size)
        self.discarded.append((addr, size))


class FakeInterrupt:
    """An `InterruptTrigger` that counts triggers."""

    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        """Count one interrupt."""
        self.count += 1


class FakeDeviceInterrupt:
    """A `DeviceInterrupt` recording what a device asked of its transport (for device tests)."""

    def __init__(self) -> None:
        self.used: list[int] = []
        self.config_changes = 0
        self.needs_reset: list[str] = []

    def signal_used_queue(self, index: int) -> None:
        """Record a used-buffer interrupt."""
        self.used.append(index)

    def signal_config_change(self) -> None:
        """Record a config-change interrupt."""
        self.config_changes += 1

    def set_needs_reset(self, reason: str) -> None:
        """Record NEEDS_RESET."""
        self.needs_reset.append(reason)


Buffer = tuple[bytes | int, bool]
"""A chain element for `DriverQueue.add_chain`: (data to read, False) or (byte count to write, True)."""


class BumpAllocator:
    """Hands out guest buffers from ``[start, end)``, wrapping to the start when it runs out."""

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.next = start

    def alloc(self, size: int, align: int = 16) -> int:
        """Reserve ``size`` bytes."""
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            addr = (self.start + align - 1) & ~(align - 1)
            if addr + size > self.end:
                raise RuntimeError(f"buffer of {size} bytes does not fit in fake guest memory")
        self.next = addr + size
        return addr


class DriverQueue:
    """The driver side of a split virtqueue living in a `FakeGuestMemory`.

    It lays out the descriptor table, avail and used rings at ``base`` and hands out data
    buffers from a bump allocator after them, as a guest driver would.
    """

    def __init__(self, memory: FakeGuestMemory, size: int, base: int | None = None) -> None:
        self.memory = memory
        self.size = size
        start = memory.base if base is None else base
        self.desc_table = start
        self.avail_ring = start + 16 * size
        self.used_ring = (self.avail_ring + 6 + 2 * size + 3) & ~3
        self.rings_end = (self.used_ring + 6 + 8 * size + 15) & ~15
        self.heap = BumpAllocator(self.rings_end, memory.base + len(memory.data))
        self._free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[tuple[int, int, bool]]] = {}
        self._ids_of: dict[int, list[int]] = {}

    # -- setup -------------------------------------------------------------------------------------

    def device_queue(self, max_size: int | None = None, *, indirect: bool = True) -> Queue:
        """A device-side `Queue` configured as a transport would after the driver set it up."""
        q = Queue(max_size or self.size)
        q.size = self.size
        q.desc_table, q.avail_ring, q.used_ring = self.desc_table, self.avail_ring, self.used_ring
        q.indirect = indirect
        q.ready = True
        return q

    def alloc(self, size: int, align: int = 16) -> int:
        """Reserve guest memory for a buffer."""
        return self.heap.alloc(size, align)

    # -- descriptors -------------------------------------------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        """Write descriptor ``index`` verbatim (hostile tests use this directly)."""
        self.memory.write(self.desc_table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def add_chain(self, buffers: Sequence[Buffer], *, indirect: bool = False, publish: bool = True) -> int:
        """Place a chain; returns its head index. Readable data is copied in, writable buffers zeroed."""
        segs: list[tuple[int, int, bool]] = []
        for item, writable in buffers:
            if writable:
                n = int(item) if isinstance(item, int) else len(item)
                addr = self.alloc(n)
                self.memory.write(addr, bytes(n))
            else:
                data = bytes(item)
                n = len(data)
                addr = self.alloc(n)
                self.memory.write(addr, data)
            segs.append((addr, n, writable))
        if indirect:
            table = self.alloc(16 * len(segs))
            for i, (addr, n, w) in enumerate(segs):
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(segs) else 0)
                self.memory.write(table + 16 * i, struct.pack("<QIHH", addr, n, flags, i + 1))
            head = self._free.pop(0)
            self.write_desc(head, table, 16 * len(segs), VIRTQ_DESC_F_INDIRECT)
        else:
            if len(segs) > len(self._free):
                raise RuntimeError("descriptor table full")
            ids = [self._free.pop(0) for _ in segs]
            for i, (addr, n, w) in enumerate(segs):
                last = i + 1 == len(segs)
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(ids[i], addr, n, flags, 0 if last else ids[i + 1])
            head = ids[0]
        self.chains[head] = segs
        self._ids_of[head] = [head] if indirect else ids
        if publish:
            self.publish(head)
        return head

    def publish(self, head: int) -> None:
        """Put ``head`` in the avail ring and bump avail idx."""
        slot = self.avail_ring + 4 + 2 * (self.avail_idx % self.size)
        self.memory.write(slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(self.avail_ring + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, idx: int) -> None:
        """Write avail idx verbatim (hostile tests)."""
        self.avail_idx = idx & 0xFFFF
        self.memory.write(self.avail_ring + 2, struct.pack("<H", self.avail_idx))

    # -- notification suppression ------------------------------------------------------------------

    def set_no_interrupt(self, on: bool) -> None:
        """Set or clear VIRTQ_AVAIL_F_NO_INTERRUPT."""
        self.memory.write(self.avail_ring, struct.pack("<H", VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0))

    def set_used_event(self, idx: int) -> None:
        """Write used_event (VIRTIO_F_EVENT_IDX)."""
        self.memory.write(self.avail_ring + 4 + 2 * self.size, struct.pack("<H", idx & 0xFFFF))

    def used_flags(self) -> int:
        """The device's used ring flags."""
        return int(struct.unpack("<H", self.memory.read(self.used_ring, 2))[0])

    def avail_event(self) -> int:
        """The device's avail_event (VIRTIO_F_EVENT_IDX)."""
        return int(struct.unpack("<H", self.memory.read(self.used_ring + 4 + 8 * self.size, 2))[0])

    # -- completions -------------------------------------------------------------------------------

    def used_idx(self) -> int:
        """The device's used idx."""
        return int(struct.unpack("<H", self.memory.read(self.used_ring + 2, 2))[0])

    def get_used(self) -> list[tuple[int, int]]:
        """New used entries (head, length) since the last call; frees their descriptors."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used_ring + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", self.memory.read(slot, 8))
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
            self._free.extend(self._ids_of.pop(head, []))
        return out

    def written(self, head: int, length: int | None = None) -> bytes:
        """The bytes the device wrote into the writable buffers of chain ``head`` (first ``length``)."""
        out = bytearray()
        for addr, n, w in self.chains[head]:
            if w:
                out += self.memory.read(addr, n)
        return bytes(out if length is None else out[:length])


def activate(
    device: VirtioDevice,
    memory: FakeGuestMemory,
    sizes: Sequence[int] | None = None,
    *,
    features: int | None = None,
) -> tuple[list[DriverQueue], FakeDeviceInterrupt]:
    """Negotiate ``features`` (default: all offered plus VERSION_1/INDIRECT) and activate ``device``
    with one `DriverQueue` per queue laid out one after another; returns them and the interrupt record."""
    if features is None:
        features = device.avail_features | 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC
    device.ack_features(features)
    count = device.queue_count()
    sizes = sizes or [min(n, 256) for n in device.queue_max_sizes[:count]]
    dqs: list[DriverQueue] = []
    base = memory.base
    for size in sizes:
        dq = DriverQueue(memory, size, base)
        dqs.append(dq)
        base = (dq.rings_end + 0xFFF) & ~0xFFF
    heap = BumpAllocator(base, memory.base + len(memory.data))
    for dq in dqs:
        dq.heap = heap  # buffers of every queue come from one allocator after all rings
    irq = FakeDeviceInterrupt()
    queues = [dq.device_queue(n) for dq, n in zip(dqs, device.queue_max_sizes[:count], strict=True)]
    device.activate(memory, queues, irq)
    return dqs, irq


def fuse_request(
    opcode: int, nodeid: int, body: bytes = b"", *, unique: int = 1, uid: int = 0, gid: int = 0
) -> bytes:
    """A FUSE request as the guest kernel sends it: fuse_in_header then ``body``."""
    header = struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, nodeid, uid, gid, 1, 0, 0)
    return header + body


def fuse_reply(reply: bytes | None) -> tuple[int, bytes]:
    """Split a FUSE reply into (error, payload); checks the out header's length field."""
    assert reply is not None and len(reply) >= 16
    length, error, _ = struct.unpack_from("<IiQ", reply)
    assert length == len(reply)
    return error, reply[16:]


class FuseError(Exception):
    """A FUSE reply carried an error; ``errno`` is positive."""

    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(err, str(err)))
        self.errno = err


class FuseClient:
    """Builds FUSE requests as the guest kernel would and parses the replies (tests, benchmarks)."""

    def __init__(self, server: FuseServer, uid: int = 0, gid: int = 0) -> None:
        self.server = server
        self.uid, self.gid = uid, gid
        self.unique = 0

    def call(self, opcode: int, nodeid: int, body: bytes = b"", space: int = 1 << 20) -> bytes:
        self.unique += 2
        reply = self.server.handle(
            fuse_request(opcode, nodeid, body, unique=self.unique, uid=self.uid, gid=self.gid), space
        )
        err, payload = fuse_reply(reply)
        assert struct.unpack_from("<Q", reply or b"", 8)[0] == self.unique
        if err:
            raise FuseError(-err)
        return payload

    def init(self) -> tuple[int, ...]:
        body = F.FUSE_INIT_IN.pack(7, 37, 65536, 0xFFFFFFFF) + bytes(48)
        return F.FUSE_INIT_OUT.unpack(self.call(F.FUSE_INIT, 0, body))

    def lookup(self, parent: int, name: str | bytes) -> tuple[int, tuple[int, ...]]:
        raw = name.encode() if isinstance(name, str) else name
        out = self.call(F.FUSE_LOOKUP, parent, raw + b"\0")
        return F.FUSE_ENTRY_OUT_HEAD.unpack_from(out)[0], F.FUSE_ATTR.unpack_from(out, 40)

    def getattr(self, node: int) -> tuple[int, ...]:
        return F.FUSE_ATTR.unpack_from(self.call(F.FUSE_GETATTR, node, F.FUSE_GETATTR_IN.pack(0, 0, 0)), 16)

    def open(self, node: int, flags: int = 0) -> int:
        return int(F.FUSE_OPEN_OUT.unpack(self.call(F.FUSE_OPEN, node, F.FUSE_OPEN_IN.pack(flags, 0)))[0])

    def create(self, parent: int, name: str, flags: int = 2, mode: int = 0o100644) -> tuple[int, int]:
        body = F.FUSE_CREATE_IN.pack(flags, mode, 0o022, 0) + name.encode() + b"\0"
        out = self.call(F.FUSE_CREATE, parent, body)
        return F.FUSE_ENTRY_OUT_HEAD.unpack_from(out)[0], F.FUSE_OPEN_OUT.unpack_from(out, 128)[0]

    def read(self, node: int, fh: int, offset: int, size: int) -> bytes:
        return self.call(F.FUSE_READ, node, F.FUSE_READ_IN.pack(fh, offset, size, 0, 0, 0, 0))

    def write(self, node: int, fh: int, offset: int, data: bytes) -> int:
        body = F.FUSE_WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data
        return int(F.FUSE_WRITE_OUT.unpack(self.call(F.FUSE_WRITE, node, body))[0])

    def release(self, node: int, fh: int, opcode: int = F.FUSE_RELEASE) -> None:
        self.call(opcode, node, F.FUSE_RELEASE_IN.pack(fh, 0, 0, 0))

    def mkdir(self, parent: int, name: str, mode: int = 0o755) -> int:
        out = self.call(F.FUSE_MKDIR, parent, F.FUSE_MKDIR_IN.pack(mode, 0) + name.encode() + b"\0")
        return int(F.FUSE_ENTRY_OUT_HEAD.unpack_from(out)[0])

    def readdir(self, node: int, plus: bool = False, size: int = 65536) -> list[tuple[str, int]]:
        fh = F.FUSE_OPEN_OUT.unpack(self.call(F.FUSE_OPENDIR, node, F.FUSE_OPEN_IN.pack(0, 0)))[0]
        names: list[tuple[str, int]] = []
        offset = 0
        while True:
            out = self.call(
                F.FUSE_READDIRPLUS if plus else F.FUSE_READDIR,
                node,
                F.FUSE_READ_IN.pack(fh, offset, size, 0, 0, 0, 0),
            )
            if not out:
                break
            pos = 0
            while pos < len(out):
                nodeid = 0
                if plus:
                    nodeid = F.FUSE_ENTRY_OUT_HEAD.unpack_from(out, pos)[0]
                    pos += F.FUSE_ENTRY_OUT_SIZE
                _ino, off, namelen, _type = F.FUSE_DIRENT_HEAD.unpack_from(out, pos)
                names.append((out[pos + 24 : pos + 24 + namelen].decode(), nodeid))
                pos += F.dirent_align(24 + namelen)
                offset = off
        self.release(node, fh, F.FUSE_RELEASEDIR)
        return names


def mmio_bring_up(
    transport: MmioTransport,
    sizes: Sequence[int],
    *,
    features: int | None = None,
    before_driver_ok: Callable[[list[DriverQueue]], None] | None = None,
) -> list[DriverQueue]:
    """Initialise a device through its virtio-mmio registers as Linux's virtio_mmio driver does
    (virtio 1.2 §3.1.1): reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues, then
    ``before_driver_ok(queues)`` (what a driver's probe does there: add buffers, kick), DRIVER_OK.
    Returns the driver queues (rings first, then one shared buffer area)."""
    t = transport
    t.write_u32(0x070, 0)
    t.write_u32(0x070, 1)
    t.write_u32(0x070, 3)
    offered = 0
    for sel in (0, 1):
        t.write_u32(0x014, sel)
        offered |= t.read_u32(0x010) << (32 * sel)
    wanted = offered if features is None else features
    for sel in (0, 1):
        t.write_u32(0x024, sel)
        t.write_u32(0x020, (wanted >> (32 * sel)) & 0xFFFFFFFF)
    t.write_u32(0x070, 0xB)
    if not t.read_u32(0x070) & 8:
        raise RuntimeError("device refused FEATURES_OK")
    memory = t.memory
    assert isinstance(memory, FakeGuestMemory)
    dqs: list[DriverQueue] = []
    base = memory.base
    for index, size in enumerate(sizes):
        dq = DriverQueue(memory, size, base)
        base = (dq.rings_end + 0xFFF) & ~0xFFF
        t.write_u32(0x030, index)
        if t.read_u32(0x044) or t.read_u32(0x034) < size:
            raise RuntimeError(f"queue {index} unusable")
        t.write_u32(0x038, size)
        for reg, addr in ((0x080, dq.desc_table), (0x090, dq.avail_ring), (0x0A0, dq.used_ring)):
            t.write_u32(reg, addr & 0xFFFFFFFF)
            t.write_u32(reg + 4, addr >> 32)
        t.write_u32(0x044, 1)
        dqs.append(dq)
    heap = BumpAllocator(base, memory.base + len(memory.data))
    for dq in dqs:
        dq.heap = heap
    if before_driver_ok is not None:
        before_driver_ok(dqs)
    t.write_u32(0x070, 0xF)
    return dqs


def poll_once(device: EventSource, timeout: float) -> bool:
    """One round of the VMM's event loop for ``device``: poll its `watched()` fds for up to ``timeout``
    seconds and hand each ready one to `handle_event`; False when none became ready."""
    poller = select.poll()
    for fd, events in device.watched().items():
        poller.register(fd, events)
    ready = poller.poll(timeout * 1000)
    for fd, events in ready:
        device.handle_event(fd, events)
    return bool(ready)


def pump(device: EventSource, timeout: float = 0.05, rounds: int = 200) -> None:
    """Rounds of `poll_once` until one finds nothing ready within ``timeout`` (at most ``rounds``)."""
    for _ in range(rounds):
        if not poll_once(device, timeout):
            return


@contextlib.contextmanager
def event_thread(device: EventSource, each_round: Callable[[], None] | None = None) -> Iterator[None]:
    """Be the VMM's event thread for ``device`` while the block runs: `poll_once` every 10 ms, then
    ``each_round`` (a fake guest's step, say); joined when the block ends."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            poll_once(device, 0.01)
            if each_round is not None:
                each_round()

    thread = threading.Thread(target=run, name="test-events")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_events(device: VirtioFs, timeout: float = 60.0) -> None:
    """Be the VMM's event loop for ``device`` until it is no longer `busy` (worker answers, queues left
    over for the next round)."""
    deadline = time.monotonic() + timeout
    while device.busy:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{type(device).__name__} still busy after {timeout} s")
        poll_once(device, remaining)
