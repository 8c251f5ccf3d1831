"""Where a shim listens: containerd's shim socket naming, and which sandbox a bundle belongs to.

containerd (pkg/shim SocketAddress) names a shim's socket
``unix:///run/containerd/s/<hex sha256 of filepath.Join(containerd address, namespace, id)>``;
for a CRI pod, `id` is the sandbox's, so every container of the pod finds the same shim.
Standard library only, and only its light parts: `start` runs in a fresh interpreter for every
container, and under nested TCG importing pathlib, typing or json costs it tenths of a second each.
"""

from __future__ import annotations

import os
import posixpath
import socket

try:  # the built-in sha256: hashlib would first load OpenSSL's libcrypto for the same digest
    from _sha256 import sha256  # type: ignore[import-not-found]  # no stub: private module
except ImportError:  # pragma: no cover - interpreters without it (3.12 calls it _sha2)
    from hashlib import sha256

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
    digest = sha256(go_join(containerd_address, namespace, id).encode()).hexdigest()
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


def _read_spec(bundle: str | os.PathLike[str]) -> bytes | None:
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            return f.read()
    except OSError:
        return None


def _parse_spec(data: bytes) -> dict[str, object] | None:
    import json  # here: most bundles never need it (see bundle_sandbox_id)

    try:
        spec = json.loads(data.decode())
    except ValueError:  # UnicodeDecodeError too
        return None
    return spec if isinstance(spec, dict) else None


def load_spec(bundle: str | os.PathLike[str]) -> dict[str, object] | None:
    """The bundle's config.json, or None when it is missing or unreadable."""
    data = _read_spec(bundle)
    return None if data is None else _parse_spec(data)


def pod_sandbox_id(spec: dict[str, object] | None) -> str | None:
    """The sandbox id when the spec's annotations say this is a later container of a CRI pod."""
    annotations = (spec or {}).get("annotations") or {}
    if not isinstance(annotations, dict):
        return None
    for type_key, container_value, sandbox_key in _POD_ANNOTATIONS:
        if annotations.get(type_key) == container_value and annotations.get(sandbox_key):
            return str(annotations[sandbox_key])
    return None


def bundle_sandbox_id(bundle: str | os.PathLike[str]) -> str | None:
    """`pod_sandbox_id(load_spec(bundle))`, without parsing the JSON when its bytes cannot hold a CRI
    annotation: both keys start with io.kubernetes.cri, and UTF-8 JSON can spell that otherwise
    only with a \\u escape."""
    data = _read_spec(bundle)
    if data is None:
        return None
    if b"io.kubernetes.cri" not in data and b"\\u" not in data:
        return None
    return pod_sandbox_id(_parse_spec(data))
