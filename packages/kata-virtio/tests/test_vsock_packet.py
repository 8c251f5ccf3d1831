"""The vsock packet codec on its own: header layout, and the checks on guest-supplied lengths."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kata_virtio import ChainReader
from kata_virtio.testing import FakeGuestMemory
from kata_virtio.vsock import (
    MAX_PKT_PAYLOAD,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_TYPE_STREAM,
    VSOCK_HDR,
    VSOCK_HOST_CID,
    VsockHeader,
    VsockPacketError,
    host_packet,
    read_packet,
)

u64, u32, u16 = (st.integers(0, (1 << n) - 1) for n in (64, 32, 16))
headers = st.builds(VsockHeader, u64, u64, u32, u32, u32, u16, u16, u32, u32, u32)


def chain_of(*buffers: bytes) -> ChainReader:
    """A driver chain whose readable buffers hold ``buffers``, one descriptor each."""
    mem = FakeGuestMemory(1 << 20)
    segments, addr = [], 0x1000
    for data in buffers:
        mem.write(addr, data)
        segments.append((addr, len(data)))
        addr += len(data) + 64
    return ChainReader(mem, segments)


def test_header_is_the_44_byte_virtio_vsock_hdr() -> None:
    assert VSOCK_HDR.size == 44
    raw = VsockHeader(3, 2, 1024, 5, 7, VIRTIO_VSOCK_TYPE_STREAM, VIRTIO_VSOCK_OP_RW, 0, 4096, 9).pack()
    assert raw[:8] == (3).to_bytes(8, "little") and raw[16:20] == (1024).to_bytes(4, "little")
    assert raw[24:28] == (7).to_bytes(4, "little")  # len
    assert raw[30:32] == VIRTIO_VSOCK_OP_RW.to_bytes(2, "little")


@given(headers)
def test_header_round_trips(hdr: VsockHeader) -> None:
    assert VsockHeader.unpack(hdr.pack()) == hdr


def test_unpack_refuses_a_short_header() -> None:
    with pytest.raises(VsockPacketError):
        VsockHeader.unpack(bytes(VSOCK_HDR.size - 1))


def test_read_packet_takes_exactly_the_announced_payload() -> None:
    hdr = VsockHeader(3, 2, 1024, 5, 5, 1, VIRTIO_VSOCK_OP_RW, 0, 4096, 0)
    got, payload = read_packet(chain_of(hdr.pack(), b"hel", b"lo, and more"))
    assert got == hdr and payload == b"hello"


@pytest.mark.parametrize(
    ("length", "carried"),
    [(MAX_PKT_PAYLOAD + 1, MAX_PKT_PAYLOAD + 1), (10, 9), (0xFFFFFFFF, 0)],
    ids=["over-max-payload", "longer-than-chain", "huge"],
)
def test_read_packet_refuses_a_length_the_chain_does_not_back(length: int, carried: int) -> None:
    hdr = VsockHeader(3, 2, 1024, 5, length, 1, VIRTIO_VSOCK_OP_RW, 0, 0, 0)
    with pytest.raises(VsockPacketError, match="bad length"):
        read_packet(chain_of(hdr.pack(), bytes(carried)))


def test_read_packet_refuses_a_chain_shorter_than_a_header() -> None:
    with pytest.raises(VsockPacketError):
        read_packet(chain_of(bytes(20)))


@given(st.lists(st.binary(max_size=128), min_size=1, max_size=4))
def test_read_packet_on_any_bytes_returns_a_bounded_packet_or_refuses(buffers: list[bytes]) -> None:
    try:
        hdr, payload = read_packet(chain_of(*buffers))
    except VsockPacketError:
        return
    assert len(payload) == hdr.len <= sum(map(len, buffers)) - VSOCK_HDR.size


def test_host_packet_is_from_the_host_cid_and_carries_its_payload() -> None:
    raw = host_packet(3, 1 << 30, 1024, VIRTIO_VSOCK_OP_RW, buf_alloc=4096, fwd_cnt=12, payload=b"abc")
    hdr = VsockHeader.unpack(raw)
    assert (hdr.src_cid, hdr.dst_cid, hdr.src_port, hdr.dst_port) == (VSOCK_HOST_CID, 3, 1 << 30, 1024)
    assert (hdr.len, hdr.type, hdr.buf_alloc, hdr.fwd_cnt) == (3, VIRTIO_VSOCK_TYPE_STREAM, 4096, 12)
    assert raw[VSOCK_HDR.size :] == b"abc"
