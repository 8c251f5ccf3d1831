"""virtio-vsock with a hybrid (AF_UNIX) host side, split as Firecracker's ``devices/virtio/vsock``.

- `packet`: the virtio_vsock_hdr codec and the spec constants (virtio 1.2 §5.10.6);
- `connection`: one stream's state, credit and host fd;
- `muxer`: `VsockMuxer`, the host side (AF_UNIX listener, CONNECT and passfd handshakes, guest-initiated
  connections, the per-connection state machine and credit); it never touches guest memory;
- `device`: `VirtioVsock`, the virtio device (queues, config space, the event-loop interface).
"""

from kata_virtio.vsock.device import DEFAULT_GUEST_CID, EVQ, QUEUE_SIZE, RXQ, TXQ, VirtioVsock
from kata_virtio.vsock.muxer import (
    CLOSE_TIMEOUT,
    CONN_BUF_ALLOC,
    CONNECT_TIMEOUT,
    CREDIT_UPDATE_THRESHOLD,
    MAX_CONNECTIONS,
    MAX_PENDING_CONTROL,
    REQUEST_TIMEOUT,
    VsockMuxer,
)
from kata_virtio.vsock.packet import (
    MAX_PKT_PAYLOAD,
    VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_OP_RW,
    VIRTIO_VSOCK_OP_SHUTDOWN,
    VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND,
    VIRTIO_VSOCK_TYPE_STREAM,
    VSOCK_HDR,
    VSOCK_HOST_CID,
    VsockHeader,
    VsockPacketError,
    host_packet,
    read_packet,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "CONNECT_TIMEOUT",
    "CONN_BUF_ALLOC",
    "CREDIT_UPDATE_THRESHOLD",
    "DEFAULT_GUEST_CID",
    "EVQ",
    "MAX_CONNECTIONS",
    "MAX_PENDING_CONTROL",
    "MAX_PKT_PAYLOAD",
    "QUEUE_SIZE",
    "REQUEST_TIMEOUT",
    "RXQ",
    "TXQ",
    "VIRTIO_VSOCK_OP_CREDIT_REQUEST",
    "VIRTIO_VSOCK_OP_CREDIT_UPDATE",
    "VIRTIO_VSOCK_OP_REQUEST",
    "VIRTIO_VSOCK_OP_RESPONSE",
    "VIRTIO_VSOCK_OP_RST",
    "VIRTIO_VSOCK_OP_RW",
    "VIRTIO_VSOCK_OP_SHUTDOWN",
    "VIRTIO_VSOCK_SHUTDOWN_RCV",
    "VIRTIO_VSOCK_SHUTDOWN_SEND",
    "VIRTIO_VSOCK_TYPE_STREAM",
    "VSOCK_HDR",
    "VSOCK_HOST_CID",
    "VirtioVsock",
    "VsockHeader",
    "VsockMuxer",
    "VsockPacketError",
    "host_packet",
    "read_packet",
]
