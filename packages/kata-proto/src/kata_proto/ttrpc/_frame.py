"""ttrpc message framing: the 10-byte header, frame encoding and an incremental decoder.

Wire format (containerd/ttrpc PROTOCOL.md, "Message Frame"): payload length u32 big-endian,
stream id u32 big-endian, message type u8, flags u8, then `length` payload bytes.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from kata_proto.ttrpc._errors import ProtocolError

HEADER_LENGTH = 10
MAX_PAYLOAD = 4 << 20
"""Largest payload a peer may send; bigger frames are discarded and answered ResourceExhausted."""

# PROTOCOL.md reserves the first header byte (always zero while payloads stay under 16 MiB).
# A set reserved byte means the stream is not ttrpc or lost sync; such a length is not worth
# skipping, so the decoder fails instead of discarding up to 4 GiB.
MAX_DISCARD = (1 << 24) - 1

_HEADER = struct.Struct(">IIBB")


class MessageType(enum.IntEnum):
    """ttrpc message types (PROTOCOL.md, "Message Types")."""

    REQUEST = 0x01
    RESPONSE = 0x02
    DATA = 0x03


FLAG_REMOTE_CLOSED = 0x01
"""Request and Data flag: the sender will send no more data on this stream."""
FLAG_REMOTE_OPEN = 0x02
"""Request flag: a streaming request whose sender keeps sending data."""
FLAG_NO_DATA = 0x04
"""Data flag: the frame carries no payload."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame.

    `type` is kept as a plain int when it is not a known `MessageType`, so callers can
    ignore future types as upstream does. `oversize` frames had a length above `MAX_PAYLOAD`:
    their payload was skipped and `payload` is empty; `length` tells what was announced.
    """

    stream_id: int
    type: int
    flags: int
    payload: bytes
    length: int
    oversize: bool = False


def encode_header(length: int, stream_id: int, type: int, flags: int = 0) -> bytes:
    """The 10-byte header for a frame."""
    return _HEADER.pack(length, stream_id, type, flags)


def encode_frame(stream_id: int, type: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """A whole frame; raises ValueError for a payload above `MAX_PAYLOAD` (callers check first)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds the ttrpc maximum of {MAX_PAYLOAD}")
    if not 0 <= stream_id <= 0xFFFFFFFF:
        raise ValueError(f"stream id {stream_id} does not fit in 32 bits")
    return _HEADER.pack(len(payload), stream_id, type, flags) + payload


class FrameDecoder:
    """Incremental frame decoder: `feed` bytes as they arrive, take complete frames from `next_frame`.

    The only error it raises is `ProtocolError`, for a header whose reserved first byte is
    set or for a stream that ends in the middle of a frame (`close`). After an error the
    decoder stays failed. Memory held is bounded by one frame of at most `MAX_PAYLOAD` bytes.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._discard = 0  # bytes of an oversize payload still to skip
        self._pending: Frame | None = None  # header of the oversize frame being skipped
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes."""
        if self._error is not None:
            raise self._error
        if self._discard:
            skip = min(self._discard, len(data))
            self._discard -= skip
            data = memoryview(data)[skip:]
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes are fed."""
        if self._error is not None:
            raise self._error
        if self._pending is not None:
            if self._discard:
                return None
            frame, self._pending = self._pending, None
            return frame
        buf = self._buf
        if len(buf) < HEADER_LENGTH:
            return None
        length, stream_id, type_, flags = _HEADER.unpack_from(buf)
        if length > MAX_DISCARD:
            self._error = ProtocolError(
                f"frame header announces {length} bytes: reserved length byte set, not a ttrpc stream"
            )
            raise self._error
        if length > MAX_PAYLOAD:
            frame = Frame(stream_id, type_, flags, b"", length, oversize=True)
            have = len(buf) - HEADER_LENGTH
            if have >= length:
                del buf[: HEADER_LENGTH + length]
                return frame
            del buf[:]
            self._discard = length - have
            self._pending = frame
            return None
        end = HEADER_LENGTH + length
        if len(buf) < end:
            return None
        payload = bytes(buf[HEADER_LENGTH:end])
        del buf[:end]
        return Frame(stream_id, type_, flags, payload, length)

    def close(self) -> None:
        """Declare end of stream; raises ProtocolError if it cut a frame short."""
        if self._error is not None:
            raise self._error
        if self._buf or self._pending is not None:
            self._error = ProtocolError("connection closed in the middle of a frame")
            raise self._error
