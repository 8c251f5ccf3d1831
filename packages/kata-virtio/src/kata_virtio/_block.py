"""virtio-blk (virtio 1.2 §5.2) over a raw host file."""

from __future__ import annotations

import logging
import os
import struct
from typing import Any

from kata_virtio._device import DeviceError, VirtioDevice
from kata_virtio._memory import GuestAddressError
from kata_virtio._queue import ChainReader, ChainWriter, DescriptorChain
from kata_virtio._spec import VIRTIO_ID_BLOCK

_log = logging.getLogger("kata_virtio.block")

# virtio 1.2 §5.2.3: feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
# virtio 1.2 §5.2.6: request types and status values
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20
SECTOR_SIZE = 512
#: §5.2.4 seg_max we advertise: the data descriptors one request may carry.
SEG_MAX = 126
QUEUE_SIZE = 256
#: Bytes of one request copied at a time (a bounce piece): a request up to 4 GiB is never held whole.
IO_CHUNK = 1 << 20
_REQ_HDR = struct.Struct("<IIQ")  # struct virtio_blk_req header: type, reserved, sector


class VirtioBlock(VirtioDevice):
    """A block device backed by a raw image file; ``read_only`` offers VIRTIO_BLK_F_RO. With
    ``follow_symlinks`` False the image is opened with O_NOFOLLOW: a symlink in the path's last component
    is refused (ELOOP) rather than followed."""

    device_type = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        serial: str = "",
        follow_symlinks: bool = True,
    ) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if not follow_symlinks:
            flags |= os.O_NOFOLLOW
        try:
            self._fd = os.open(self.path, flags)
        except OSError as err:
            raise DeviceError(f"cannot open block image {self.path}: {err.strerror}") from err
        # the end of the file, which for a block device (st_size 0) is its size
        self.capacity = os.lseek(self._fd, 0, os.SEEK_END) // SECTOR_SIZE
        ident = serial or os.path.basename(self.path)
        self.serial = ident.encode()[:VIRTIO_BLK_ID_BYTES].ljust(VIRTIO_BLK_ID_BYTES, b"\0")

    def close(self) -> None:
        """Close the image file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def avail_features(self) -> int:
        """FLUSH, SEG_MAX, BLK_SIZE, and RO when read-only."""
        features = 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE
        if self.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        return features

    def config_bytes(self) -> bytes:
        """struct virtio_blk_config up to num_queues (§5.2.4): capacity, seg_max, blk_size."""
        return struct.pack("<QII4sI8sBBH", self.capacity, 0, SEG_MAX, b"", SECTOR_SIZE, b"", 0, 0, 1)

    def save_state(self) -> dict[str, Any]:
        """The backing image's path, size and mode (the image's content is the caller's to keep)."""
        return {"path": self.path, "capacity": self.capacity, "read_only": self.read_only}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Refuse an image of another size or mode: the driver knows the saved capacity and RO bit.
        Another path is fine (a clone's copy of the image)."""
        if state.get("capacity") != self.capacity or state.get("read_only") != self.read_only:
            raise DeviceError(
                f"block image {self.path} ({self.capacity} sectors, read_only={self.read_only}) is not the "
                f"saved one ({state.get('capacity')} sectors, read_only={state.get('read_only')})"
            )

    def queue_notify(self, index: int) -> None:
        """Serve every available request, then interrupt once (§5.2.6)."""
        self.drain_queue(0, self._serve)

    def _serve(self, chain: DescriptorChain) -> int:
        """Handle one request; returns the used length (bytes written including the status byte)."""
        mem = self.memory
        assert mem is not None
        reader = chain.reader(mem)
        header = reader.read(_REQ_HDR.size)
        if len(header) < _REQ_HDR.size or not chain.writable or chain.writable[-1][1] < 1:
            # §5.2.6.1: malformed: no header or no status byte to answer in; complete it with nothing written.
            _log.warning("malformed virtio-blk request in chain %d", chain.head_index)
            return 0
        rtype, _, sector = _REQ_HDR.unpack(header)
        status_addr = chain.writable[-1][0] + chain.writable[-1][1] - 1
        data_out = [*chain.writable[:-1], (chain.writable[-1][0], chain.writable[-1][1] - 1)]
        data_out = [(a, n) for a, n in data_out if n]
        written = 0
        status = VIRTIO_BLK_S_OK
        try:
            if rtype == VIRTIO_BLK_T_IN:
                status, written = self._read(sector, data_out)
            elif rtype == VIRTIO_BLK_T_OUT:
                # Check bounds before copying: the guest cannot make us buffer more than the disk holds.
                if self.read_only or not self._in_bounds(sector, reader.remaining):
                    status = VIRTIO_BLK_S_IOERR
                else:
                    status = self._write(sector, reader)
            elif rtype == VIRTIO_BLK_T_FLUSH:
                if not self.read_only:
                    os.fsync(self._fd)
            elif rtype == VIRTIO_BLK_T_GET_ID:
                written = ChainWriter(mem, data_out).write(self.serial)
            else:
                status = VIRTIO_BLK_S_UNSUPP
        except OSError as err:
            _log.warning("virtio-blk I/O error: %s", err)
            status = VIRTIO_BLK_S_IOERR
        mem.write(status_addr, bytes([status]))
        return written + 1

    def _in_bounds(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR_SIZE == 0 and sector + nbytes // SECTOR_SIZE <= self.capacity

    def _read(self, sector: int, segments: list[tuple[int, int]]) -> tuple[int, int]:
        mem = self.memory
        assert mem is not None
        total = sum(n for _, n in segments)
        if not self._in_bounds(sector, total):
            return VIRTIO_BLK_S_IOERR, 0
        offset = sector * SECTOR_SIZE
        for addr, n in segments:
            try:
                target = mem.view(addr, n)
            except GuestAddressError:
                # A buffer spanning two memory regions: go through a bounce buffer, a piece at a time.
                for done in range(0, n, IO_CHUNK):
                    piece = os.pread(self._fd, min(IO_CHUNK, n - done), offset + done)
                    if len(piece) != min(IO_CHUNK, n - done):
                        return VIRTIO_BLK_S_IOERR, 0
                    mem.write(addr + done, piece)
            else:
                if os.preadv(self._fd, [target], offset) != n:
                    return VIRTIO_BLK_S_IOERR, 0
            offset += n
        return VIRTIO_BLK_S_OK, total

    def _write(self, sector: int, reader: ChainReader) -> int:
        """Write the rest of ``reader`` at ``sector``, `IO_CHUNK` bytes at a time (never buffered whole)."""
        if self.read_only:
            return VIRTIO_BLK_S_IOERR  # §5.2.6.2: writes to a VIRTIO_BLK_F_RO device fail
        if not self._in_bounds(sector, reader.remaining):
            return VIRTIO_BLK_S_IOERR
        offset = sector * SECTOR_SIZE
        while reader.remaining:
            piece = reader.read(min(IO_CHUNK, reader.remaining))
            if os.pwrite(self._fd, piece, offset) != len(piece):
                return VIRTIO_BLK_S_IOERR
            offset += len(piece)
        return VIRTIO_BLK_S_OK
