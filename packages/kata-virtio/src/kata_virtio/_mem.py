"""virtio-mem (virtio 1.2 §5.15): memory the guest plugs and unplugs in blocks, at the host's request.

The device manages one guest-physical region ``[addr, addr + region_size)`` (the VMM maps it, outside the
boot memory map). The host sets ``requested_size`` (`VirtioMem.set_requested_size`, a config-change
interrupt); the driver plugs or unplugs blocks of ``block_size`` until ``plugged_size`` matches it, with
requests on its one queue:

========== ====================== =============================================================
request    answer                 when
========== ====================== =============================================================
PLUG       ACK                    every block was unplugged and the total stays <= requested_size
           NACK                   the total would exceed requested_size
           ERROR                  a block outside the usable region, unaligned, 0 blocks, or one
                                  already plugged (§5.15.6.2)
UNPLUG     ACK                    every block was plugged: their memory is discarded (host pages
                                  given back, `GuestMemory.discard`)
           ERROR                  out of range, or a block not plugged
UNPLUG_ALL ACK                    everything discarded, plugged_size 0
STATE      ACK + PLUGGED/         the range lies in the usable region
           UNPLUGGED/MIXED
           ERROR                  it does not
========== ====================== =============================================================

A hostile driver can only ever discard inside the region (each range is checked against it before the
bitmap or memory is touched), one ring's worth of requests is served per kick, and a request costs at
most one pass over 65,535 bitmap entries (nb_blocks is a le16).

Not offered: VIRTIO_MEM_F_ACPI_PXM (one NUMA node), VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE (unplugged memory
stays mapped and reads as zeros: a guest that touches it uses host memory up to the region's size, which
the VMM's memory limit covers as it covers RAM).
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Any

from kata_virtio._device import DeviceError, VirtioDevice
from kata_virtio._memory import DISCARD_ALIGN, GuestAddressError
from kata_virtio._queue import DescriptorChain
from kata_virtio._spec import VIRTIO_ID_MEM

_log = logging.getLogger("kata_virtio")

# virtio 1.2 §5.15.3: feature bits (none offered)
VIRTIO_MEM_F_ACPI_PXM = 0
VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1

# §5.15.6: request types, response types, states
VIRTIO_MEM_REQ_PLUG = 0
VIRTIO_MEM_REQ_UNPLUG = 1
VIRTIO_MEM_REQ_UNPLUG_ALL = 2
VIRTIO_MEM_REQ_STATE = 3
VIRTIO_MEM_RESP_ACK = 0
VIRTIO_MEM_RESP_NACK = 1
VIRTIO_MEM_RESP_BUSY = 2
VIRTIO_MEM_RESP_ERROR = 3
VIRTIO_MEM_STATE_PLUGGED = 0
VIRTIO_MEM_STATE_UNPLUGGED = 1
VIRTIO_MEM_STATE_MIXED = 2

#: struct virtio_mem_req: le16 type, 3 x le16 padding, then le64 addr, le16 nb_blocks, 3 x le16 padding.
_REQ = struct.Struct("<H6xQH6x")
#: struct virtio_mem_resp: le16 type, 3 x le16 padding, le16 state (10 bytes, as Linux sizes it).
_RESP = struct.Struct("<H6xH")
#: struct virtio_mem_config (§5.15.4).
_CONFIG = struct.Struct("<QH6xQQQQQ")

DEFAULT_BLOCK_SIZE = 2 << 20
#: Linux's virtio_mem adds memory in memory blocks (128 MiB on x86-64): region address and size align to it.
MEMORY_BLOCK_SIZE = 128 << 20

QUEUE_SIZE = 128


class VirtioMem(VirtioDevice):
    """A virtio-mem device for the region ``[addr, addr + region_size)`` of guest-physical memory.

    ``addr`` and ``region_size`` must be multiples of `MEMORY_BLOCK_SIZE` (``region_size`` > 0),
    ``block_size`` a power of two between 4 KiB and that. The host API (`set_requested_size`,
    `requested_size`, `plugged_size`) is safe from any thread.
    """

    device_type = VIRTIO_ID_MEM
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(
        self, addr: int, region_size: int, *, block_size: int = DEFAULT_BLOCK_SIZE, node_id: int = 0
    ) -> None:
        super().__init__()
        if block_size < DISCARD_ALIGN or block_size & (block_size - 1) or block_size > MEMORY_BLOCK_SIZE:
            raise DeviceError(
                f"virtio-mem block size {block_size:#x} is not a power of two in 4 KiB..128 MiB"
            )
        if addr < 0 or addr % MEMORY_BLOCK_SIZE or region_size <= 0 or region_size % MEMORY_BLOCK_SIZE:
            align = MEMORY_BLOCK_SIZE >> 20
            raise DeviceError(f"virtio-mem region {addr:#x}+{region_size:#x} is not aligned to {align} MiB")
        self.addr = addr
        self.region_size = region_size
        self.block_size = block_size
        self.node_id = node_id
        self._lock = threading.Lock()
        self._plugged = bytearray(region_size // block_size)  # 1 per plugged block
        self._plugged_blocks = 0
        self._requested = 0

    # -- host API -----------------------------------------------------------------------------------

    def set_requested_size(self, size: int) -> None:
        """Ask the driver to plug (or unplug) memory until ``size`` bytes are plugged (a multiple of the
        block size, at most the region): config ``requested_size`` and a config-change interrupt."""
        if not 0 <= size <= self.region_size or size % self.block_size:
            raise DeviceError(
                f"requested size {size:#x} is not a multiple of {self.block_size:#x} "
                f"within {self.region_size:#x}"
            )
        with self._lock:
            self._requested = size
            interrupt = self.interrupt if self.memory is not None else None
        if interrupt is not None:
            interrupt.signal_config_change()

    @property
    def requested_size(self) -> int:
        """What the host asked for, in bytes."""
        return self._requested

    @property
    def plugged_size(self) -> int:
        """Bytes the driver has plugged (config ``plugged_size``)."""
        return self._plugged_blocks * self.block_size

    def plugged_ranges(self) -> list[tuple[int, int]]:
        """The plugged guest-physical ranges, (address, size), merged and in order."""
        with self._lock:
            bitmap = bytes(self._plugged)
        out: list[tuple[int, int]] = []
        start = None
        for i, plugged in enumerate([*bitmap, 0]):
            if plugged and start is None:
                start = i
            elif not plugged and start is not None:
                out.append((self.addr + start * self.block_size, (i - start) * self.block_size))
                start = None
        return out

    # -- transport side -------------------------------------------------------------------------------

    @property
    def avail_features(self) -> int:
        """No optional features (see the module docstring)."""
        return 0

    def config_bytes(self) -> bytes:
        """`struct virtio_mem_config` (§5.15.4); usable_region_size is the whole region."""
        return _CONFIG.pack(
            self.block_size,
            self.node_id,
            self.addr,
            self.region_size,
            self.region_size,
            self.plugged_size,
            self._requested,
        )

    def queue_notify(self, index: int) -> None:
        """Answer every request on the guest queue (§5.15.6)."""
        self.drain_queue(0, self._serve)

    def _serve(self, chain: DescriptorChain) -> int:
        assert self.memory is not None
        raw = chain.reader(self.memory).read(_REQ.size)
        writer = chain.writer(self.memory)
        if len(raw) < _REQ.size or writer.remaining < 2:
            _log.debug("virtio-mem: malformed request (%d bytes, %d writable)", len(raw), writer.remaining)
            writer.write(_RESP.pack(VIRTIO_MEM_RESP_ERROR, 0)[: writer.remaining])
            return writer.written
        kind, addr, nb_blocks = _REQ.unpack(raw)
        resp, state = self._handle(kind, addr, nb_blocks)
        writer.write(_RESP.pack(resp, state)[: writer.remaining])
        return writer.written

    def _blocks(self, addr: int, nb_blocks: int) -> range | None:
        """The bitmap indices of ``nb_blocks`` blocks at ``addr``, or None when not wholly in the region."""
        off = addr - self.addr
        if nb_blocks == 0 or off < 0 or off % self.block_size:
            return None
        first = off // self.block_size
        if first + nb_blocks > len(self._plugged):
            return None
        return range(first, first + nb_blocks)

    def _handle(self, kind: int, addr: int, nb_blocks: int) -> tuple[int, int]:
        with self._lock:
            if kind == VIRTIO_MEM_REQ_UNPLUG_ALL:
                return self._unplug_all(), 0
            blocks = self._blocks(addr, nb_blocks)
            if blocks is None or kind not in (
                VIRTIO_MEM_REQ_PLUG,
                VIRTIO_MEM_REQ_UNPLUG,
                VIRTIO_MEM_REQ_STATE,
            ):
                return VIRTIO_MEM_RESP_ERROR, 0
            plugged = self._plugged[blocks.start : blocks.stop].count(1)
            if kind == VIRTIO_MEM_REQ_STATE:
                state = (
                    VIRTIO_MEM_STATE_PLUGGED
                    if plugged == nb_blocks
                    else VIRTIO_MEM_STATE_UNPLUGGED
                    if plugged == 0
                    else VIRTIO_MEM_STATE_MIXED
                )
                return VIRTIO_MEM_RESP_ACK, state
            if kind == VIRTIO_MEM_REQ_PLUG:
                if plugged:
                    return VIRTIO_MEM_RESP_ERROR, 0  # §5.15.6.2: a block already plugged
                if (self._plugged_blocks + nb_blocks) * self.block_size > self._requested:
                    return VIRTIO_MEM_RESP_NACK, 0
                self._plugged[blocks.start : blocks.stop] = b"\1" * nb_blocks
                self._plugged_blocks += nb_blocks
                return VIRTIO_MEM_RESP_ACK, 0
            if plugged != nb_blocks:
                return VIRTIO_MEM_RESP_ERROR, 0  # §5.15.6.3: a block not plugged
            if not self._discard(addr, nb_blocks * self.block_size):
                return VIRTIO_MEM_RESP_ERROR, 0
            self._plugged[blocks.start : blocks.stop] = bytes(nb_blocks)
            self._plugged_blocks -= nb_blocks
            return VIRTIO_MEM_RESP_ACK, 0

    def _unplug_all(self) -> int:
        if self._plugged_blocks and not self._discard(self.addr, self.region_size):
            return VIRTIO_MEM_RESP_ERROR
        self._plugged = bytearray(len(self._plugged))
        self._plugged_blocks = 0
        return VIRTIO_MEM_RESP_ACK

    def _discard(self, addr: int, size: int) -> bool:
        assert self.memory is not None
        try:
            self.memory.discard(addr, size)
        except GuestAddressError as err:  # the VMM did not map the region: a host bug, not the guest's
            _log.error("virtio-mem: cannot discard %#x+%#x: %s", addr, size, err)
            return False
        return True

    # -- snapshot -------------------------------------------------------------------------------------

    def save_state(self) -> dict[str, Any]:
        """The requested size and the plugged ranges."""
        return {"requested_size": self._requested, "plugged": [list(r) for r in self.plugged_ranges()]}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Take back `save_state`'s values (`DeviceError` for ranges outside this device's region)."""
        try:
            requested = int(state.get("requested_size", 0))
            ranges = [(int(a), int(n)) for a, n in state.get("plugged", [])]
        except (TypeError, ValueError) as err:
            raise DeviceError(f"bad saved virtio-mem state: {err}") from err
        bitmap = bytearray(len(self._plugged))
        for addr, size in ranges:
            blocks = self._blocks(addr, size // self.block_size) if size % self.block_size == 0 else None
            if blocks is None:
                raise DeviceError(f"saved plugged range {addr:#x}+{size:#x} is not in this region")
            bitmap[blocks.start : blocks.stop] = b"\1" * len(blocks)
        if not 0 <= requested <= self.region_size or requested % self.block_size:
            raise DeviceError(f"saved requested size {requested:#x} does not fit this region")
        with self._lock:
            self._plugged = bitmap
            self._plugged_blocks = bitmap.count(1)
            self._requested = requested
