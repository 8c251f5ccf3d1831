"""Frame encoding and the incremental decoder, including what untrusted bytes can do to it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kata_proto._gen.google.rpc import status_pb2
from kata_proto._gen.ttrpc import request_pb2
from kata_proto.ttrpc import (
    HEADER_LENGTH,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    MessageType,
    ProtocolError,
    TtrpcError,
    encode_frame,
)


def _drain(decoder: FrameDecoder) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def test_header_is_big_endian_length_stream_type_flags() -> None:
    data = encode_frame(0x01020304, MessageType.RESPONSE, b"abc", flags=0x05)
    assert data == bytes([0, 0, 0, 3, 1, 2, 3, 4, 2, 5]) + b"abc"
    assert HEADER_LENGTH == 10
    assert MAX_PAYLOAD == 4 * 1024 * 1024


def test_decoder_returns_frames_fed_one_byte_at_a_time() -> None:
    wire = encode_frame(1, MessageType.REQUEST, b"hello") + encode_frame(3, MessageType.REQUEST, b"")
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        frames += _drain(decoder)
    assert frames == [
        Frame(1, MessageType.REQUEST, 0, b"hello", 5),
        Frame(3, MessageType.REQUEST, 0, b"", 0),
    ]
    decoder.close()


def test_encoder_refuses_payload_above_maximum() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(1, MessageType.REQUEST, bytes(MAX_PAYLOAD + 1))
    assert len(encode_frame(1, MessageType.REQUEST, bytes(MAX_PAYLOAD))) == MAX_PAYLOAD + HEADER_LENGTH


def test_oversize_frame_is_skipped_and_reported_then_decoding_continues() -> None:
    size = MAX_PAYLOAD + 100
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">IIBB", size, 7, MessageType.REQUEST, 0) + bytes(1000))
    assert decoder.next_frame() is None
    assert decoder.buffered == 0  # the skipped payload is not held in memory
    decoder.feed(bytes(size - 1000) + encode_frame(9, MessageType.REQUEST, b"next"))
    oversize = decoder.next_frame()
    assert oversize == Frame(7, MessageType.REQUEST, 0, b"", size, oversize=True)
    assert decoder.next_frame() == Frame(9, MessageType.REQUEST, 0, b"next", 4)


def test_reserved_length_byte_is_a_protocol_error_and_sticks() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError, match="reserved"):
        decoder.next_frame()
    with pytest.raises(ProtocolError):
        decoder.feed(encode_frame(1, MessageType.REQUEST, b""))


def test_stream_ending_inside_a_frame_is_a_protocol_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(1, MessageType.REQUEST, b"abcdef")[:-2])
    assert decoder.next_frame() is None
    with pytest.raises(ProtocolError, match="middle of a frame"):
        decoder.close()


def test_protocol_error_is_a_ttrpc_error() -> None:
    assert issubclass(ProtocolError, TtrpcError)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20))
def test_arbitrary_bytes_raise_only_protocol_error(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    total = sum(len(c) for c in chunks)
    produced = 0
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            produced += len(_drain(decoder))
        decoder.close()
    except ProtocolError:
        return
    # Every frame consumes at least a header, so decoding always terminates.
    assert produced * HEADER_LENGTH <= total


@st.composite
def _messages(draw: st.DrawFn) -> tuple[int, bytes]:
    kind = draw(st.sampled_from(["request", "response"]))
    text = st.text(max_size=30)
    if kind == "request":
        msg: request_pb2.Request | request_pb2.Response = request_pb2.Request(
            service=draw(text),
            method=draw(text),
            payload=draw(st.binary(max_size=200)),
            timeout_nano=draw(st.integers(min_value=-(2**63), max_value=2**63 - 1)),
            metadata=[request_pb2.KeyValue(key=k, value=v) for k, v in draw(st.lists(st.tuples(text, text)))],
        )
        return MessageType.REQUEST, msg.SerializeToString()
    msg = request_pb2.Response(
        status=status_pb2.Status(code=draw(st.integers(0, 16)), message=draw(text)),
        payload=draw(st.binary(max_size=200)),
    )
    return MessageType.RESPONSE, msg.SerializeToString()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2**32 - 1), _messages(), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    st.lists(st.integers(1, 50), min_size=1, max_size=10),
)
def test_random_request_and_response_frames_round_trip_exactly(
    frames: list[tuple[int, tuple[int, bytes], int]], cuts: list[int]
) -> None:
    wire = b"".join(encode_frame(sid, typ, payload, flags) for sid, (typ, payload), flags in frames)
    decoder = FrameDecoder()
    got: list[Frame] = []
    pos, i = 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        decoder.feed(wire[pos : pos + step])
        got += _drain(decoder)
        pos += step
        i += 1
    decoder.close()
    assert [(f.stream_id, f.type, f.payload, f.flags) for f in got] == [
        (sid, typ, payload, flags) for sid, (typ, payload), flags in frames
    ]
    for f, (_, (typ, payload), _) in zip(got, frames, strict=True):
        cls = request_pb2.Request if typ == MessageType.REQUEST else request_pb2.Response
        assert cls.FromString(f.payload) == cls.FromString(payload)
