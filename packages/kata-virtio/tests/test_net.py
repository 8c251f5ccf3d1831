"""virtio-net: frames between the fake queue and a packet fd; a real tap in a network namespace."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest

from kata_virtio import DeviceError, VirtioNet
from kata_virtio._net import VIRTIO_NET_F_MAC, VIRTIO_NET_HDR_SIZE
from kata_virtio._spec import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1
from kata_virtio.testing import DriverQueue, FakeDeviceInterrupt, FakeGuestMemory, activate

HDR = bytes(VIRTIO_NET_HDR_SIZE)
MAC = "02:00:00:00:00:01"


@pytest.fixture
def pair() -> Iterator[tuple[VirtioNet, socket.socket]]:
    dev_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    dev = VirtioNet(os.dup(dev_end.fileno()), MAC)
    dev_end.close()
    yield dev, host_end
    dev.close()
    host_end.close()


def start(dev: VirtioNet, rx_buffers: int = 4) -> tuple[DriverQueue, DriverQueue, FakeDeviceInterrupt]:
    (rx, tx), irq = activate(dev, FakeGuestMemory(4 << 20), [64, 64])
    for _ in range(rx_buffers):
        rx.add_chain([(1526, True)])
    dev.notify(0)
    return rx, tx, irq


def serve(dev: VirtioNet) -> None:
    for fd, ev in dev.watched().items():
        if select.select([fd], [], [], 0.5)[0]:
            dev.handle_event(fd, ev)


def test_config_holds_mac_and_link_up(pair: tuple[VirtioNet, socket.socket]) -> None:
    dev, _ = pair
    mac, status, pairs, mtu = struct.unpack("<6sHHH", dev.read_config(0, 12))
    assert mac == bytes.fromhex("020000000001") and status == 1 and pairs == 1 and mtu == 1500
    assert dev.avail_features >> VIRTIO_NET_F_MAC & 1
    with pytest.raises(DeviceError):
        VirtioNet(os.dup(0), "zz:00")


def test_tx_frames_reach_the_backend(pair: tuple[VirtioNet, socket.socket]) -> None:
    dev, host = pair
    _, tx, irq = start(dev)
    head = tx.add_chain([(HDR, False), (b"\xff" * 14 + b"payload", False)])
    dev.notify(1)
    assert tx.get_used() == [(head, 0)]
    assert host.recv(2048) == HDR + b"\xff" * 14 + b"payload"
    assert 1 in irq.used


def test_rx_frames_fill_guest_buffers_with_num_buffers_1(pair: tuple[VirtioNet, socket.socket]) -> None:
    dev, host = pair
    rx, _, _ = start(dev, rx_buffers=1)
    host.send(HDR + b"frame-1" * 3)
    host.send(HDR + b"frame-2" * 3)
    serve(dev)
    [(head, n)] = rx.get_used()
    data = rx.written(head, n)
    assert data[10:12] == b"\1\0" and data[12:] == b"frame-1" * 3
    assert dev.watched() == {}  # starved: no interest until the guest posts buffers
    rx.add_chain([(1526, True)])
    dev.notify(0)
    [(head, n)] = rx.get_used()
    assert rx.written(head, n)[12:] == b"frame-2" * 3


def test_starved_rx_asks_for_a_kick_on_the_next_buffer_with_event_idx(
    pair: tuple[VirtioNet, socket.socket],
) -> None:
    # With VIRTIO_F_EVENT_IDX the driver kicks only when its avail idx passes the device's avail_event
    # (vring_need_event, virtio 1.2 §2.7.10). A device that stops polling its tap when the receive ring is
    # empty must publish avail_event first, or the guest's refill never kicks it: host->guest TCP stalled
    # for good in the lab's network bench once the ring filled.
    dev, host = pair
    features = dev.avail_features | 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX
    (rx, _), _ = activate(dev, FakeGuestMemory(4 << 20), [64, 64], features=features)
    for _ in range(2):
        rx.add_chain([(1526, True)])
    dev.notify(0)
    for n in range(3):
        host.send(HDR + b"frame-%d" % n)
    serve(dev)
    assert len(rx.get_used()) == 2 and dev.watched() == {}  # starved, holding frame-2
    old = 2
    rx.add_chain([(1526, True)])
    new = 3
    event = rx.avail_event()
    assert (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF, f"avail_event {event}: the refill never kicks"
    dev.notify(0)
    [(head, n)] = rx.get_used()
    assert rx.written(head, n)[12:] == b"frame-2"


def test_rx_buffer_added_while_the_device_starves_is_used_without_a_kick(
    pair: tuple[VirtioNet, socket.socket],
) -> None:
    # the driver may add a buffer before it sees the new avail_event (so it does not kick): the device
    # checks the ring once more after publishing avail_event (§2.7.10) instead of waiting for that kick
    dev, host = pair
    features = dev.avail_features | 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX
    (rx, _), _ = activate(dev, FakeGuestMemory(4 << 20), [64, 64], features=features)
    rx.add_chain([(1526, True)])
    dev.notify(0)
    host.send(HDR + b"first")
    host.send(HDR + b"second")
    mem, q = dev.memory, dev.queues[0]
    assert mem is not None
    real_enable = q.enable_notification
    refilled: list[bool] = []

    def enable_then_driver_adds(memory: object) -> bool:
        if not refilled:  # the driver refills "concurrently", once
            refilled.append(True)
            rx.add_chain([(1526, True)])
        return real_enable(mem)

    q.enable_notification = enable_then_driver_adds  # type: ignore[method-assign]
    serve(dev)
    payloads = [rx.written(h, n)[12:] for h, n in rx.get_used()]
    assert b"second" in payloads, payloads


def test_oversized_frame_is_dropped(pair: tuple[VirtioNet, socket.socket]) -> None:
    dev, host = pair
    rx, _, _ = start(dev, rx_buffers=2)
    host.send(HDR + b"x" * 3000)
    host.send(HDR + b"small")
    serve(dev)
    used = rx.get_used()
    assert used[0][1] == 0 and rx.written(used[1][0], used[1][1])[12:] == b"small"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.mark.root
def test_real_tap_in_netns_answers_arp() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    ns, tap = f"kv-net-{os.getpid()}", f"kvtap{os.getpid() % 100000}"
    dev = VirtioNet.with_tap(tap, MAC)
    try:
        _ip("netns", "add", ns)
        _ip("link", "set", tap, "netns", ns)
        _ip("-n", ns, "addr", "add", "10.251.0.1/24", "dev", tap)
        _ip("-n", ns, "link", "set", tap, "up")
        rx, tx, _ = start(dev, rx_buffers=16)
        mac = bytes.fromhex(MAC.replace(":", ""))
        arp = (
            b"\xff" * 6 + mac + b"\x08\x06"
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
            + mac + socket.inet_aton("10.251.0.2") + bytes(6) + socket.inet_aton("10.251.0.1")
        )  # fmt: skip
        tx.add_chain([(HDR + arp, False)])
        dev.notify(1)
        reply = None
        for _ in range(20):
            serve(dev)
            for head, n in rx.get_used():
                frame = rx.written(head, n)[VIRTIO_NET_HDR_SIZE:]
                if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02":
                    reply = frame
            if reply:
                break
        assert reply is not None, "no ARP reply from the namespace"
        assert reply[:6] == mac and reply[28:32] == socket.inet_aton("10.251.0.1")
    finally:
        dev.close()
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
