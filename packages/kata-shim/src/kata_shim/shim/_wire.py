"""The one protobuf message the delete path writes, encoded with the standard library.

`containerd-shim-kata-v2 delete` prints a containerd.task.v2.DeleteResponse
{pid = 1 uint32, exit_status = 2 uint32, exited_at = 3 google.protobuf.Timestamp{seconds = 1 int64,
nanos = 2 int32}}. Importing protobuf (and with it kata_proto, which imports trio) would cost seconds
under nested TCG; tests check these bytes against the generated message.
"""

from __future__ import annotations

import time

_VARINT = 0
_LEN = 2


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # negative int64/int32: ten-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def encode_timestamp(seconds: int, nanos: int) -> bytes:
    """google.protobuf.Timestamp (proto3: zero fields are omitted)."""
    out = b""
    if seconds:
        out += _field(1, _VARINT, _varint(seconds))
    if nanos:
        out += _field(2, _VARINT, _varint(nanos))
    return out


def encode_delete_response(pid: int, exit_status: int, exited_at_ns: int | None = None) -> bytes:
    """containerd.task.v2.DeleteResponse; `exited_at_ns` defaults to now (wall clock)."""
    if exited_at_ns is None:
        exited_at_ns = time.time_ns()
    out = b""
    if pid:
        out += _field(1, _VARINT, _varint(pid))
    if exit_status:
        out += _field(2, _VARINT, _varint(exit_status))
    stamp = encode_timestamp(exited_at_ns // 1_000_000_000, exited_at_ns % 1_000_000_000)
    out += _field(3, _LEN, _varint(len(stamp)) + stamp)
    return out
