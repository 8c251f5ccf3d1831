"""The hybrid-vsock muxer alone: the test plays the device, handing it packets and taking its packets.

No virtqueue or guest memory is involved; what the device does with the queues is test_vsock.py's job.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_virtio.testing import pump
from kata_virtio.vsock import (
    CONN_BUF_ALLOC,
    REQUEST_TIMEOUT,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VSOCK_HDR,
    VSOCK_HOST_CID,
    VsockHeader,
    VsockMuxer,
)

GUEST_CID = 3


class FakeDevice:
    """What `VirtioVsock` does for the muxer, without queues: packets in, packets out."""

    def __init__(self, muxer: VsockMuxer, room: int = 4096) -> None:
        self.muxer = muxer
        self.room = room

    def send(self, src: int, dst: int, op: int, payload: bytes = b"", *, buf_alloc: int = 1 << 20) -> None:
        hdr = VsockHeader(GUEST_CID, VSOCK_HOST_CID, src, dst, len(payload), 1, op, 0, buf_alloc, 0)
        self.muxer.send_pkt(hdr, payload)

    def take(self) -> list[tuple[VsockHeader, bytes]]:
        """Every packet the muxer has for the guest, each into a buffer of ``room`` payload bytes."""
        out = []
        while self.muxer.has_pending_rx():
            raw = self.muxer.recv_pkt(self.room)
            if raw is None:
                break
            out.append((VsockHeader.unpack(raw), raw[VSOCK_HDR.size :]))
        return out


@pytest.fixture
def muxer(tmp_path: Path) -> Iterator[VsockMuxer]:
    mux = VsockMuxer(tmp_path / "kata.hvsock", GUEST_CID)
    yield mux
    mux.close()


def connect(muxer: VsockMuxer, port: int) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(muxer.uds_path)
    client.sendall(f"CONNECT {port}\n".encode())
    client.settimeout(5)
    pump(muxer)
    return client


def establish(muxer: VsockMuxer, dev: FakeDevice, port: int = 1024) -> tuple[socket.socket, int]:
    client = connect(muxer, port)
    [(req, _)] = dev.take()
    assert (req.op, req.src_cid, req.dst_cid, req.dst_port) == (VIRTIO_VSOCK_OP_REQUEST, 2, GUEST_CID, port)
    dev.send(port, req.src_port, VIRTIO_VSOCK_OP_RESPONSE)
    assert client.recv(64) == f"OK {req.src_port}\n".encode()
    return client, req.src_port


def test_muxer_bridges_a_connect_client_both_ways(muxer: VsockMuxer) -> None:
    dev = FakeDevice(muxer)
    client, host_port = establish(muxer, dev)
    client.sendall(b"ping")
    pump(muxer)
    [(hdr, payload)] = dev.take()
    assert (hdr.op, hdr.src_port, hdr.dst_port, payload) == (VIRTIO_VSOCK_OP_RW, host_port, 1024, b"ping")
    assert hdr.buf_alloc == CONN_BUF_ALLOC
    dev.send(1024, host_port, VIRTIO_VSOCK_OP_RW, b"pong")
    assert client.recv(64) == b"pong"
    assert muxer.connection_count == 1
    client.close()


def test_muxer_fills_no_more_than_the_room_it_is_given(muxer: VsockMuxer) -> None:
    dev = FakeDevice(muxer, room=3)
    client, _ = establish(muxer, dev)
    client.sendall(b"abcdefg")
    pump(muxer)
    payloads = [p for _, p in dev.take()]
    assert b"".join(payloads) == b"abcdefg" and max(map(len, payloads)) == 3
    client.close()


def test_muxer_stops_polling_streams_while_the_guest_has_no_rx_space(muxer: VsockMuxer) -> None:
    dev = FakeDevice(muxer)
    client, _ = establish(muxer, dev)
    fd = muxer._conns[next(iter(muxer._conns))].sock.fileno()
    assert muxer.watched()[fd] & select.POLLIN
    muxer.rx_space = False
    assert not muxer.watched().get(fd, 0) & select.POLLIN
    client.close()


def test_muxer_resets_a_guest_that_overruns_its_credit(muxer: VsockMuxer) -> None:
    dev = FakeDevice(muxer)
    client, host_port = establish(muxer, dev)
    client.shutdown(socket.SHUT_RD)  # the host reader stops: guest data piles up in the muxer
    chunk = bytes(64 * 1024)
    for _ in range(CONN_BUF_ALLOC // len(chunk) + 8):
        dev.send(1024, host_port, VIRTIO_VSOCK_OP_RW, chunk)
        if muxer.connection_count == 0:
            break
    assert muxer.connection_count == 0
    assert [h.op for h, _ in dev.take()][-1] == VIRTIO_VSOCK_OP_RST
    client.close()


def test_muxer_ignores_packets_not_from_its_guest(muxer: VsockMuxer) -> None:
    hdr = VsockHeader(GUEST_CID + 1, VSOCK_HOST_CID, 5, 1024, 0, 1, VIRTIO_VSOCK_OP_REQUEST, 0, 0, 0)
    muxer.send_pkt(hdr, b"")
    assert not muxer.has_pending_rx() and muxer.connection_count == 0


def test_muxer_answers_a_guest_connect_to_an_unbound_port_with_rst(muxer: VsockMuxer) -> None:
    dev = FakeDevice(muxer)
    dev.send(7000, 4242, VIRTIO_VSOCK_OP_REQUEST)
    [(hdr, _)] = dev.take()
    assert (hdr.op, hdr.src_port, hdr.dst_port) == (VIRTIO_VSOCK_OP_RST, 4242, 7000)


def test_muxer_bridges_a_guest_connect_to_the_port_socket(muxer: VsockMuxer) -> None:
    dev = FakeDevice(muxer)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(f"{muxer.uds_path}_1025")
        listener.listen(1)
        dev.send(7000, 1025, VIRTIO_VSOCK_OP_REQUEST)
        [(hdr, _)] = dev.take()
        assert (hdr.op, hdr.src_port, hdr.dst_port) == (VIRTIO_VSOCK_OP_RESPONSE, 1025, 7000)
        peer, _ = listener.accept()
        with peer:
            dev.send(7000, 1025, VIRTIO_VSOCK_OP_RW, b"log line\n")
            peer.settimeout(5)
            assert peer.recv(64) == b"log line\n"


def test_muxer_closes_a_client_whose_request_the_guest_never_answers(muxer: VsockMuxer) -> None:
    dev = FakeDevice(muxer)
    client = connect(muxer, 1024)
    [_] = dev.take()  # the REQUEST, delivered: the REQUEST timeout runs from here
    muxer.tick(now=time.monotonic() + REQUEST_TIMEOUT + 1)
    assert muxer.connection_count == 0
    assert [h.op for h, _ in dev.take()] == [VIRTIO_VSOCK_OP_RST]
    assert client.recv(64) == b""
    client.close()


def test_muxer_waits_for_an_answer_on_its_clock_not_the_wall_clock(muxer: VsockMuxer) -> None:
    """The VMM gives the muxer the guest's clock (it stands still while the vCPU waits for a host CPU): a
    REQUEST delivered to a starved guest is not refused however long the wall time, until the guest itself
    had REQUEST_TIMEOUT to answer it."""
    guest = [1000.0]
    muxer.clock = lambda: guest[0]
    dev = FakeDevice(muxer)
    client = connect(muxer, 1024)
    [_] = dev.take()  # the REQUEST, delivered at guest time 1000
    muxer.tick()  # the wall clock moved on; the guest's did not
    guest[0] += REQUEST_TIMEOUT / 2
    muxer.tick()
    assert muxer.connection_count == 1 and dev.take() == []
    guest[0] += REQUEST_TIMEOUT
    muxer.tick()
    assert muxer.connection_count == 0
    assert [h.op for h, _ in dev.take()] == [VIRTIO_VSOCK_OP_RST]
    assert client.recv(64) == b""
    client.close()
