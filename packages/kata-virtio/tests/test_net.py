"""virtio-net: frames between the fake queue and a packet fd; a real tap in a network namespace."""

from __future__ import annotations

import array
import fcntl
import os
import select
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest

from kata_virtio import DeviceError, VirtioNet
from kata_virtio._net import (
    MAX_FRAME,
    OFFLOAD_FEATURES,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_SIZE,
    is_vnet_tap,
    tap_offloads,
)
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


def start(
    dev: VirtioNet, rx_buffers: int = 4, *, features: int | None = None
) -> tuple[DriverQueue, DriverQueue, FakeDeviceInterrupt]:
    (rx, tx), irq = activate(dev, FakeGuestMemory(4 << 20), [64, 64], features=features)
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

    def enable_then_driver_adds(memory: object, *, held: int = 0) -> bool:
        if not refilled:  # the driver refills "concurrently", once
            refilled.append(True)
            rx.add_chain([(1526, True)])
        return real_enable(mem, held=held)

    q.enable_notification = enable_then_driver_adds  # type: ignore[method-assign]
    serve(dev)
    payloads = [rx.written(h, n)[12:] for h, n in rx.get_used()]
    assert b"second" in payloads, payloads


def test_frame_bigger_than_a_buffer_is_dropped_without_mergeable_buffers(
    pair: tuple[VirtioNet, socket.socket],
) -> None:
    dev, host = pair
    rx, _, _ = start(dev, rx_buffers=2, features=dev.avail_features & ~(1 << VIRTIO_NET_F_MRG_RXBUF))
    host.send(HDR + b"x" * 3000)
    host.send(HDR + b"small")
    serve(dev)
    used = rx.get_used()
    assert used[0][1] == 0 and rx.written(used[1][0], used[1][1])[12:] == b"small"


def test_frame_spans_mergeable_buffers_with_their_count_in_num_buffers(
    pair: tuple[VirtioNet, socket.socket],
) -> None:
    dev, host = pair
    rx, _, irq = start(dev, rx_buffers=0)
    heads = [rx.add_chain([(1526, True)]) for _ in range(4)]
    dev.notify(0)
    payload = bytes(range(251)) * 16  # 4016 bytes: three 1526-byte buffers
    host.send(HDR + payload)
    host.send(HDR + b"next")
    serve(dev)
    used = rx.get_used()
    assert [h for h, _ in used] == heads and [n for _, n in used] == [1526, 1526, 12 + 4016 - 3052, 16]
    first = rx.written(*used[0])
    assert first[10:12] == struct.pack("<H", 3)
    assert first[12:] + b"".join(rx.written(h, n) for h, n in used[1:3]) == payload
    assert rx.written(*used[3]) == HDR[:10] + b"\1\0" + b"next"
    assert 0 in irq.used


