"""virtio-vsock packets (virtio 1.2 §5.10.6): the header codec and the spec constants.

Nothing here trusts the guest: `read_packet` takes a header and exactly the payload it announces from a
driver chain, and refuses a short header, a payload longer than `MAX_PKT_PAYLOAD` or than the chain holds.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kata_virtio._memory import VirtioError
from kata_virtio._queue import ChainReader

# virtio 1.2 §5.10.6: struct virtio_vsock_hdr, ops, types and shutdown flags
# src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
VSOCK_HDR = struct.Struct("<QQIIIHHIII")
VIRTIO_VSOCK_TYPE_STREAM = 1
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7
VIRTIO_VSOCK_SHUTDOWN_RCV = 1
VIRTIO_VSOCK_SHUTDOWN_SEND = 2
VSOCK_HOST_CID = 2
#: The largest payload one packet carries, either way (a guest packet announcing more is dropped).
MAX_PKT_PAYLOAD = 64 * 1024


class VsockPacketError(VirtioError):
    """Raised when a guest packet's header is short or announces a payload it does not carry."""


@dataclass(frozen=True, slots=True)
class VsockHeader:
    """struct virtio_vsock_hdr (§5.10.6), field for field; ``len`` is the payload length."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        """The 44 header bytes, little endian (§5.10.6)."""
        return VSOCK_HDR.pack(
            self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type, self.op,
            self.flags, self.buf_alloc, self.fwd_cnt,
        )  # fmt: skip

    @classmethod
    def unpack(cls, raw: bytes | bytearray | memoryview) -> VsockHeader:
        """Decode the first `VSOCK_HDR.size` bytes of ``raw``; `VsockPacketError` if there are fewer."""
        if len(raw) < VSOCK_HDR.size:
            raise VsockPacketError(f"vsock header of {len(raw)} bytes, want {VSOCK_HDR.size}")
        return cls(*VSOCK_HDR.unpack_from(raw))


def read_packet(reader: ChainReader) -> tuple[VsockHeader, bytes]:
    """One guest packet from the driver-readable part of a TX chain: its header and its payload.

    Raises `VsockPacketError` when the header is short or its ``len`` exceeds `MAX_PKT_PAYLOAD` or the
    bytes the chain still holds (§5.10.6.1: the driver never sends more than the header says).
    """
    hdr = VsockHeader.unpack(reader.read(VSOCK_HDR.size))
    if hdr.len > MAX_PKT_PAYLOAD or hdr.len > reader.remaining:
        raise VsockPacketError(f"vsock packet with bad length {hdr.len}")
    return hdr, reader.read(hdr.len) if hdr.len else b""


def host_packet(
    guest_cid: int, local: int, peer: int, op: int, *, flags: int = 0, buf_alloc: int, fwd_cnt: int,
    payload: bytes = b"",
) -> bytes:  # fmt: skip
    """A stream packet from the host (CID 2, port ``local``) to guest port ``peer``: header + payload."""
    hdr = VsockHeader(
        VSOCK_HOST_CID, guest_cid, local, peer, len(payload), VIRTIO_VSOCK_TYPE_STREAM, op, flags, buf_alloc,
        fwd_cnt,
    )  # fmt: skip
    return hdr.pack() + payload
