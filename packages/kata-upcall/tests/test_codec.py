"""The dbs-upcall codec: byte-exact fixtures from upstream's structs, round trips, and hostile bytes.

Fixture derivation (x86-64, little-endian, repr(C) / C struct layout; upstream: dbs-upcall
``dev_mgr_service.rs`` and the dragonball-experimental ``dragonball_device_manager.c``):

- ``struct devmgr_msg_header`` = 4 x u32: magic_version, msg_size, msg_type, msg_flags -> 16 bytes.
  0x444D0100 as a LE u32 is ``00 01 4d 44``.
- ``MmioDevRequest`` = {u64 mmio_base, u64 mmio_size, u32 mmio_irq}: offsets 0, 8, 16, size rounded up to the
  struct's 8-byte alignment -> 24 (4 bytes tail padding); msg_size = size_of = 24 = ``18 00 00 00``.
- ``CpuDevRequest`` (x86-64) = {u8 count, u8 apic_ver, u8 apic_ids[256]}: alignment 1, size 258 = 0x102 ->
  msg_size ``02 01 00 00``; count at 0x10, apic_ver at 0x11, apic_ids from 0x12.
- ``PciDevRequest`` = {u8 busno, u8 devfn}: size 2.
- ``struct devmgr_reply`` = header, i32 ret at 0x10, then the payload at 0x14; ``cpu_dev_reply_info`` =
  {u32 apic_index}: the guest sets msg_size = sizeof(cpu_dev_reply_info) = 4 on success, 0 when it fails
  (``db_devmgr_process`` rewrites the header with size 0); MMIO and PCI replies always carry size 0.
- The guest's Connect is a header with type 0, size 0, flags 0 in a zeroed 1024-byte frame.
Every frame is DEV_MGR_MSG_SIZE = 0x400 bytes, zero padded.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kata_upcall import (
    DEV_MGR_MSG_SIZE,
    AddCpu,
    AddMmio,
    AddPci,
    Connect,
    CpuReply,
    DelCpu,
    DelMmio,
    DelPci,
    MmioReply,
    MsgHeader,
    MsgType,
    PciReply,
    UpcallProtocolError,
    decode_accept_line,
    decode_connect,
    decode_reply,
    decode_request,
    encode_hybrid_connect,
)


def frame(hex_prefix: str) -> bytes:
    return bytes.fromhex(hex_prefix.replace(" ", "")).ljust(DEV_MGR_MSG_SIZE, b"\0")


# header: magic | msg_size | msg_type | msg_flags
ADD_MMIO_D0000000 = frame(
    "00014d44 18000000 05000000 00000000"  # size 24, type ADD_MMIO 5
    " 000000d000000000 0010000000000000 05000000 00000000"  # base 0xd0000000, size 0x1000, irq 5, pad
)
DEL_MMIO_D0000000 = frame(
    "00014d44 18000000 06000000 00000000 000000d000000000 0010000000000000 05000000 00000000"
)
ADD_CPU_1_2 = frame("00014d44 02010000 01000000 00000000 02 14 01 02")  # count 2, apic_ver 0x14, ids 1, 2
DEL_CPU_3 = frame("00014d44 02010000 02000000 00000000 01 00 03")  # count 1, apic_ver 0, id 3
ADD_PCI_0_18 = frame("00014d44 02000000 07000000 00000000 00 18")  # busno 0, devfn 0x18 (slot 3)
DEL_PCI_0_18 = frame("00014d44 02000000 08000000 00000000 00 18")
CONNECT = frame("00014d44 00000000 00000000 00000000")
CPU_REPLY_OK_2 = frame("00014d44 04000000 01000000 00000000 00000000 02000000")  # ret 0, apic_index 2
CPU_REPLY_EINVAL = frame("00014d44 00000000 02000000 00000000 eaffffff")  # DEL_CPU ret -22, no index
MMIO_REPLY_OK = frame("00014d44 00000000 05000000 00000000 00000000")
MMIO_REPLY_ENODEV = frame("00014d44 00000000 06000000 00000000 edffffff")  # DEL_MMIO ret -19
PCI_REPLY_OK = frame("00014d44 00000000 07000000 00000000 00000000")

REQUEST_FIXTURES = [
    (AddMmio(0xD000_0000, 0x1000, 5), ADD_MMIO_D0000000),
    (DelMmio(0xD000_0000, 0x1000, 5), DEL_MMIO_D0000000),
    (AddCpu((1, 2), apic_ver=0x14), ADD_CPU_1_2),
    (DelCpu((3,)), DEL_CPU_3),
    (AddPci(0, 0x18), ADD_PCI_0_18),
    (DelPci(0, 0x18), DEL_PCI_0_18),
]
REPLY_FIXTURES = [
    (CpuReply(MsgType.ADD_CPU, 0, 2), CPU_REPLY_OK_2),
    (CpuReply(MsgType.DEL_CPU, -22, None), CPU_REPLY_EINVAL),
    (MmioReply(MsgType.ADD_MMIO, 0), MMIO_REPLY_OK),
    (MmioReply(MsgType.DEL_MMIO, -19), MMIO_REPLY_ENODEV),
    (PciReply(MsgType.ADD_PCI, 0), PCI_REPLY_OK),
]


@pytest.mark.parametrize(("message", "wire"), REQUEST_FIXTURES, ids=lambda v: type(v).__name__)
def test_request_encodes_byte_exact_and_decodes_back(message: object, wire: bytes) -> None:
    assert message.encode() == wire  # type: ignore[attr-defined]
    assert decode_request(wire) == message


@pytest.mark.parametrize(("message", "wire"), REPLY_FIXTURES, ids=lambda v: type(v).__name__)
def test_reply_encodes_byte_exact_and_decodes_back(message: object, wire: bytes) -> None:
    assert message.encode() == wire  # type: ignore[attr-defined]
    assert decode_reply(wire) == message


def test_connect_frame_is_a_bare_header() -> None:
    assert Connect().encode() == CONNECT
    assert decode_connect(CONNECT) == Connect()


def test_struct_sizes_match_upstream() -> None:
    assert struct.calcsize("<IIII") == 16
    assert len(ADD_MMIO_D0000000.rstrip(b"\0")) <= 16 + 24
    assert MsgHeader.decode(ADD_CPU_1_2).msg_size == 258
    assert MsgHeader.decode(ADD_MMIO_D0000000).msg_size == 24
    assert MsgHeader.decode(ADD_PCI_0_18).msg_size == 2


def test_cpu_request_carries_count_and_up_to_255_ids() -> None:
    ids = tuple(range(255))
    wire = AddCpu(ids).encode()
    assert wire[16] == 255
    assert wire[18 : 18 + 255] == bytes(ids)
    assert decode_request(wire) == AddCpu(ids)
    with pytest.raises(ValueError, match="at most 255"):
        AddCpu(tuple(range(256)))


def test_reply_padding_is_not_checked_because_the_guest_reuses_its_buffer() -> None:
    # The guest's reply buffer keeps the last CPU index after a later MMIO reply.
    stale = bytearray(MMIO_REPLY_OK)
    stale[20:24] = (7).to_bytes(4, "little")
    assert decode_reply(bytes(stale)) == MmioReply(MsgType.ADD_MMIO, 0)


def test_hybrid_vsock_handshake_lines() -> None:
    assert encode_hybrid_connect() == b"CONNECT 219\n"
    assert decode_accept_line(b"OK 1073741824\n") == 1073741824
    assert decode_accept_line(b"OK\n") is None


@pytest.mark.parametrize(
    "line",
    [b"NO\n", b"OK", b"OK 12a\n", b"ok 5\n", b"OK 99999999999\n", b"OK 5\nX", b"OK " + b"1" * 70 + b"\n"],
)
def test_accept_line_rejects_anything_but_ok(line: bytes) -> None:
    with pytest.raises(UpcallProtocolError):
        decode_accept_line(line)


def _with(wire: bytes, offset: int, value: int) -> bytes:
    out = bytearray(wire)
    out[offset : offset + 4] = value.to_bytes(4, "little")
    return bytes(out)


HOSTILE = {
    "short": ADD_MMIO_D0000000[:1023],
    "long": ADD_MMIO_D0000000 + b"\0",
    "empty": b"",
    "header only": ADD_MMIO_D0000000[:16],
    "wrong magic": _with(ADD_MMIO_D0000000, 0, 0x444D0200),
    "flags": _with(ADD_MMIO_D0000000, 12, 1),
    "unknown type": _with(ADD_MMIO_D0000000, 8, 0xABCD1234),
    "size lies small": _with(ADD_MMIO_D0000000, 4, 20),
    "size lies huge": _with(ADD_MMIO_D0000000, 4, 0xFFFF_FFFF),
    "memory type": _with(ADD_MMIO_D0000000, 8, 3),
    "connect type": CONNECT,
}


@pytest.mark.parametrize("wire", HOSTILE.values(), ids=HOSTILE.keys())
def test_decode_request_rejects_hostile_frames(wire: bytes) -> None:
    with pytest.raises(UpcallProtocolError):
        decode_request(wire)


HOSTILE_REPLIES = {
    "short": CPU_REPLY_OK_2[:20],
    "long": CPU_REPLY_OK_2 + b"\0" * 1024,
    "wrong magic": _with(CPU_REPLY_OK_2, 0, 0),
    "flags": _with(CPU_REPLY_OK_2, 12, 0x80000000),
    "unknown type": _with(CPU_REPLY_OK_2, 8, 9),
    "cpu size lies": _with(CPU_REPLY_OK_2, 4, 8),
    "cpu size past the frame": _with(CPU_REPLY_OK_2, 4, 4096),
    "mmio with a payload": _with(MMIO_REPLY_OK, 4, 4),
    "connect where a reply is due": CONNECT,
    "memory reply": _with(MMIO_REPLY_OK, 8, 4),
}


@pytest.mark.parametrize("wire", HOSTILE_REPLIES.values(), ids=HOSTILE_REPLIES.keys())
def test_decode_reply_rejects_hostile_frames(wire: bytes) -> None:
    with pytest.raises(UpcallProtocolError):
        decode_reply(wire)


@pytest.mark.parametrize("wire", [MMIO_REPLY_OK, _with(CONNECT, 4, 1), _with(CONNECT, 12, 1), CONNECT[:100]])
def test_decode_connect_accepts_only_the_connect_frame(wire: bytes) -> None:
    with pytest.raises(UpcallProtocolError):
        decode_connect(wire)


# -- property tests ----------------------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
i32 = st.integers(-0x8000_0000, 0x7FFF_FFFF)

requests = st.one_of(
    st.builds(AddMmio, u64, u64, u32),
    st.builds(DelMmio, u64, u64, u32),
    st.builds(AddCpu, st.lists(u8, max_size=255).map(tuple), u8),
    st.builds(DelCpu, st.lists(u8, max_size=255).map(tuple), u8),
    st.builds(AddPci, u8, u8),
    st.builds(DelPci, u8, u8),
)
replies = st.one_of(
    st.builds(MmioReply, st.sampled_from([MsgType.ADD_MMIO, MsgType.DEL_MMIO]), i32),
    st.builds(CpuReply, st.sampled_from([MsgType.ADD_CPU, MsgType.DEL_CPU]), i32, st.none() | u32),
    st.builds(PciReply, st.sampled_from([MsgType.ADD_PCI, MsgType.DEL_PCI]), i32),
)


@given(requests)
def test_every_request_round_trips(request: AddMmio) -> None:
    wire = request.encode()
    assert len(wire) == DEV_MGR_MSG_SIZE
    assert decode_request(wire) == request
    assert decode_request(wire).encode() == wire


@given(replies)
def test_every_reply_round_trips(reply: MmioReply) -> None:
    wire = reply.encode()
    assert len(wire) == DEV_MGR_MSG_SIZE
    assert decode_reply(wire) == reply


# Random bytes almost never carry the magic: also build frames from plausible headers and random bodies.
plausible_frames = st.builds(
    lambda magic, size, msg_type, flags, body, cut: (
        struct.pack("<IIII", magic, size, msg_type, flags) + body
    ).ljust(DEV_MGR_MSG_SIZE, b"\0")[: DEV_MGR_MSG_SIZE + cut],
    st.sampled_from([0x444D0100, 0x444D0101, 0]) | u32,
    st.sampled_from([0, 2, 4, 24, 258, 1008, 1024]) | u32,
    st.integers(0, 10) | u32,
    st.sampled_from([0, 1]) | u32,
    st.binary(max_size=DEV_MGR_MSG_SIZE),
    st.sampled_from([0, 0, 0, -1, 1, -1000]),
)
any_frames = st.binary(max_size=2 * DEV_MGR_MSG_SIZE) | plausible_frames


@given(any_frames)
def test_any_bytes_decode_to_a_request_or_protocol_error(data: bytes) -> None:
    try:
        request = decode_request(data)
    except UpcallProtocolError:
        return
    assert request.encode()[:16] == data[:16]


@given(any_frames)
def test_any_bytes_decode_to_a_reply_or_protocol_error(data: bytes) -> None:
    try:
        reply = decode_reply(data)
    except UpcallProtocolError:
        return
    assert reply.encode()[:20] == data[:20]


@given(any_frames)
def test_any_bytes_decode_to_connect_or_protocol_error(data: bytes) -> None:
    try:
        decode_connect(data)
    except UpcallProtocolError:
        return
    assert data[:16] == CONNECT[:16]


@given(st.binary(max_size=100) | st.from_regex(rb"\AOK( [0-9]{0,12})?\n?\Z"))
def test_any_line_decodes_to_a_port_or_protocol_error(line: bytes) -> None:
    try:
        port = decode_accept_line(line)
    except UpcallProtocolError:
        return
    assert port is None or 0 <= port <= 0xFFFF_FFFF
