"""The OCI runtime spec: protobuf `grpc.Spec` (oci.proto) to a runtime bundle's config.json."""

from __future__ import annotations

import os
from typing import Any

from google.protobuf.message import Message

from kata_proto import ttrpc
from kata_proto.agent import oci_json_tag

#: Namespaces a container gets of its own in the guest; network stays the sandbox's (the VM's).
_OWN_NAMESPACES = ("pid", "ipc", "uts", "mount")
_KNOWN_NAMESPACES = {"pid", "ipc", "uts", "mount", "network", "user", "cgroup", "time"}
#: The ociVersion config.json carries to the guest's OCI runtime. crun before 1.9 (Debian bookworm's 1.8.1)
#: refuses any version without "1.0" in it ("unknown version specified"), and containerd 2.x writes 1.2.x
#: specs; later 1.x specs only add optional fields, which crun reads all the same.
GUEST_OCI_VERSION = "1.0.2"


def message_to_json(msg: Message) -> dict[str, Any]:
    """Convert any oci.proto message to its runtime-spec JSON shape (set fields only, ints stay ints)."""
    out: dict[str, Any] = {}
    for field, value in msg.ListFields():
        if field.name in ("Solaris", "Windows", "Hooks"):
            continue
        key = oci_json_tag(field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[key] = dict(value)
        elif field.is_repeated:
            out[key] = [message_to_json(v) if isinstance(v, Message) else v for v in value]
        elif isinstance(value, Message):
            out[key] = message_to_json(value)
        else:
            out[key] = value
    return out


def process_to_json(process: Message) -> dict[str, Any]:
    """An OCI `process` object; `cwd` defaults to `/`, user ids to 0 as the spec requires them."""
    out = message_to_json(process)
    if not out.get("args"):
        raise ttrpc.InvalidArgument("OCI process has no args")
    cwd = out.get("cwd") or "/"
    if not cwd.startswith("/"):
        raise ttrpc.InvalidArgument(f"OCI process cwd {cwd!r} is not absolute")
    out["cwd"] = cwd
    user = out.setdefault("user", {})
    user.setdefault("uid", 0)
    user.setdefault("gid", 0)
    return out


def spec_to_config(spec: Message, container_id: str) -> dict[str, Any]:
    """Build config.json from a CreateContainerRequest's OCI spec; InvalidArgument when it is unusable.

    Namespace paths name the host's namespaces and mean nothing in the guest, so they are dropped;
    the container gets its own pid/ipc/uts/mount namespaces and shares the guest's network.
    """
    if not spec.ByteSize():
        raise ttrpc.InvalidArgument("CreateContainer carries no OCI spec")
    config = message_to_json(spec)
    version = config.get("ociVersion") or GUEST_OCI_VERSION
    if version.split(".")[0] != "1":
        raise ttrpc.InvalidArgument(f"OCI spec version {version!r} is not a 1.x runtime spec")
    config["ociVersion"] = GUEST_OCI_VERSION
    config["process"] = process_to_json(spec.Process)  # type: ignore[attr-defined]
    root = config.get("root") or {}
    path = root.get("path", "")
    if not path:
        raise ttrpc.InvalidArgument("OCI spec has no root.path")
    if not os.path.isabs(path):
        raise ttrpc.InvalidArgument(f"OCI root.path {path!r} is not absolute")
    linux = config.setdefault("linux", {})
    namespaces = []
    for ns in linux.get("namespaces", []):
        kind = ns.get("type", "")
        if kind not in _KNOWN_NAMESPACES:
            raise ttrpc.InvalidArgument(f"OCI spec names unknown namespace type {kind!r}")
        if kind in _OWN_NAMESPACES:
            namespaces.append({"type": kind})
    for kind in _OWN_NAMESPACES:
        if not any(ns["type"] == kind for ns in namespaces):
            namespaces.append({"type": kind})
    linux["namespaces"] = namespaces
    if not linux.get("cgroupsPath"):
        linux["cgroupsPath"] = f"/kata_agent/{container_id}"
    for mount in config.get("mounts", []):
        if not str(mount.get("destination", "")).startswith("/"):
            raise ttrpc.InvalidArgument(f"OCI mount destination {mount.get('destination')!r} is not absolute")
    return config
