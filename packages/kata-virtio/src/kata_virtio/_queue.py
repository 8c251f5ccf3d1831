"""The split virtqueue, device side, validated against a hostile driver (virtio 1.2 §2.7)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kata_virtio._memory import GuestAddressError, GuestMemory, VirtioError
from kata_virtio._spec import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)

_DESC = struct.Struct("<QIHH")  # virtio 1.2 §2.7.5: struct virtq_desc, 16 bytes
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # virtio 1.2 §2.7.8: struct virtq_used_elem
#: virtio 1.2 §2.7: the largest queue size a split ring may have.
MAX_QUEUE_SIZE = 32768


class QueueError(VirtioError):
    """Raised when the driver broke the virtqueue rules; the device must enter NEEDS_RESET."""


class QueueConfigError(QueueError):
    """Raised when a queue's size or ring addresses are invalid at activation (§2.7, §4.2.3.2)."""


class AvailRingError(QueueError):
    """Raised when the avail index claims more new chains than the queue holds."""


class DescriptorIndexError(QueueError):
    """Raised when a head or `next` index lies outside the descriptor table."""


class DescriptorChainTooLong(QueueError):
    """Raised when a chain is longer than its table allows: how a descriptor loop shows up (§2.7.5.3.1)."""


class IndirectDescriptorError(QueueError):
    """Raised for a bad indirect table: not negotiated, nested, with NEXT, or misaligned length (§2.7.5.3)."""


class DescriptorOrderError(QueueError):
    """Raised when a device-readable descriptor follows a device-writable one (§2.7.4.2)."""


class DescriptorLengthError(QueueError):
    """Raised when a chain's total length exceeds 2^32 bytes (§2.7.5.3.1)."""


@dataclass(slots=True)
class DescriptorChain:
    """One validated chain popped from the avail ring: readable then writable guest buffers."""

    head_index: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        """Total bytes of the device-readable buffers."""
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        """Total bytes of the device-writable buffers."""
        return sum(n for _, n in self.writable)

    def reader(self, memory: GuestMemory) -> ChainReader:
        """A cursor over the readable buffers."""
        return ChainReader(memory, self.readable)

    def writer(self, memory: GuestMemory) -> ChainWriter:
        """A cursor over the writable buffers."""
        return ChainWriter(memory, self.writable)