def test_frame_waits_until_the_driver_posts_enough_mergeable_buffers(
    pair: tuple[VirtioNet, socket.socket],
) -> None:
    # With EVENT_IDX the device must ask for a kick on the driver's NEXT buffer, after the one it saw and
    # left in the ring: an avail_event at the left buffer would never be crossed again, and receive would
    # stop for good (vring_need_event, §2.7.10)
    dev, host = pair
    features = dev.avail_features | 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_EVENT_IDX
    rx, _, _ = start(dev, rx_buffers=1, features=features)
    host.send(HDR + b"y" * 2000)
    serve(dev)
    assert rx.get_used() == [] and dev.watched() == {}  # one buffer is not enough: nothing taken, starved
    rx.add_chain([(1526, True)])
    old, new, event = 1, 2, rx.avail_event()
    assert (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF, f"avail_event {event}: the refill never kicks"
    dev.notify(0)
    used = rx.get_used()
    assert [n for _, n in used] == [1526, 2012 - 1526]
    assert rx.written(*used[0])[12:] + rx.written(*used[1]) == b"y" * 2000


def test_hostile_zero_length_buffers_cannot_stall_or_break_receive(
    pair: tuple[VirtioNet, socket.socket],
) -> None:
    dev, host = pair
    rx, _, _ = start(dev, rx_buffers=0)
    empty = rx.add_chain([(0, True)])  # too small for the header: the frame is dropped into it
    rx.add_chain([(64, True)])
    dev.notify(0)
    host.send(HDR + b"first")
    host.send(HDR + b"second")
    serve(dev)
    used = rx.get_used()
    assert used[0] == (empty, 0) and rx.written(*used[1])[12:] == b"second" and not dev.broken


def test_socket_backend_offers_no_offloads_and_a_forced_one_does(
    pair: tuple[VirtioNet, socket.socket],
) -> None:
    dev, host = pair
    assert not is_vnet_tap(dev.fd) and dev.avail_features & OFFLOAD_FEATURES == 0
    forced = VirtioNet(os.dup(host.fileno()), MAC, offloads=True)
    try:
        assert forced.avail_features & OFFLOAD_FEATURES == OFFLOAD_FEATURES
    finally:
        forced.close()


@pytest.mark.parametrize(
    ("acked", "flags"),
    [
        (0, 0),
        (1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4, 0),  # guest sends offloaded, takes none
        (1 << VIRTIO_NET_F_GUEST_TSO4, 0),  # TSO without GUEST_CSUM: the kernel would refuse it
        (1 << VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
        (1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4, TUN_F_CSUM | TUN_F_TSO4),
        (1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_ECN, TUN_F_CSUM),
        (
            1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_GUEST_ECN,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
        ),
    ],
)
def test_tap_takes_only_the_offloads_the_driver_accepted(acked: int, flags: int) -> None:
    assert tap_offloads(acked) == flags


def test_rx_frame_lands_across_buffers_with_num_buffers_in_the_second(
    pair: tuple[VirtioNet, socket.socket],
) -> None:
    # Linux's big-packet receive buffers are a header descriptor and then pages: the frame is scattered
    # straight into them and num_buffers (bytes 10-11) falls in whichever buffer holds them
    dev, host = pair
    rx, _, _ = start(dev, rx_buffers=0)
    head = rx.add_chain([(8, True), (3, True), (4096, True)])
    dev.notify(0)
    payload = bytes(range(256)) * 10
    host.send(HDR + payload)
    serve(dev)
    [(used_head, n)] = rx.get_used()
    data = rx.written(used_head, n)
    assert used_head == head and n == VIRTIO_NET_HDR_SIZE + len(payload)
    assert data[10:12] == b"\1\0" and data[12:] == payload


def test_rx_with_nothing_on_the_backend_keeps_the_buffer_for_the_next_frame(
    pair: tuple[VirtioNet, socket.socket],
) -> None:
    dev, host = pair
    rx, _, _ = start(dev, rx_buffers=1)
    serve(dev)
    assert rx.get_used() == [] and dev.watched() != {}  # still polling, the buffer unused
    host.send(HDR + b"late")
    serve(dev)
    [(head, n)] = rx.get_used()
    assert rx.written(head, n)[12:] == b"late"


def test_tx_gathers_a_frame_from_several_buffers(pair: tuple[VirtioNet, socket.socket]) -> None:
    dev, host = pair
    _, tx, _ = start(dev)
    tx.add_chain([(HDR[:5], False), (HDR[5:] + b"\xaa" * 14, False), (b"tail" * 100, False)])
    dev.notify(1)
    assert host.recv(4096) == HDR + b"\xaa" * 14 + b"tail" * 100


def test_tx_chain_longer_than_a_64k_frame_is_dropped_not_sent(pair: tuple[VirtioNet, socket.socket]) -> None:
    dev, host = pair
    _, tx, _ = start(dev)
    big = tx.add_chain([(HDR, False), (bytes(MAX_FRAME), False)])
    small = tx.add_chain([(HDR + b"\xbb" * 20, False)])
    dev.notify(1)
    assert tx.get_used() == [(big, 0), (small, 0)] and not dev.broken
    assert host.recv(MAX_FRAME * 2) == HDR + b"\xbb" * 20  # the big one never reached the back-end


SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM, ETHTOOL_GTSO = 0x16, 0x1E


def _ethtool_get(ifname: str, cmd: int) -> int:
    """One ETHTOOL_G* value of interface ``ifname`` (struct ethtool_value through SIOCETHTOOL)."""
    value = array.array("I", [cmd, 0])
    address, _ = value.buffer_info()
    ifr = struct.pack("16sP", ifname.encode(), address) + bytes(16)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifr)
    return value[1]


@pytest.mark.root
def test_real_tap_gets_the_accepted_offloads_at_activation_and_none_after_reset() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun")
    tap = f"kvoff{os.getpid() % 100000}"
    dev = VirtioNet.with_tap(tap, MAC)
    try:
        assert is_vnet_tap(dev.fd) and dev.avail_features & OFFLOAD_FEATURES == OFFLOAD_FEATURES
        assert _ethtool_get(tap, ETHTOOL_GTSO) == 0
        guest = 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_TSO6
        activate(dev, FakeGuestMemory(1 << 20), [64, 64], features=guest | 1 << VIRTIO_F_VERSION_1)
        assert _ethtool_get(tap, ETHTOOL_GTSO) == 1 and _ethtool_get(tap, ETHTOOL_GTXCSUM) == 1
        dev.reset()
        assert _ethtool_get(tap, ETHTOOL_GTSO) == 0 and _ethtool_get(tap, ETHTOOL_GTXCSUM) == 0
    finally:
        dev.close()
        subprocess.run(["ip", "link", "del", tap], check=False, capture_output=True)


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
