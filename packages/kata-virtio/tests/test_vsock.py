"""The hybrid vsock device against a fake guest driver and real unix sockets."""

from __future__ import annotations

import contextlib
import hashlib
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kata_virtio import VirtioVsock
from kata_virtio._spec import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from kata_virtio._vsock import (
    CONN_BUF_ALLOC,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VSOCK_HDR,
)
from kata_virtio.testing import FakeDeviceInterrupt, FakeGuestMemory, activate, pump

Packet = tuple[tuple[int, ...], bytes]


class Guest:
    """The guest's virtio-vsock driver, reduced to its queues."""

    def __init__(
        self, dev: VirtioVsock, rx_buffers: int = 32, buf_size: int = 4096, features: int | None = None
    ) -> None:
        self.dev = dev
        self.mem = FakeGuestMemory(16 << 20)
        queues, self.irq = activate(dev, self.mem, [128, 128, 16], features=features)
        self.rx, self.tx, self.ev = queues
        self.buf_size = buf_size
        self.fill(rx_buffers)

    @property
    def interrupts(self) -> FakeDeviceInterrupt:
        return self.irq

    def fill(self, n: int) -> None:
        for _ in range(n):
            self.rx.add_chain([(VSOCK_HDR.size, True), (self.buf_size, True)], indirect=True)
        self.dev.notify(0)

    def send(
        self, src: int, dst: int, op: int, payload: bytes = b"", *, flags: int = 0, buf_alloc: int = 1 << 20,
        fwd_cnt: int = 0, src_cid: int = 3, dst_cid: int = 2, ptype: int = 1,
    ) -> None:  # fmt: skip
        hdr = VSOCK_HDR.pack(src_cid, dst_cid, src, dst, len(payload), ptype, op, flags, buf_alloc, fwd_cnt)
        self.tx.add_chain([(hdr, False)] + ([(payload, False)] if payload else []))
        self.dev.notify(1)
        self.tx.get_used()  # reclaim the descriptors

    def recv(self, refill: bool = True) -> list[Packet]:
        out = []
        used = self.rx.get_used()
        for head, n in used:
            raw = self.rx.written(head, n)
            hdr = VSOCK_HDR.unpack_from(raw)
            out.append((hdr, raw[VSOCK_HDR.size : VSOCK_HDR.size + hdr[4]]))
        if refill and used:
            self.fill(len(used))
        return out


@pytest.fixture
def vsock(tmp_path: Path) -> Iterator[VirtioVsock]:
    dev = VirtioVsock(tmp_path / "kata.hvsock")
    yield dev
    dev.close()


def host_connect(dev: VirtioVsock, line: bytes) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(dev.uds_path)
    client.sendall(line)
    client.settimeout(5)
    return client


def closed(sock: socket.socket) -> bool:
    """The peer closed: EOF, or a reset when it closed with our bytes unread."""
    try:
        return sock.recv(64) == b""
    except ConnectionResetError:
        return True


def establish(dev: VirtioVsock, guest: Guest, port: int = 1024) -> tuple[socket.socket, int]:
    client = host_connect(dev, f"CONNECT {port}\n".encode())
    pump(dev)
    [(hdr, _)] = guest.recv()
    assert hdr[6] == VIRTIO_VSOCK_OP_REQUEST and hdr[3] == port and hdr[1] == 3 and hdr[0] == 2
    host_port = hdr[2]
    guest.send(port, host_port, VIRTIO_VSOCK_OP_RESPONSE)
    pump(dev)
    assert client.recv(64) == f"OK {host_port}\n".encode()
    return client, host_port


def test_config_space_holds_guest_cid(vsock: VirtioVsock) -> None:
    assert struct.unpack("<Q", vsock.read_config(0, 8)) == (3,)
    assert vsock.device_type == 19 and len(vsock.queue_max_sizes) == 3


