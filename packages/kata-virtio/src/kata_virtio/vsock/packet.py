"""virtio-vsock packets (virtio 1.2 §5.10.6): the header layout, operations, types and flags."""

from __future__ import annotations

import struct

# virtio 1.2 §5.10.6: struct virtio_vsock_hdr, ops, types and shutdown flags
# src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt
VSOCK_HDR = struct.Struct("<QQIIIHHIII")
VIRTIO_VSOCK_TYPE_STREAM = 1
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7
VIRTIO_VSOCK_SHUTDOWN_RCV = 1
VIRTIO_VSOCK_SHUTDOWN_SEND = 2
VSOCK_HOST_CID = 2
#: The largest payload one packet carries, either way (guest-supplied lengths above it are refused).
MAX_PKT_PAYLOAD = 64 * 1024
