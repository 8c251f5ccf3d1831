"""Where a shim listens: containerd's shim socket naming, and which sandbox a bundle belongs to.

containerd (pkg/shim SocketAddress) names a shim's socket
``unix:///run/containerd/s/<hex sha256 of filepath.Join(containerd address, namespace, id)>``;
for a CRI pod, `id` is the sandbox's, so every container of the pod finds the same shim.
Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import socket
from pathlib import Path
from typing import Any

SOCKET_ROOT = "/run/containerd/s"
"""containerd's default state dir + "s" (used whatever state dir the daemon is configured with)."""

# (container type annotation, value meaning "a container of an existing pod", sandbox id annotation)
_POD_ANNOTATIONS = (
    ("io.kubernetes.cri.container-type", "container", "io.kubernetes.cri.sandbox-id"),
    ("io.kubernetes.cri-o.ContainerType", "container", "io.kubernetes.cri-o.SandboxID"),
)


def go_join(*elements: str) -> str:
    """Go's filepath.Join on Linux: join the non-empty elements with '/', then filepath.Clean."""
    joined = "/".join(e for e in elements if e)
    if not joined:
        return ""
    cleaned = posixpath.normpath(joined)
    # POSIX keeps a leading '//' (implementation-defined); Go's Clean does not.
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    return cleaned


def socket_address(containerd_address: str, namespace: str, id: str, root: str = SOCKET_ROOT) -> str:
    """The shim socket address containerd's helpers derive for (address, namespace, id)."""
    digest = hashlib.sha256(go_join(containerd_address, namespace, id).encode()).hexdigest()
    return f"unix://{root}/{digest}"


def socket_path(address: str) -> str:
    """The filesystem path of a ``unix://`` address (a bare path is returned as it is)."""
    return address.removeprefix("unix://")


def can_connect(address: str, timeout: float = 0.5) -> bool:
    """Whether something accepts connections on the unix socket `address`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(socket_path(address))
        except OSError:
            return False
    return True


def load_spec(bundle: Path) -> dict[str, Any] | None:
    """The bundle's config.json, or None when it is missing or unreadable."""
    try:
        spec = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def pod_sandbox_id(spec: dict[str, Any] | None) -> str | None:
    """The sandbox id when the spec's annotations say this is a later container of a CRI pod."""
    annotations = (spec or {}).get("annotations") or {}
    if not isinstance(annotations, dict):
        return None
    for type_key, container_value, sandbox_key in _POD_ANNOTATIONS:
        if annotations.get(type_key) == container_value and annotations.get(sandbox_key):
            return str(annotations[sandbox_key])
    return None
