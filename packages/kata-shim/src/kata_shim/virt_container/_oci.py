"""The OCI spec as the guest needs it: host-only parts dropped, paths rewritten, then as protobuf.

oci.proto (package grpc) names fields as Go does (``UIDMappings``, ``CgroupsPath``); config.json uses
the runtime-spec JSON tags; `kata_proto.agent.oci_json_tag` maps one to the other.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from kata_proto.agent import oci_json_tag, oci_pb2
from kata_shim.runtime._base import InvalidArgument

#: Namespaces whose host paths mean nothing in the guest (the VM is the network namespace).
_HOST_NAMESPACE_TYPES = {"network"}


@functools.cache
def _fields(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    return {oci_json_tag(f.name): f for f in descriptor.fields}


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def json_to_message(data: dict[str, Any], msg: Message, where: str = "") -> Message:
    """Fill `msg` (any oci.proto message) from its runtime-spec JSON; unknown keys are ignored.

    `InvalidArgument` names the JSON path of a value of the wrong type or range."""
    fields = _fields(msg.DESCRIPTOR)
    for key, value in data.items():
        field = fields.get(key)
        if field is None or value is None:
            continue
        path = f"{where}.{key}" if where else key
        try:
            if _is_map(field):
                getattr(msg, field.name).update({str(k): str(v) for k, v in value.items()})
            elif field.is_repeated:
                target = getattr(msg, field.name)
                for i, item in enumerate(value):
                    if field.message_type is not None:
                        json_to_message(item, target.add(), f"{path}[{i}]")
                    else:
                        target.append(item)
            elif field.message_type is not None:
                json_to_message(value, getattr(msg, field.name), path)
            else:
                setattr(msg, field.name, value)
        except InvalidArgument:
            raise
        except (TypeError, ValueError, AttributeError) as err:
            raise InvalidArgument(f"OCI spec {path}: {err}") from err
    return msg


def spec_to_pb(spec: dict[str, Any]) -> oci_pb2.Spec:
    """A config.json (already rewritten for the guest) as oci.proto's Spec."""
    return json_to_message(spec, oci_pb2.Spec())  # type: ignore[return-value]


def process_to_pb(process: dict[str, Any]) -> oci_pb2.Process:
    """An OCI process object (Task.Exec's spec) as oci.proto's Process."""
    if not process.get("args"):
        raise InvalidArgument("OCI process has no args")
    return json_to_message(process, oci_pb2.Process(), "process")  # type: ignore[return-value]


def resources_to_pb(resources: dict[str, Any]) -> oci_pb2.LinuxResources:
    """OCI LinuxResources JSON (Task.Update) as oci.proto's LinuxResources."""
    return json_to_message(resources, oci_pb2.LinuxResources(), "resources")  # type: ignore[return-value]


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
