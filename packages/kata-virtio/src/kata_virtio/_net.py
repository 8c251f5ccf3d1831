"""virtio-net (virtio 1.2 §5.1) over a Linux tap device, with checksum and TSO offloads.

The tap carries each frame with the same 12-byte virtio_net_hdr the guest uses (IFF_VNET_HDR), so offloads
pass through unchanged, as vhost-net and Firecracker do: the guest may send 64 KiB TCP segments with a partial
checksum (HOST_TSO4/6, CSUM; the host kernel validates the header and segments where it must), and the tap
hands the guest 64 KiB segments (GUEST_TSO4/6, GUEST_CSUM) once the driver accepted them (TUNSETOFFLOAD at
activation). One Python round trip then moves up to 64 KiB instead of one MTU. Transmit gathers a frame
straight from guest memory (writev on views of the guest's buffers); receive reads a frame into one host
buffer and scatters it over as many of the guest's mergeable buffers as it needs (MRG_RXBUF).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import struct
from typing import Any

from kata_virtio._device import DeviceError, VirtioDevice
from kata_virtio._memory import GuestAddressError, GuestMemory, VirtioError
from kata_virtio._queue import ChainWriter, DescriptorChain
from kata_virtio._spec import VIRTIO_ID_NET

_log = logging.getLogger("kata_virtio.net")

# virtio 1.2 §5.1.3: feature bits
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_S_LINK_UP = 1
#: What a tap back-end offers on top of MAC and STATUS (each with the feature §5.1.3.1 says it requires).
OFFLOAD_FEATURES = (
    1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN
)
#: Offered to every driver: a received frame may span several small buffers (§5.1.6.3.2), so a Linux
#: guest posts page-sized buffers of one descriptor instead of 17-page chains for 64 KiB frames.
RX_FEATURES = 1 << VIRTIO_NET_F_MRG_RXBUF
#: §5.1.6: struct virtio_net_hdr with VIRTIO_F_VERSION_1 (num_buffers included): 12 bytes.
VIRTIO_NET_HDR_SIZE = 12
NUM_BUFFERS_OFFSET = 10
RXQ, TXQ = 0, 1
QUEUE_SIZE = 256
#: The largest frame either way: a 64 KiB GSO segment (IP's 65,535 bytes, an Ethernet header and a VLAN tag)
#: after the header. A guest chain longer than this is not a frame: it is dropped, never handed to the tap.
MAX_FRAME = VIRTIO_NET_HDR_SIZE + 14 + 4 + 65535
ETH_HLEN = 14

# include/uapi/linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08


def open_tap(name: str) -> int:
    """Open (or create) tap ``name`` with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR and a 12-byte vnet header.

    No offloads until a driver accepts them (`VirtioNet` sets them at activation)."""
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
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except OSError as err:
        os.close(fd)
        raise DeviceError(f"cannot set up tap {name}: {err.strerror}") from err
    return fd


def is_vnet_tap(fd: int) -> bool:
    """Whether ``fd`` is a tap with IFF_VNET_HDR (so it takes TUNSETOFFLOAD and GSO frames)."""
    try:
        ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(40))
    except OSError:
        return False
    flags = struct.unpack_from("H", ifr, IFNAMSIZ)[0]
    return bool(flags & IFF_TAP and flags & IFF_VNET_HDR)


def tap_offloads(acked_features: int) -> int:
    """The TUNSETOFFLOAD flags for what the driver accepted: the tap may hand the guest only what it takes."""
    if not acked_features >> VIRTIO_NET_F_GUEST_CSUM & 1:
        return 0  # the kernel refuses TSO without checksum offload, and so does §5.1.3.1
    flags = TUN_F_CSUM
    if acked_features >> VIRTIO_NET_F_GUEST_TSO4 & 1:
        flags |= TUN_F_TSO4
    if acked_features >> VIRTIO_NET_F_GUEST_TSO6 & 1:
        flags |= TUN_F_TSO6
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) and acked_features >> VIRTIO_NET_F_GUEST_ECN & 1:
        flags |= TUN_F_TSO_ECN
    return flags


def _views(memory: GuestMemory, segments: list[tuple[int, int]]) -> list[memoryview] | None:
    """Zero-copy views of a chain's buffers, or None when one spans two memory regions (copy instead)."""
    try:
        return [memory.view(addr, n) for addr, n in segments if n]
    except GuestAddressError:
        return None


