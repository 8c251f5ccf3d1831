"""The vhost devices an external VMM gets as open fds (<linux/vhost.h>): /dev/vhost-vsock with a guest CID
claimed on it, /dev/vhost-net. The fds are passed to QEMU (``vhostfd=``), which then owns the kernel side."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import struct

from kata_shim.hypervisor._base import HypervisorError

VHOST_VSOCK_DEVICE = "/dev/vhost-vsock"
VHOST_NET_DEVICE = "/dev/vhost-net"
# <linux/vhost.h>: #define VHOST_VSOCK_SET_GUEST_CID _IOW(VHOST_VIRTIO, 0x60, __u64); a u64 fits fcntl.ioctl
VHOST_VSOCK_SET_GUEST_CID = (1 << 30) | (8 << 16) | (0xAF << 8) | 0x60
CID_RETRY_COUNT = 50
FIRST_GUEST_CID = 3
"""vsock(7): 0-2 are reserved (hypervisor, local, host)."""


def open_vhost_vsock() -> tuple[int, int]:
    """Open /dev/vhost-vsock and claim a free guest CID on it (random, retried on EADDRINUSE, as runtime-rs
    does)."""
    try:
        fd = os.open(VHOST_VSOCK_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise HypervisorError(
            f"qemu: cannot open {VHOST_VSOCK_DEVICE}: {err.strerror} (modprobe vhost_vsock)"
        ) from err
    try:
        for _ in range(CID_RETRY_COUNT):
            cid = random.randint(FIRST_GUEST_CID, 0xFFFFFFFE)  # a free number, not a secret
            try:
                fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    continue
                raise HypervisorError(f"qemu: VHOST_VSOCK_SET_GUEST_CID: {err.strerror}") from err
            return cid, fd
        raise HypervisorError(f"qemu: no free vsock CID after {CID_RETRY_COUNT} tries")
    except BaseException:
        os.close(fd)
        raise


def open_vhost_net() -> int:
    """An fd on /dev/vhost-net (for one virtio-net queue pair); OSError when the host has none."""
    return os.open(VHOST_NET_DEVICE, os.O_RDWR | os.O_CLOEXEC)
