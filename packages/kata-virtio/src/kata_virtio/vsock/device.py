"""virtio-vsock (virtio 1.2 §5.10): the device, with the hybrid vsock of Firecracker and Dragonball.

The device owns the three virtqueues: it decodes each TX chain into a packet (`packet.read_packet`) for the
muxer and fills RX buffers with the muxer's packets for the guest. The muxer (`muxer.VsockMuxer`) owns every
host fd and speaks the AF_UNIX side (``CONNECT``, ``<uds_path>_<port>``, passfd; see its docstring).

Everything runs on the VMM's event thread: sockets are non-blocking, the device never blocks or
starts a thread; the event loop polls `watched()` and calls `handle_event`.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from typing import Any

from kata_virtio._device import DeviceError, VirtioDevice
from kata_virtio._memory import VirtioError
from kata_virtio._queue import DescriptorChain
from kata_virtio._spec import VIRTIO_ID_VSOCK
from kata_virtio.vsock.connection import Connection
from kata_virtio.vsock.muxer import CONNECT_TIMEOUT, VsockMuxer
from kata_virtio.vsock.packet import VSOCK_HDR, VSOCK_HOST_CID, VsockPacketError, read_packet

_log = logging.getLogger("kata_virtio.vsock")

DEFAULT_GUEST_CID = 3
RXQ, TXQ, EVQ = 0, 1, 2
#: virtio 1.2 §5.10.6.7: struct virtio_vsock_event's id for "the transport was reset".
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0
QUEUE_SIZE = 256


class VirtioVsock(VirtioDevice):
    """A vsock device (guest CID ``guest_cid``) bridged to AF_UNIX sockets at ``uds_path``."""

    device_type = VIRTIO_ID_VSOCK
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(
        self,
        uds_path: str | os.PathLike[str],
        guest_cid: int = DEFAULT_GUEST_CID,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        super().__init__()
        if guest_cid <= VSOCK_HOST_CID or guest_cid >= 0xFFFFFFFF:
            raise DeviceError(f"guest CID {guest_cid} is reserved")
        self.uds_path = os.fspath(uds_path)
        self.guest_cid = guest_cid
        try:
            #: The host side: every host fd, the CONNECT/passfd protocols, per-connection state and credit.
            self.muxer = VsockMuxer(self.uds_path, guest_cid, connect_timeout=connect_timeout)
        except OSError as err:
            raise DeviceError(f"cannot listen on {self.uds_path}: {err.strerror}") from err

    @property
    def connect_timeout(self) -> float:
        """Seconds a host-initiated connection may wait for the guest's RESPONSE (delivered or not)."""
        return self.muxer.connect_timeout

    # -- VirtioDevice ------------------------------------------------------------------------------

    @property
    def avail_features(self) -> int:
        """Stream sockets only; VIRTIO_VSOCK_F_SEQPACKET is not offered (§5.10.3)."""
        return 0

    def config_bytes(self) -> bytes:
        """struct virtio_vsock_config: guest_cid (§5.10.4)."""
        return struct.pack("<Q", self.guest_cid)

    def on_activate(self) -> None:
        """Deliver whatever was queued (REQUESTs from clients that connected before the driver)."""
        self.muxer.rx_space = True
        self._process_rx()

    def save_state(self) -> dict[str, Any]:
        """The guest CID and the host socket path. Connections are not saved: a restored VM has none."""
        return {"guest_cid": self.guest_cid, "uds_path": self.uds_path}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Tell the driver its transport was reset (virtio 1.2 §5.10.6.7), as Firecracker does after a
        restore: the guest drops the connections it had (their host ends are gone), keeps its listening
        sockets and re-reads its CID, so host clients connect again through ``uds_path`` (`CONNECT`)."""
        self.send_transport_reset()

    def send_transport_reset(self) -> bool:
        """Put a TRANSPORT_RESET event in the event queue; False when the driver gave no buffer for it."""
        if not self.active:
            return False
        mem, q = self.memory, self.queues[EVQ]
        assert mem is not None
        chain = q.pop(mem)
        if chain is None:
            _log.warning("vsock: no event buffer for the transport reset")
            return False
        writer = chain.writer(mem)
        writer.write(struct.pack("<I", VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
        q.add_used(mem, chain.head_index, writer.written)
        self.signal_used(EVQ)
        return True

    def queue_notify(self, index: int) -> None:
        """TX: packets from the guest; RX: fresh receive buffers; event queue: nothing to do (§5.10.6)."""
        if index == TXQ:
            self._process_tx()
        elif index == RXQ:
            self.muxer.rx_space = True
        self._process_rx()

    def on_reset(self) -> None:
        """A reset drops every connection (§5.10.6.8: the driver's sockets are gone)."""
        self.muxer.reset()

    def close(self) -> None:
        """Close the listener, every connection and the wake pipe; unlink the socket path."""
        self.muxer.close()

    # -- in-process connector ------------------------------------------------------------------------

    def connect_local(self, port: int) -> socket.socket:
        """Open a stream to guest ``port`` from inside the VMM process (any thread).

        Returns a blocking socket that reads ``OK <host_port>\\n`` once the guest accepted, then
        carries the stream; it reaches EOF without ``OK`` if the guest refused.
        """
        return self.muxer.connect_local(port)

    # -- event loop interface ----------------------------------------------------------------------

    def watched(self) -> dict[int, int]:
        """fd -> poll events the event loop must watch (the muxer's fds)."""
        return self.muxer.watched()

    def handle_event(self, fd: int, events: int) -> None:
        """Serve ``events`` on ``fd`` (one of `watched`); never raises."""
        try:
            self.muxer.handle_event(fd, events)
            if self.active:
                self._process_rx()
        except VirtioError as err:
            self.fail(f"vsock: {err}")
        except Exception as err:  # never let a bug reach the VMM event thread
            _log.exception("vsock event handler failed")
            self.fail(f"vsock: internal error {err!r}")

    def tick(self, now: float | None = None) -> None:
        """Expire connections whose guest never answered our SHUTDOWN or REQUEST; call about once a second."""
        self.muxer.tick(now)
        if self.active:
            try:
                self._process_rx()
            except VirtioError as err:
                self.fail(f"vsock: {err}")

    # -- guest -> host (tx queue) ------------------------------------------------------------------

    def _process_tx(self) -> None:
        self.drain_queue(TXQ, self._receive_tx)

    def _receive_tx(self, chain: DescriptorChain) -> int:
        assert self.memory is not None
        try:
            hdr, payload = read_packet(chain.reader(self.memory))
        except VsockPacketError as err:
            _log.warning("vsock: dropping tx packet: %s", err)
            return 0
        self.muxer.send_pkt(hdr, payload)
        return 0

    # -- host -> guest (rx queue) ------------------------------------------------------------------

    def _process_rx(self) -> None:
        """Fill guest receive buffers with the muxer's packets: control first, then stream data."""
        if not self.active:
            return
        mem, q = self.memory, self.queues[RXQ]
        assert mem is not None
        used = False
        while self.muxer.has_pending_rx():
            chain = q.pop(mem)
            if chain is None:
                # Host sockets are not polled until the guest posts buffers and kicks: ask for that kick
                # (with VIRTIO_F_EVENT_IDX the driver kicks only past avail_event, §2.7.10), then look once
                # more, for a buffer posted before the driver saw the request (it brought no kick).
                if q.enable_notification(mem):
                    continue
                self.muxer.rx_space = False
                break
            if chain.writable_len < VSOCK_HDR.size:
                q.add_used(mem, chain.head_index, 0)
                used = True
                continue
            packet = self.muxer.recv_pkt(chain.writable_len - VSOCK_HDR.size)
            if packet is None:
                q.undo_pop()
                break
            writer = chain.writer(mem)
            writer.write(packet)
            q.add_used(mem, chain.head_index, writer.written)
            used = True
        if used:
            self.signal_used(RXQ)

    # -- introspection -----------------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        """Live guest connections (handshakes not included)."""
        return self.muxer.connection_count

    # The muxer's tables and own fds under their former names, for tests that look inside the device.
    @property
    def _conns(self) -> dict[tuple[int, int], Connection]:
        return self.muxer._conns

    @property
    def _listener(self) -> socket.socket:
        return self.muxer._listener

    @property
    def _wake_r(self) -> int:
        return self.muxer._wake_r
