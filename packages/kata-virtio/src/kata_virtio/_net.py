"""virtio-net (virtio 1.2 §5.1) over a Linux tap device."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import struct
from typing import Any

from kata_virtio._device import DeviceError, VirtioDevice
from kata_virtio._memory import VirtioError
from kata_virtio._queue import DescriptorChain
from kata_virtio._spec import VIRTIO_ID_NET

_log = logging.getLogger("kata_virtio.net")

# virtio 1.2 §5.1.3: feature bits
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1
#: §5.1.6: struct virtio_net_hdr with VIRTIO_F_VERSION_1 (num_buffers included): 12 bytes.
VIRTIO_NET_HDR_SIZE = 12
RXQ, TXQ = 0, 1
QUEUE_SIZE = 256
#: The largest frame we read from the tap: 64 KiB of payload plus the header.
MAX_FRAME = 65536 + VIRTIO_NET_HDR_SIZE

# include/uapi/linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


def open_tap(name: str) -> int:
    """Open (or create) tap ``name`` with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR and a 12-byte vnet header."""
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise DeviceError(f"bad tap name {name!r}")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise DeviceError(f"cannot open /dev/net/tun: {err.strerror}") from err
    try:
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VIRTIO_NET_HDR_SIZE))
        # No checksum/GSO offloads: the guest is offered none, so the tap must not hand us GSO frames.
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except OSError as err:
        os.close(fd)
        raise DeviceError(f"cannot set up tap {name}: {err.strerror}") from err
    return fd


class VirtioNet(VirtioDevice):
    """A network device whose frames go to a tap fd (or any fd that reads and writes one frame per call,
    each prefixed with a 12-byte virtio_net_hdr)."""

    device_type = VIRTIO_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, fd: int, mac: bytes | str | None = None, *, mtu: int = 1500) -> None:
        super().__init__()
        self.fd = fd
        self.mac = _parse_mac(mac) if mac is not None else None
        self.mtu = mtu
        self._pending: bytes | None = None  # a frame read from the tap that found no rx buffer
        self._rx_starved = False
        os.set_blocking(fd, False)

    @classmethod
    def with_tap(cls, tap: str, mac: bytes | str | None = None) -> VirtioNet:
        """A device on tap ``tap`` (created if absent)."""
        return cls(open_tap(tap), mac)

    def close(self) -> None:
        """Close the back-end fd."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def avail_features(self) -> int:
        """MAC (when configured) and STATUS; no offloads, no control queue (§5.1.3)."""
        features = 1 << VIRTIO_NET_F_STATUS
        if self.mac is not None:
            features |= 1 << VIRTIO_NET_F_MAC
        return features

    def config_bytes(self) -> bytes:
        """struct virtio_net_config: mac, status, max_virtqueue_pairs, mtu (§5.1.4)."""
        return struct.pack("<6sHHH", self.mac or bytes(6), VIRTIO_NET_S_LINK_UP, 1, self.mtu)

    def on_activate(self) -> None:
        """Nothing is read from the tap until the guest posts receive buffers."""
        self._rx_starved = False

    def on_reset(self) -> None:
        """Drop the frame held for the guest."""
        self._pending = None
        self._rx_starved = False

    def save_state(self) -> dict[str, Any]:
        """The MAC the driver read (frames in flight on the tap are not saved)."""
        return {"mac": self.mac.hex(":") if self.mac is not None else None}

    def queue_notify(self, index: int) -> None:
        """TX: write frames to the tap; RX: new buffers, deliver held frames (§5.1.6)."""
        if index == TXQ:
            self._process_tx()
        else:
            self._rx_starved = False
            self._process_rx()

    # -- event loop interface ----------------------------------------------------------------------

    def watched(self) -> dict[int, int]:
        """The tap fd, readable interest only while the guest has room for frames."""
        if not self.active or self._rx_starved or self.fd < 0:
            return {}
        return {self.fd: select.POLLIN}

    def handle_event(self, fd: int, events: int) -> None:
        """The tap is readable: move frames into guest receive buffers; never raises."""
        try:
            if self.active:
                self._process_rx()
        except VirtioError as err:
            self.fail(f"net: {err}")
        except Exception as err:
            _log.exception("net event handler failed")
            self.fail(f"net: internal error {err!r}")

    # -- data path ---------------------------------------------------------------------------------

    def _process_tx(self) -> None:
        self.drain_queue(TXQ, self._transmit)

    def _transmit(self, chain: DescriptorChain) -> int:
        assert self.memory is not None
        frame = chain.reader(self.memory).read(MAX_FRAME)
        if len(frame) > VIRTIO_NET_HDR_SIZE:
            try:
                os.write(self.fd, frame)
            except OSError as err:
                _log.debug("net: tx frame dropped: %s", err)  # a full tap queue drops, like a wire
        return 0

    def _process_rx(self) -> None:
        mem, q = self.memory, self.queues[RXQ]
        assert mem is not None
        used = False
        while True:
            frame = self._pending
            if frame is None:
                try:
                    frame = os.read(self.fd, MAX_FRAME)
                except (BlockingIOError, InterruptedError):
                    break
                if len(frame) <= VIRTIO_NET_HDR_SIZE:
                    continue
            chain = q.pop(mem)
            if chain is None:
                self._pending = frame
                # We stop polling the tap until the driver posts buffers, so ask for that kick: with
                # VIRTIO_F_EVENT_IDX the driver kicks only once its avail idx passes avail_event, which the
                # rx path otherwise never writes (§2.7.10). Then look once more: a buffer posted before
                # the driver saw the new avail_event comes with no kick.
                if q.enable_notification(mem):
                    continue
                self._rx_starved = True
                break
            self._pending = None
            if chain.writable_len < len(frame):
                # Without VIRTIO_NET_F_MRG_RXBUF a frame must fit one buffer (§5.1.6.3.1); drop it.
                _log.debug("net: %d-byte frame does not fit a %d-byte buffer", len(frame), chain.writable_len)
                q.add_used(mem, chain.head_index, 0)
                used = True
                continue
            # §5.1.6.4: num_buffers is 1 when VIRTIO_NET_F_MRG_RXBUF is not negotiated.
            frame = frame[:10] + struct.pack("<H", 1) + frame[VIRTIO_NET_HDR_SIZE:]
            writer = chain.writer(mem)
            writer.write(frame)
            q.add_used(mem, chain.head_index, writer.written)
            used = True
        if used:
            self.signal_used(RXQ)


def _parse_mac(mac: bytes | str) -> bytes:
    if isinstance(mac, str):
        with contextlib.suppress(ValueError):
            raw = bytes(int(part, 16) for part in mac.split(":"))
            if len(raw) == 6:
                return raw
        raise DeviceError(f"bad MAC address {mac!r}")
    if len(mac) != 6:
        raise DeviceError("a MAC address has 6 bytes")
    return bytes(mac)