class ChainReader:
    """Sequential reads across a chain's device-readable buffers."""

    def __init__(self, memory: GuestMemory, segments: list[tuple[int, int]]) -> None:
        self._memory = memory
        self._segments = segments
        self._seg = 0
        self._off = 0
        self.remaining = sum(n for _, n in segments)

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; fewer only at the end of the buffers."""
        out = bytearray()
        while size > 0 and self._seg < len(self._segments):
            addr, length = self._segments[self._seg]
            take = min(size, length - self._off)
            if take > 0:
                out += self._memory.read(addr + self._off, take)
                self._off += take
                size -= take
                self.remaining -= take
            if self._off >= length:
                self._seg += 1
                self._off = 0
        return bytes(out)

    def read_all(self) -> bytes:
        """Everything not yet read."""
        return self.read(self.remaining)


class ChainWriter:
    """Sequential writes across a chain's device-writable buffers; `written` goes into the used ring."""

    def __init__(self, memory: GuestMemory, segments: list[tuple[int, int]]) -> None:
        self._memory = memory
        self._segments = segments
        self._seg = 0
        self._off = 0
        self.written = 0
        self.remaining = sum(n for _, n in segments)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write as much of ``data`` as fits; returns the count written."""
        view = memoryview(data)
        done = 0
        while done < len(view) and self._seg < len(self._segments):
            addr, length = self._segments[self._seg]
            take = min(len(view) - done, length - self._off)
            if take > 0:
                self._memory.write(addr + self._off, view[done : done + take])
                self._off += take
                done += take
            if self._off >= length:
                self._seg += 1
                self._off = 0
        self.written += done
        self.remaining -= done
        return done

    def skip(self, size: int) -> None:
        """Advance past ``size`` bytes without writing (they count as written)."""
        while size > 0 and self._seg < len(self._segments):
            _, length = self._segments[self._seg]
            take = min(size, length - self._off)
            self._off += take
            size -= take
            self.written += take
            self.remaining -= take
            if self._off >= length:
                self._seg += 1
                self._off = 0


def _check_range(memory: GuestMemory, addr: int, size: int, what: str) -> None:
    try:
        memory.read(addr, size)
    except GuestAddressError as err:
        raise QueueConfigError(f"{what} at {addr:#x}+{size:#x} is outside guest memory") from err


class Queue:
    """A split virtqueue: the transport fills size and ring addresses, the device pops chains.

    Every guest-controlled value is checked before use: a violation raises a `QueueError`
    subclass and the caller (the device) enters NEEDS_RESET.
    """

    def __init__(self, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size} is not a power of two <= {MAX_QUEUE_SIZE}")
        self.max_size = max_size
        #: Most descriptors one chain (or one indirect table) may have; a device lowers it to bound the
        #: work one request costs. A property of the device, so `reset` keeps it.
        self.max_chain = 1 << 16  # a device may ask for less than the queue size (virtio-fs: 1,024)
        self.reset()

    def reset(self) -> None:
        """Back to the state after device reset (virtio 1.2 §4.2.3.1: size defaults to the maximum)."""
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.next_avail = 0
        self.next_used = 0
        self.event_idx = False
        self.indirect = False
        self._num_added = 0

    # -- configuration ------------------------------------------------------------------------------

    def validate(self, memory: GuestMemory) -> None:
        """Check size, alignment and ring placement before the device uses the queue (§2.7, Table 2.4)."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise QueueConfigError(f"queue size {size} is not a power of two <= {self.max_size}")
        if self.desc_table % 16 or self.avail_ring % 2 or self.used_ring % 4:
            raise QueueConfigError("virtqueue ring addresses are misaligned")
        _check_range(memory, self.desc_table, 16 * size, "descriptor table")
        _check_range(memory, self.avail_ring, 6 + 2 * size, "available ring")
        _check_range(memory, self.used_ring, 6 + 8 * size, "used ring")

    # -- driver area -------------------------------------------------------------------------------

    def _avail_idx(self, memory: GuestMemory) -> int:
        return _U16.unpack(memory.read(self.avail_ring + 2, 2))[0]

    def pending(self, memory: GuestMemory) -> int:
        """How many chains the driver has made available and the device has not popped."""
        n = (self._avail_idx(memory) - self.next_avail) & 0xFFFF
        if n > self.size:
            # virtio 1.2 §2.7.6: the driver can never have more than queue-size chains outstanding.
            raise AvailRingError(f"avail idx is {n} ahead of the device, queue size {self.size}")
        return n

    def pop(self, memory: GuestMemory) -> DescriptorChain | None:
        """The next available chain, validated, or None when the ring is empty."""
        if not self.pending(memory):
            return None
        slot = self.avail_ring + 4 + 2 * (self.next_avail % self.size)
        head = _U16.unpack(memory.read(slot, 2))[0]
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return self._walk(memory, head)

    def undo_pop(self) -> None:
        """Put the last popped chain back (the device found it had nothing to put in it)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def _walk(self, memory: GuestMemory, head: int) -> DescriptorChain:
        # virtio 1.2 §2.7.5.2-§2.7.5.3: follow `next` within the table; one indirect table may end the chain.
        # §2.7.5.3.1: no chain is longer than the queue size, indirect entries included, so the work one
        # chain costs the device is bounded by the queue size (Linux's virtio-fs and virtio-blk size their
        # requests to fit), whatever table length the guest claims.
        if head >= self.size:
            raise DescriptorIndexError(f"head index {head} >= queue size {self.size}")
        chain = DescriptorChain(head)
        table, table_len, idx = self.desc_table, self.size, head
        in_indirect = False
        count = 0  # descriptors walked in the current table (loop detection)
        descriptors = 0  # buffers in the whole chain
        total = 0
        while True:
            addr, length, flags, nxt = _DESC.unpack(memory.read(table + 16 * idx, 16))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise IndirectDescriptorError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if in_indirect:
                    raise IndirectDescriptorError("nested indirect descriptor table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise IndirectDescriptorError("indirect descriptor with VIRTQ_DESC_F_NEXT")
                if length == 0 or length % 16:
                    raise IndirectDescriptorError(f"indirect table length {length} is invalid")
                if length // 16 > self.size:
                    raise IndirectDescriptorError(
                        f"indirect table of {length // 16} entries exceeds queue size {self.size}"
                    )
                table, table_len, idx = addr, length // 16, 0
                in_indirect = True
                count = 0
                continue
            count += 1
            descriptors += 1
            if count > table_len:
                raise DescriptorChainTooLong(f"chain {head} exceeds {table_len} descriptors (a loop?)")
            if descriptors > self.size:
                raise DescriptorChainTooLong(f"chain {head} is longer than queue size {self.size}")
            if descriptors > self.max_chain:
                raise DescriptorChainTooLong(f"chain {head} is longer than the device's {self.max_chain}")
            if flags & VIRTQ_DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise DescriptorOrderError(f"readable descriptor after a writable one in chain {head}")
            else:
                chain.readable.append((addr, length))
            total += length
            if total > 0xFFFFFFFF:
                raise DescriptorLengthError(f"chain {head} is longer than 2^32 bytes")
            if addr + length > 1 << 64:
                raise GuestAddressError(f"descriptor {addr:#x}+{length:#x} wraps the address space")
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= table_len:
                raise DescriptorIndexError(f"next index {nxt} >= table length {table_len}")
            idx = nxt

    # -- device area -------------------------------------------------------------------------------

    def add_used(self, memory: GuestMemory, head_index: int, length: int) -> None:
        """Return a chain to the driver with ``length`` bytes written (virtio 1.2 §2.7.8)."""
        if head_index >= self.size:
            raise DescriptorIndexError(f"used head {head_index} >= queue size {self.size}")
        slot = self.used_ring + 4 + 8 * (self.next_used % self.size)
        memory.write(slot, _USED_ELEM.pack(head_index, length))
        # The element must be visible before the index that publishes it (§2.7.8.2); our writes are ordered.
        self.next_used = (self.next_used + 1) & 0xFFFF
        memory.write(self.used_ring + 2, _U16.pack(self.next_used))
        self._num_added += 1

    def needs_notification(self, memory: GuestMemory) -> bool:
        """Whether to interrupt the driver for the used buffers added since the last call (§2.7.7.2)."""
        added, self._num_added = self._num_added, 0
        if self.event_idx:
            used_event = _U16.unpack(memory.read(self.avail_ring + 4 + 2 * self.size, 2))[0]
            new, old = self.next_used, (self.next_used - added) & 0xFFFF
            # vring_need_event: notify when used_event lies in [old, new).
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        flags = _U16.unpack(memory.read(self.avail_ring, 2))[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def disable_notification(self, memory: GuestMemory) -> None:
        """Ask the driver not to kick while the device is busy (§2.7.10)."""
        if not self.event_idx:
            memory.write(self.used_ring, _U16.pack(VIRTQ_USED_F_NO_NOTIFY))

    def enable_notification(self, memory: GuestMemory, *, held: int = 0) -> bool:
        """Ask for kicks again; True when chains arrived meanwhile, so the device must poll once more.

        ``held``: chains the device looked at but left in the ring because it needs more than them (a frame
        that spans buffers): the driver is asked to kick for the next chain after those, and True means
        more than ``held`` are there now.
        """
        if self.event_idx:
            # virtio 1.2 §2.7.10: avail_event sits after the used ring entries.
            event = (self.next_avail + held) & 0xFFFF
            memory.write(self.used_ring + 4 + 8 * self.size, _U16.pack(event))
        else:
            memory.write(self.used_ring, _U16.pack(0))
        return self.pending(memory) > held