class VirtioNet(VirtioDevice):
    """A network device whose frames go to a tap fd (or any fd that reads and writes one frame per call,
    each prefixed with a 12-byte virtio_net_hdr).

    ``offloads``: offer checksum and TSO offloads (`OFFLOAD_FEATURES`); default: when ``fd`` is a tap with
    IFF_VNET_HDR (another fd, e.g. a socket in tests, cannot take TUNSETOFFLOAD).
    """

    device_type = VIRTIO_ID_NET
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(
        self, fd: int, mac: bytes | str | None = None, *, mtu: int = 1500, offloads: bool | None = None
    ) -> None:
        super().__init__()
        self.fd = fd
        self.mac = _parse_mac(mac) if mac is not None else None
        self.mtu = mtu
        self.offloads = is_vnet_tap(fd) if offloads is None else offloads
        self._rx_starved = False
        self._frame = bytearray(MAX_FRAME)  # the frame being received, header first
        self._held = 0  # length of a frame in `_frame` that found no room in the guest yet
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
        """MAC (when configured), STATUS and, on a vnet tap, the offloads; no control queue (§5.1.3)."""
        features = 1 << VIRTIO_NET_F_STATUS | RX_FEATURES
        if self.mac is not None:
            features |= 1 << VIRTIO_NET_F_MAC
        if self.offloads:
            features |= OFFLOAD_FEATURES
        return features

    def config_bytes(self) -> bytes:
        """struct virtio_net_config: mac, status, max_virtqueue_pairs, mtu (§5.1.4)."""
        return struct.pack("<6sHHH", self.mac or bytes(6), VIRTIO_NET_S_LINK_UP, 1, self.mtu)

    def on_activate(self) -> None:
        """The tap hands us only what the driver accepted; nothing is read until it posts buffers."""
        self._rx_starved = False
        self._set_tap_offloads(tap_offloads(self.acked_features))

    def on_reset(self) -> None:
        """Drop the frame held for the guest; a reset driver takes no offloaded frames until it accepts
        them again."""
        self._held = 0
        self._rx_starved = False
        try:
            self._set_tap_offloads(0)
        except DeviceError as err:
            _log.warning("%s", err)  # the next activation sets them again or fails there

    def _set_tap_offloads(self, flags: int) -> None:
        if not self.offloads or self.fd < 0:
            return
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as err:
            raise DeviceError(f"net: cannot set the tap's offloads {flags:#x}: {err.strerror}") from err

    def save_state(self) -> dict[str, Any]:
        """The MAC the driver read (frames in flight on the tap are not saved)."""
        return {"mac": self.mac.hex(":") if self.mac is not None else None}

    def queue_notify(self, index: int) -> None:
        """TX: write frames to the tap; RX: new buffers, deliver frames waiting on the tap (§5.1.6)."""
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
        """One frame (header first) from the guest to the tap, gathered straight from guest memory."""
        mem = self.memory
        assert mem is not None
        size = chain.readable_len
        if not VIRTIO_NET_HDR_SIZE < size <= MAX_FRAME:
            _log.debug("net: tx chain of %d bytes is not a frame; dropped", size)
            return 0
        views = _views(mem, chain.readable)
        try:
            if views is None:
                os.write(self.fd, chain.reader(mem).read(size))
            else:
                os.writev(self.fd, views)
        except OSError as err:
            # a full tap queue drops, like a wire; so does a header the kernel refuses (a bad GSO request)
            _log.debug("net: tx frame dropped: %s", err)
        finally:
            del views
        return 0

    def _process_rx(self) -> None:
        mem, q = self.memory, self.queues[RXQ]
        assert mem is not None
        used = False
        while True:
            if not self._held:
                try:
                    n = os.readv(self.fd, [self._frame])
                except (BlockingIOError, InterruptedError):
                    break
                if n <= VIRTIO_NET_HDR_SIZE:
                    continue
                self._held = n
            short = self._deliver(mem, self._held)
            if short is not None:
                # No room: we stop polling the tap until the driver posts buffers, so ask for that kick:
                # with VIRTIO_F_EVENT_IDX the driver kicks only once its avail idx passes avail_event,
                # which the rx path otherwise never writes (§2.7.10). Then look once more: a buffer
                # posted before the driver saw the new avail_event comes with no kick.
                if q.enable_notification(mem, held=short):
                    continue
                self._rx_starved = True
                break
            self._held = 0
            used = True  # delivered, or dropped with its buffers returned empty
        if used:
            self.signal_used(RXQ)

    def _deliver(self, mem: GuestMemory, n: int) -> int | None:
        """Put the ``n``-byte frame in `_frame` into receive buffers, or drop it into them when no buffer
        can hold it (without MRG_RXBUF it must fit one, §5.1.6.3.1): None, the frame is gone. When the
        driver has not posted enough buffers yet, nothing is taken: the count of buffers found (too few,
        left in the ring)."""
        q = self.queues[RXQ]
        mergeable = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        chains: list[DescriptorChain] = []
        room = 0
        while room < n:
            chain = q.pop(mem)
            if chain is None:
                for _ in chains:
                    q.undo_pop()
                return len(chains)
            chains.append(chain)
            room += chain.writable_len
            if not mergeable or chains[0].writable_len < VIRTIO_NET_HDR_SIZE or len(chains) >= q.size:
                break
        if room < n or chains[0].writable_len < VIRTIO_NET_HDR_SIZE:
            _log.debug("net: %d-byte frame, %d buffer(s) of %d bytes: dropped", n, len(chains), room)
            for chain in chains:
                q.add_used(mem, chain.head_index, 0)
            return None
        # §5.1.6.4: num_buffers is the count of buffers the frame spans (1 without MRG_RXBUF).
        struct.pack_into("<H", self._frame, NUM_BUFFERS_OFFSET, len(chains))
        frame = memoryview(self._frame)
        off = 0
        for chain in chains:
            take = min(chain.writable_len, n - off)
            if len(chain.writable) == 1:
                mem.write(chain.writable[0][0], frame[off : off + take])
            else:
                ChainWriter(mem, chain.writable).write(frame[off : off + take])
            q.add_used(mem, chain.head_index, take)
            off += take
        del frame
        return None


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