def test_host_connect_moves_bytes_both_ways(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    client, host_port = establish(vsock, guest)
    client.sendall(b"ping")
    pump(vsock)
    [(hdr, data)] = guest.recv()
    assert hdr[6] == VIRTIO_VSOCK_OP_RW and data == b"ping" and hdr[8] == CONN_BUF_ALLOC
    guest.send(1024, host_port, VIRTIO_VSOCK_OP_RW, b"pong")
    pump(vsock)
    assert client.recv(64) == b"pong"
    assert 0 in guest.irq.used and 1 in guest.irq.used


def test_starved_rx_asks_for_a_kick_on_the_next_buffer_with_event_idx(vsock: VirtioVsock) -> None:
    """With VIRTIO_F_EVENT_IDX the driver kicks the receive queue only when its avail idx passes the device's
    avail_event (vring_need_event, virtio 1.2 §2.7.10). The device stops polling host sockets while the
    receive ring is empty, so it must publish avail_event then, or the guest's refill never kicks it and
    host->guest data stalls for good (a CI run's 64 MiB echo stopped for 300 s on a slow host; virtio-net
    had the same fix)."""
    features = vsock.avail_features | 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC
    guest = Guest(vsock, rx_buffers=4, features=features | 1 << VIRTIO_F_EVENT_IDX)
    client, _ = establish(vsock, guest)
    client.sendall(os.urandom(6 * 4096))
    pump(vsock)
    got = guest.recv(refill=False)
    assert len(got) == 4 and all(hdr[6] == VIRTIO_VSOCK_OP_RW for hdr, _ in got)  # starved: the ring is empty
    old = guest.rx.avail_idx
    guest.rx.add_chain([(VSOCK_HDR.size, True), (4096, True)], indirect=True)  # the driver's refill
    new = guest.rx.avail_idx
    event = guest.rx.avail_event()
    assert (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF, f"avail_event {event}: the refill never kicks"
    vsock.notify(0)
    pump(vsock)
    [(hdr, data)] = guest.recv(refill=False)
    assert hdr[6] == VIRTIO_VSOCK_OP_RW and len(data) == 4096


def test_lowercase_connect_is_accepted(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    client = host_connect(vsock, b"connect 1025\n")
    pump(vsock)
    [(hdr, _)] = guest.recv()
    assert hdr[6] == VIRTIO_VSOCK_OP_REQUEST and hdr[3] == 1025
    client.close()


@pytest.mark.parametrize("line", [b"HELLO 1\n", b"CONNECT x\n", b"CONNECT 99999999999\n", b"x" * 80])
def test_bad_handshake_closes_the_client(vsock: VirtioVsock, line: bytes) -> None:
    guest = Guest(vsock)
    client = host_connect(vsock, line)
    pump(vsock)
    assert closed(client)
    assert guest.recv() == []


def test_guest_rst_closes_host_connection(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    client = host_connect(vsock, b"CONNECT 1024\n")
    pump(vsock)
    [(hdr, _)] = guest.recv()
    guest.send(1024, hdr[2], VIRTIO_VSOCK_OP_RST)
    pump(vsock)
    assert client.recv(64) == b""  # nothing listens in the guest: closed without OK
    assert vsock.connection_count == 0


def test_host_eof_sends_shutdown_and_guest_rst_removes(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    client, host_port = establish(vsock, guest)
    client.close()
    pump(vsock)
    [(hdr, _)] = guest.recv()
    assert hdr[6] == VIRTIO_VSOCK_OP_SHUTDOWN and hdr[7] == 3
    guest.send(1024, host_port, VIRTIO_VSOCK_OP_RST)
    assert vsock.connection_count == 0


def test_guest_full_shutdown_is_answered_with_rst(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    client, host_port = establish(vsock, guest)
    guest.send(1024, host_port, VIRTIO_VSOCK_OP_SHUTDOWN, flags=3)
    pump(vsock)
    assert [h[6] for h, _ in guest.recv()] == [VIRTIO_VSOCK_OP_RST]
    assert client.recv(64) == b"" and vsock.connection_count == 0


def test_guest_send_shutdown_half_closes_the_socket(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    client, host_port = establish(vsock, guest)
    guest.send(1024, host_port, VIRTIO_VSOCK_OP_RW, b"last words")
    guest.send(1024, host_port, VIRTIO_VSOCK_OP_SHUTDOWN, flags=2)
    pump(vsock)
    assert client.recv(64) == b"last words" and client.recv(64) == b""
    client.sendall(b"still open the other way")
    pump(vsock)
    assert [d for _, d in guest.recv()] == [b"still open the other way"]


def test_guest_connect_reaches_uds_port_listener(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{vsock.uds_path}_5000")
    listener.listen(1)
    guest.send(7777, 5000, VIRTIO_VSOCK_OP_REQUEST)
    [(hdr, _)] = guest.recv()
    assert hdr[6] == VIRTIO_VSOCK_OP_RESPONSE and (hdr[2], hdr[3]) == (5000, 7777)
    peer, _ = listener.accept()
    peer.settimeout(5)
    guest.send(7777, 5000, VIRTIO_VSOCK_OP_RW, b"hi host")
    assert peer.recv(64) == b"hi host"
    peer.sendall(b"hi guest")
    pump(vsock)
    assert [d for _, d in guest.recv()] == [b"hi guest"]
    listener.close()
    peer.close()


def test_guest_connect_with_nothing_listening_gets_rst(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    guest.send(7777, 5001, VIRTIO_VSOCK_OP_REQUEST)
    [(hdr, _)] = guest.recv()
    assert hdr[6] == VIRTIO_VSOCK_OP_RST


def test_packet_for_unknown_connection_gets_rst(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    guest.send(1, 2, VIRTIO_VSOCK_OP_RW, b"stray")
    guest.send(1, 2, VIRTIO_VSOCK_OP_RST)  # an RST is never answered
    guest.send(1, 2, VIRTIO_VSOCK_OP_REQUEST, ptype=2)  # SEQPACKET is not offered
    guest.send(1, 2, VIRTIO_VSOCK_OP_REQUEST, src_cid=9)  # spoofed source: dropped
    assert [h[6] for h, _ in guest.recv()] == [VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RST]
    assert not vsock.broken


def test_host_sends_no_more_than_guest_credit(vsock: VirtioVsock) -> None:
    guest = Guest(vsock, rx_buffers=64)
    client, host_port = establish(vsock, guest)
    # The guest advertised 1 MiB in its RESPONSE; shrink it to 10000 bytes with a credit update.
    guest.send(1024, host_port, VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=10000)
    client.sendall(b"x" * 30000)
    pump(vsock)
    packets = guest.recv()
    data = b"".join(d for h, d in packets if h[6] == VIRTIO_VSOCK_OP_RW)
    assert len(data) == 10000
    assert packets[-1][0][6] == VIRTIO_VSOCK_OP_CREDIT_REQUEST
    guest.send(1024, host_port, VIRTIO_VSOCK_OP_CREDIT_UPDATE, buf_alloc=10000, fwd_cnt=10000)
    pump(vsock)
    more = b"".join(d for h, d in guest.recv() if h[6] == VIRTIO_VSOCK_OP_RW)
    assert len(more) == 10000


def test_guest_overrunning_our_credit_is_reset(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    client, host_port = establish(vsock, guest)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = b"y" * 65536
    for _ in range(CONN_BUF_ALLOC // len(chunk) + 8):
        guest.send(1024, host_port, VIRTIO_VSOCK_OP_RW, chunk)
        if vsock.connection_count == 0:
            break
    assert vsock.connection_count == 0
    assert VIRTIO_VSOCK_OP_RST in [h[6] for h, _ in guest.recv()]


def test_credit_request_and_updates_while_forwarding(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    client, host_port = establish(vsock, guest)
    guest.send(1024, host_port, VIRTIO_VSOCK_OP_CREDIT_REQUEST)
    [(hdr, _)] = guest.recv()
    assert hdr[6] == VIRTIO_VSOCK_OP_CREDIT_UPDATE and hdr[8] == CONN_BUF_ALLOC and hdr[9] == 0
    for _ in range(2):
        guest.send(1024, host_port, VIRTIO_VSOCK_OP_RW, b"z" * 40000)
    updates = [h for h, _ in guest.recv() if h[6] == VIRTIO_VSOCK_OP_CREDIT_UPDATE]
    assert updates and updates[-1][9] == 80000
    assert len(client.recv(100000)) > 0


def test_many_connections_at_once(vsock: VirtioVsock) -> None:
    guest = Guest(vsock, rx_buffers=100)
    clients = [host_connect(vsock, f"CONNECT {2000 + i}\n".encode()) for i in range(40)]
    pump(vsock)
    requests = guest.recv()
    assert sorted(h[3] for h, _ in requests) == list(range(2000, 2040))
    for hdr, _ in requests:
        guest.send(hdr[3], hdr[2], VIRTIO_VSOCK_OP_RESPONSE)
    pump(vsock)
    ports = {}
    for i, c in enumerate(clients):
        line = c.recv(64)
        assert line.startswith(b"OK ")
        ports[2000 + i] = int(line.split()[1])
        c.sendall(f"from {i}".encode())
    pump(vsock)
    got = {h[3]: d for h, d in guest.recv() if h[6] == VIRTIO_VSOCK_OP_RW}
    assert got == {2000 + i: f"from {i}".encode() for i in range(40)}
    for port, host_port in ports.items():
        guest.send(port, host_port, VIRTIO_VSOCK_OP_RW, f"to {port}".encode())
    pump(vsock)
    for i, c in enumerate(clients):
        assert c.recv(64) == f"to {2000 + i}".encode()
    assert vsock.connection_count == 40


def test_bulk_transfer_with_flow_control(vsock: VirtioVsock) -> None:
    """4 MiB each way through 4 KiB guest buffers; checksums match."""
    guest = Guest(vsock, rx_buffers=64)
    client, host_port = establish(vsock, guest)
    client.setblocking(False)
    payload = os.urandom(4 << 20)
    sent = 0
    received = bytearray()
    guest_fwd = 0
    to_host = bytearray()
    guest_sent = 0
    while len(received) < len(payload) or len(to_host) < len(payload):
        if sent < len(payload):
            with contextlib.suppress(BlockingIOError):
                sent += client.send(payload[sent : sent + 65536])
        if guest_sent < len(payload) and guest_sent - len(to_host) < CONN_BUF_ALLOC - 65536:
            guest.send(
                1024,
                host_port,
                VIRTIO_VSOCK_OP_RW,
                payload[guest_sent : guest_sent + 65536],
                fwd_cnt=guest_fwd,
            )
            guest_sent += 65536
        pump(vsock, timeout=0.001, rounds=20)
        for hdr, data in guest.recv():
            if hdr[6] == VIRTIO_VSOCK_OP_RW:
                received += data
                guest_fwd += len(data)
            elif hdr[6] == VIRTIO_VSOCK_OP_CREDIT_REQUEST:
                guest.send(1024, host_port, VIRTIO_VSOCK_OP_CREDIT_UPDATE, fwd_cnt=guest_fwd)
        # keep the guest's credit view fresh like Linux does
        guest.send(1024, host_port, VIRTIO_VSOCK_OP_CREDIT_UPDATE, fwd_cnt=guest_fwd)
        try:
            while chunk := client.recv(1 << 20):
                to_host += chunk
        except BlockingIOError:
            pass
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert hashlib.sha256(to_host).digest() == hashlib.sha256(payload).digest()


def test_in_process_connector(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    stream = vsock.connect_local(219)
    stream.settimeout(5)
    pump(vsock)
    [(hdr, _)] = guest.recv()
    assert hdr[6] == VIRTIO_VSOCK_OP_REQUEST and hdr[3] == 219
    guest.send(219, hdr[2], VIRTIO_VSOCK_OP_RESPONSE)
    pump(vsock)
    assert stream.recv(64) == f"OK {hdr[2]}\n".encode()
    stream.sendall(b"d")
    pump(vsock)
    assert [d for _, d in guest.recv()] == [b"d"]


def test_in_process_connector_from_another_thread_and_refusal(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    result: list[socket.socket] = []
    t = threading.Thread(target=lambda: result.append(vsock.connect_local(1024)))
    t.start()
    t.join()
    pump(vsock)
    [(hdr, _)] = guest.recv()
    guest.send(1024, hdr[2], VIRTIO_VSOCK_OP_RST)
    result[0].settimeout(5)
    assert result[0].recv(64) == b""  # refused: EOF without OK


def test_connections_before_activation_are_served_after(tmp_path: Path) -> None:
    dev = VirtioVsock(tmp_path / "v.sock")
    try:
        client = host_connect(dev, b"CONNECT 1024\n")
        pump(dev)
        guest = Guest(dev)
        [(hdr, _)] = guest.recv()
        assert hdr[6] == VIRTIO_VSOCK_OP_REQUEST
        dev.reset()
        assert dev.connection_count == 0
        assert closed(client)
    finally:
        dev.close()


def test_reset_closes_every_connection(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    client, _ = establish(vsock, guest)
    vsock.reset()
    assert client.recv(64) == b""


_hdr_fields = st.tuples(
    st.sampled_from([3, 3, 3, 2, 0, 2**64 - 1]),
    st.sampled_from([2, 2, 3]),
    st.sampled_from([1024, 7777, 0, 2**32 - 1]),
    st.sampled_from([1024, 5000, 2**30, 0]),
    st.integers(0, 70000) | st.just(0),
    st.sampled_from([1, 1, 2, 0]),
    st.integers(0, 9),
    st.integers(0, 3),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(packets=st.lists(st.tuples(_hdr_fields, st.binary(max_size=300), st.booleans()), max_size=15))
def test_random_tx_packets_never_break_the_device(tmp_path: Path, packets: list) -> None:  # type: ignore[type-arg]
    dev = VirtioVsock(tmp_path / f"f{len(os.listdir(tmp_path))}.sock")
    try:
        guest = Guest(dev, rx_buffers=8)
        for fields, payload, split in packets:
            hdr = VSOCK_HDR.pack(*fields)
            chain = [(hdr[:20], False), (hdr[20:] + payload, False)] if split else [(hdr + payload, False)]
            guest.tx.add_chain(chain)
            dev.notify(1)
            guest.tx.get_used()
            guest.recv()
        pump(dev, timeout=0.001)
        assert not dev.broken and guest.irq.needs_reset == []
    finally:
        dev.close()


def test_shutdown_without_guest_rst_is_forced_after_timeout(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    client, _ = establish(vsock, guest)
    client.close()
    pump(vsock)
    assert [h[6] for h, _ in guest.recv()] == [VIRTIO_VSOCK_OP_SHUTDOWN]
    vsock.tick()
    assert vsock.connection_count == 1
    vsock.tick(time.monotonic() + 10)
    assert vsock.connection_count == 0
    assert [h[6] for h, _ in guest.recv()] == [VIRTIO_VSOCK_OP_RST]


def test_client_hanging_up_while_connecting_is_dropped(tmp_path: Path) -> None:
    dev = VirtioVsock(tmp_path / "v.sock")
    try:
        client = host_connect(dev, b"CONNECT 1024\n")
        pump(dev)
        assert dev.connection_count == 1
        client.close()
        pump(dev)
        assert dev.connection_count == 0
    finally:
        dev.close()


def _passfd(dev: VirtioVsock, fd: int, text: bytes) -> socket.socket:
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.connect(dev.uds_path)
    control.settimeout(5)
    control.sendall(b"passfd\n")
    socket.send_fds(control, [text], [fd])
    return control


def _passfd_accepted(dev: VirtioVsock, guest: Guest, fd: int) -> tuple[socket.socket, tuple[int, ...]]:
    """passfd ``fd`` to guest port 1027 (closed here: the VMM holds its own copy), the guest accepts;
    returns the control socket (`OK` read) and the REQUEST's header."""
    control = _passfd(dev, fd, b"1027")
    os.close(fd)
    pump(dev)
    [(hdr, _)] = guest.recv()
    guest.send(1027, hdr[2], VIRTIO_VSOCK_OP_RESPONSE)
    pump(dev)
    assert control.recv(64).startswith(b"OK ")
    return control, hdr


def test_passfd_bridges_a_pipe_to_a_guest_port(vsock: VirtioVsock) -> None:
    """Dragonball passfd: stdout bytes from the guest go straight into the passed pipe."""
    guest = Guest(vsock)
    r, w = os.pipe()
    control = _passfd(vsock, w, b"1027")
    os.close(w)  # the VMM holds its own copy now
    pump(vsock)
    [(hdr, _)] = guest.recv()
    assert hdr[6] == VIRTIO_VSOCK_OP_REQUEST and hdr[3] == 1027
    guest.send(1027, hdr[2], VIRTIO_VSOCK_OP_RESPONSE)
    pump(vsock)
    assert control.recv(64) == f"OK {hdr[2]}\n".encode()
    assert control.recv(64) == b""  # the control socket is done after OK
    guest.send(1027, hdr[2], VIRTIO_VSOCK_OP_RW, b"container stdout")
    pump(vsock)
    assert os.read(r, 64) == b"container stdout"
    os.close(r)


def test_passfd_keep_survives_a_closed_reader(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    for keep, alive in ((b" keep", True), (b"", False)):
        r, w = os.pipe()
        control = _passfd(vsock, w, b"1027" + keep)  # kept open until OK arrives
        os.close(w)
        pump(vsock)
        [(hdr, _)] = guest.recv()
        guest.send(1027, hdr[2], VIRTIO_VSOCK_OP_RESPONSE)
        pump(vsock)
        assert control.recv(64).startswith(b"OK ")
        os.close(r)  # the reader goes away (e.g. the shim restarted)
        guest.send(1027, hdr[2], VIRTIO_VSOCK_OP_RW, b"lost")
        ops = [h[6] for h, _ in guest.recv()]
        assert (VIRTIO_VSOCK_OP_RST not in ops) is alive
        assert ((hdr[2], 1027) in vsock._conns) is alive


def _assert_stream_then_eof(guest: Guest, data: bytes) -> None:
    """The guest got ``data`` in its first packet, then the SHUTDOWN that ends the stream."""
    packets = guest.recv()
    assert packets[0][1] == data
    assert packets[-1][0][6] == VIRTIO_VSOCK_OP_SHUTDOWN


def test_passfd_stdin_pipe_feeds_the_guest(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    r, w = os.pipe()
    _control, _hdr = _passfd_accepted(vsock, guest, r)
    os.write(w, b"stdin data")
    os.close(w)
    pump(vsock)
    _assert_stream_then_eof(guest, b"stdin data")


def test_passfd_stdin_written_and_closed_before_the_guest_answers_still_arrives(vsock: VirtioVsock) -> None:
    """`ctr run` with piped stdin: containerd writes and closes the stdin fifo before the agent accepts."""
    guest = Guest(vsock)
    r, w = os.pipe()
    control = _passfd(vsock, r, b"1027")
    os.close(r)
    os.write(w, b"piped in\n")
    os.close(w)  # the writer is gone: the fd polls POLLIN|POLLHUP while the REQUEST is in flight
    pump(vsock)
    [(hdr, _)] = guest.recv()
    assert hdr[6] == VIRTIO_VSOCK_OP_REQUEST
    pump(vsock)
    assert vsock.connection_count == 1 and guest.recv() == []  # no RST: still waiting for the guest
    guest.send(1027, hdr[2], VIRTIO_VSOCK_OP_RESPONSE)
    pump(vsock)
    assert control.recv(64).startswith(b"OK ")
    _assert_stream_then_eof(guest, b"piped in\n")


def test_passfd_full_shutdown_flushes_pending_output_before_closing(vsock: VirtioVsock) -> None:
    """The agent closes a stdout stream while the fifo is full: every byte still arrives, then EOF."""
    guest = Guest(vsock)
    r, w = os.pipe()
    _control, hdr = _passfd_accepted(vsock, guest, w)
    payload = os.urandom(200_000)  # more than a pipe holds (64 KiB)
    for off in range(0, len(payload), 4096):
        guest.send(1027, hdr[2], VIRTIO_VSOCK_OP_RW, payload[off : off + 4096])
    guest.send(
        1027, hdr[2], VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND
    )
    got = b""
    os.set_blocking(r, False)
    for _ in range(2000):
        pump(vsock, timeout=0.001, rounds=5)
        try:
            chunk = os.read(r, 1 << 16)
        except BlockingIOError:
            continue
        if not chunk:
            break
        got += chunk
    os.close(r)
    assert got == payload
    assert VIRTIO_VSOCK_OP_RST in [h[6] for h, _ in guest.recv()]


@pytest.mark.parametrize("text", [b"notaport", b""])
def test_passfd_without_port_or_fd_is_closed(vsock: VirtioVsock, text: bytes) -> None:
    guest = Guest(vsock)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.connect(vsock.uds_path)
    control.settimeout(5)
    control.sendall(b"passfd\n" + (text or b"1027"))  # bad text, or no fd attached
    pump(vsock)
    assert closed(control)
    assert guest.recv() == [] and vsock.connection_count == 0


def test_unanswered_request_times_out(vsock: VirtioVsock) -> None:
    guest = Guest(vsock)
    client = host_connect(vsock, b"CONNECT 1024\n")
    pump(vsock)
    [(hdr, _)] = guest.recv()
    assert hdr[6] == VIRTIO_VSOCK_OP_REQUEST
    vsock.tick()
    assert vsock.connection_count == 1
    vsock.tick(time.monotonic() + 10)
    assert vsock.connection_count == 0 and closed(client)


_lines = st.one_of(
    st.binary(max_size=80),
    st.builds(
        lambda word, port, tail: word + b" " + port + tail,
        st.sampled_from([b"CONNECT", b"connect", b"Connect", b"passfd", b"OK", b""]),
        st.sampled_from([b"1024", b"0", b"4294967295", b"4294967296", b"-1", b"x", b""]),
        st.sampled_from([b"\n", b"\r\n", b"", b" extra\n", b"\nDATA"]),
    ),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=_lines)
def test_random_handshakes_connect_or_close(tmp_path: Path, line: bytes) -> None:
    dev = VirtioVsock(tmp_path / f"h{len(os.listdir(tmp_path))}.sock")
    try:
        guest = Guest(dev, rx_buffers=4)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(dev.uds_path)
        client.settimeout(2)
        client.sendall(line)
        client.shutdown(socket.SHUT_WR)  # no more bytes: a partial line must not leave us waiting forever
        pump(dev, timeout=0.01)
        requests = [h for h, _ in guest.recv() if h[6] == VIRTIO_VSOCK_OP_REQUEST]
        first = line.split(b"\n", 1)[0].split()
        valid = (
            b"\n" in line
            and len(first) == 2
            and first[0].lower() == b"connect"
            and first[1].isdigit()
            and int(first[1]) <= 0xFFFFFFFF
        )
        if valid:
            assert [h[3] for h in requests] == [int(first[1])]
        else:
            assert requests == [] and closed(client)
        assert not dev.broken
        client.close()
    finally:
        dev.close()


def test_partial_handshake_line_neither_spins_nor_lingers(vsock: VirtioVsock) -> None:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(vsock.uds_path)
    client.settimeout(2)
    client.sendall(b"CONN")
    pump(vsock)
    poller = select.poll()
    for fd, ev in vsock.watched().items():
        poller.register(fd, ev)
    assert poller.poll(0) == []  # the partial line was consumed: no busy loop on a slow client
    client.sendall(b"ECT 5\n")
    pump(vsock)
    assert vsock.connection_count == 1
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(vsock.uds_path)
    slow.sendall(b"CONNECT 7")
    slow.shutdown(socket.SHUT_WR)
    pump(vsock)
    assert closed(slow)
