"""Devices behind the virtio-mmio transport, driven through registers the way Linux's virtio_mmio does."""

from __future__ import annotations

import select
import socket
import struct
from pathlib import Path

from kata_virtio import MmioTransport, VirtioBlock, VirtioVsock
from kata_virtio._mmio import VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_STATUS
from kata_virtio._spec import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from kata_virtio._vsock import VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE, VSOCK_HDR
from kata_virtio.testing import FakeGuestMemory, FakeInterrupt, mmio_bring_up


def test_vsock_over_mmio_connect_handshake(tmp_path: Path) -> None:
    dev = VirtioVsock(tmp_path / "v.sock")
    irq = FakeInterrupt()
    t = MmioTransport(dev, FakeGuestMemory(4 << 20), irq)
    try:
        rx, tx, _ = mmio_bring_up(t, [64, 64, 8])
        assert t.read_u32(VIRTIO_MMIO_STATUS) == 0xF
        assert struct.unpack("<Q", t.read(0x100, 8)) == (3,)  # guest_cid in config space
        for _ in range(8):
            rx.add_chain([(VSOCK_HDR.size + 4096, True)])
        t.notify(0)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(dev.uds_path)
        client.sendall(b"CONNECT 1024\n")
        client.settimeout(5)
        for _ in range(3):  # accept, then read the CONNECT line
            for fd, ev in dev.watched().items():
                if select.select([fd], [], [], 0.1)[0]:
                    dev.handle_event(fd, ev)
        [(head, n)] = rx.get_used()
        hdr = VSOCK_HDR.unpack_from(rx.written(head, n))
        assert hdr[6] == VIRTIO_VSOCK_OP_REQUEST
        assert irq.count == 1 and t.read_u32(VIRTIO_MMIO_INTERRUPT_STATUS) == 1
        t.write_u32(VIRTIO_MMIO_INTERRUPT_ACK, 1)
        tx.add_chain(
            [(VSOCK_HDR.pack(3, 2, 1024, hdr[2], 0, 1, VIRTIO_VSOCK_OP_RESPONSE, 0, 65536, 0), False)]
        )
        t.write_u32(0x050, 1)  # QueueNotify for the tx queue
        assert client.recv(64) == f"OK {hdr[2]}\n".encode()
        client.close()
    finally:
        dev.close()


def test_block_over_mmio_with_event_idx_and_needs_reset(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"\xab" * 4096)
    dev = VirtioBlock(image)
    irq = FakeInterrupt()
    t = MmioTransport(dev, FakeGuestMemory(1 << 20), irq)
    (q,) = mmio_bring_up(t, [16], features=1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX | 1 << 9)
    assert dev.queues[0].event_idx
    q.set_used_event(1)  # interrupt only after the second completion
    for _ in range(2):
        q.add_chain([(struct.pack("<IIQ", 0, 0, 0), False), (512, True), (1, True)])
        t.notify(0)
    assert [n for _, n in q.get_used()] == [513, 513] and irq.count == 1
    assert q.avail_event() == 2  # the device asked to be kicked for the next chain
    q.write_desc(0, q.alloc(16), 16, 1, 0)  # a chain pointing at itself
    q.publish(0)
    t.notify(0)
    assert t.read_u32(VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET
    assert t.read_u32(VIRTIO_MMIO_INTERRUPT_STATUS) & 2
    t.write_u32(VIRTIO_MMIO_STATUS, 0)  # the driver resets; the device is usable again
    (q,) = mmio_bring_up(t, [16])
    head = q.add_chain([(struct.pack("<IIQ", 0, 0, 7), False), (512, True), (1, True)])
    t.notify(0)
    assert q.get_used() == [(head, 513)] and q.written(head)[:512] == b"\xab" * 512
    dev.close()
