"""The protobuf bytes `start` and `delete` handle, with the standard library.

`containerd-shim-kata-v2 delete` prints a containerd.task.v2.DeleteResponse
{pid = 1 uint32, exit_status = 2 uint32, exited_at = 3 google.protobuf.Timestamp{seconds = 1 int64,
nanos = 2 int32}}. `start` reads the runtime options containerd writes on its stdin (`start_config_path`).
Importing protobuf (and with it kata_proto, which imports trio) would cost seconds under nested TCG;
tests check these bytes against the generated messages.
"""

from __future__ import annotations

import time

_VARINT = 0
_I64 = 1
_LEN = 2
_I32 = 5


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


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def decode_fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """A message's fields as (number, wire type, value): an int for varints and fixed ones, bytes for
    length-delimited ones. ValueError for bytes that are not a protobuf message (groups included)."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type in (_I64, _I32):
            size = 8 if wire_type == _I64 else 4
            if pos + size > len(data):
                raise ValueError("truncated fixed field")
            value, pos = int.from_bytes(data[pos : pos + size], "little"), pos + size
        elif wire_type == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated length-delimited field")
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"wire type {wire_type} of field {number}")
        if number == 0:
            raise ValueError("field number 0")
        out.append((number, wire_type, value))
    return out


def _bytes_field(fields: list[tuple[int, int, int | bytes]], number: int) -> bytes:
    found = b""
    for n, wire_type, value in fields:
        if n == number and wire_type == _LEN and isinstance(value, bytes):
            found = value  # proto3: the last one wins
    return found


RUNTIME_OPTIONS = "runtimeoptions.v1.Options"
"""The runtime options message name (containerd's; CRI's older cri.runtimeoptions.v1.Options too)."""


def start_config_path(data: bytes) -> str:
    """The ``config_path`` of the runtime options containerd writes on `start`'s stdin, "" without one.

    containerd up to 2.2 writes a google.protobuf.Any {type_url = 1, value = 2}; 2.3 and later a
    containerd.runtime.bootstrap.v1.BootstrapParams whose ``extensions = 8`` are Extension {value = 1 Any}.
    An Any of ``runtimeoptions.v1.Options`` carries ``config_path = 2``. ValueError for bytes that are
    not a protobuf message."""
    top = decode_fields(data)
    extensions = [v for n, w, v in top if n == 8 and w == _LEN and isinstance(v, bytes)]
    anys = [_bytes_field(decode_fields(ext), 1) for ext in extensions] if extensions else [data]
    for raw in anys:
        fields = decode_fields(raw)
        type_url = _bytes_field(fields, 1).decode(errors="replace")
        if type_url.rsplit("/", 1)[-1].endswith(RUNTIME_OPTIONS):
            path = _bytes_field(decode_fields(_bytes_field(fields, 2)), 2)
            return path.decode(errors="replace")
    return ""
