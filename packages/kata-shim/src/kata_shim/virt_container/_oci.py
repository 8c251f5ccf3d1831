"""The OCI spec as the guest needs it: host-only parts dropped, paths rewritten (the agent client turns the
JSON into oci.proto with `kata_proto.agent.oci_from_json`)."""

from __future__ import annotations

import copy
from typing import Any

from kata_shim.runtime._base import InvalidArgument

#: Namespaces whose host paths mean nothing in the guest (the VM is the network namespace).
_HOST_NAMESPACE_TYPES = {"network"}


def guest_spec(
    spec: dict[str, Any], container_id: str, guest_root: str, guest_mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    """The bundle's config.json rewritten for the guest (the input is not changed).

    root.path becomes the guest's view of the shared rootfs; the mounts are the ones prepared for the
    guest; hooks (host programs), namespace paths (host namespaces) and the host cgroupsPath go; the
    guest agent places the container in its own cgroup.
    """
    if not isinstance(spec.get("process"), dict) or not spec["process"].get("args"):
        raise InvalidArgument("OCI spec has no process.args")
    out = copy.deepcopy(spec)
    out.pop("hooks", None)
    out.pop("windows", None)
    out.pop("solaris", None)
    root = dict(out.get("root") or {})
    root["path"] = guest_root
    out["root"] = root
    out["mounts"] = guest_mounts
    linux = out.setdefault("linux", {})
    namespaces = []
    for ns in linux.get("namespaces") or []:
        kind = ns.get("type", "")
        if kind in _HOST_NAMESPACE_TYPES:
            continue
        namespaces.append({"type": kind})
    linux["namespaces"] = namespaces
    linux["cgroupsPath"] = f"/kata_agent/{container_id}"
    return out
