"""The pod's DNS configuration for CreateSandbox's ``dns`` lines: the resolv.conf containerd or the CRI
plugin bound on the sandbox container's ``/etc/resolv.conf``, read on the host (a trusted, host-owned file).
The agent writes the lines to the guest's /etc/resolv.conf; /etc/hosts and /etc/hostname stay ordinary
shared-file mounts of each container."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from kata_resources._errors import ResourceError

RESOLV_CONF = "/etc/resolv.conf"
#: resolv.conf is a few lines; a source larger than this is not one.
MAX_RESOLV_CONF = 64 << 10


def dns_from_mounts(mounts: Iterable[dict[str, Any]]) -> list[str]:
    """The non-comment, non-blank lines of the file bound on /etc/resolv.conf; [] when there is none.

    Raises `ResourceError` when the bound file cannot be read or is larger than `MAX_RESOLV_CONF`.
    """
    for mount in mounts:
        if mount.get("destination") != RESOLV_CONF or not str(mount.get("source", "")).startswith("/"):
            continue
        source = str(mount["source"])
        try:
            fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                data = os.read(fd, MAX_RESOLV_CONF + 1)
            finally:
                os.close(fd)
        except OSError as err:
            raise ResourceError(f"cannot read {source} (the pod's resolv.conf): {err.strerror}") from err
        if len(data) > MAX_RESOLV_CONF:
            raise ResourceError(f"{source} is larger than {MAX_RESOLV_CONF} bytes: not a resolv.conf")
        lines = (line.strip() for line in data.decode(errors="replace").splitlines())
        return [line for line in lines if line and not line.startswith(("#", ";"))]
    return []
