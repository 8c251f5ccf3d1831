"""The Kata agent API (kata-containers 4.x protos): messages and service descriptors.

``agent_pb2`` holds grpc.AgentService's requests and responses, ``oci_pb2`` the OCI spec
(package ``grpc``), ``types_pb2`` interfaces, routes and ARP neighbours (package ``types``),
``health_pb2`` grpc.Health, ``csi_pb2`` volume statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from kata_proto._gen.kata import agent_pb2, csi_pb2, health_pb2, oci_pb2, types_pb2

__all__ = [
    "AGENT_SERVICE",
    "AGENT_VSOCK_PORT",
    "HEALTH_SERVICE",
    "LOG_CMDLINE_PARAM",
    "LOG_VSOCK_PORT",
    "PASSFD_CMDLINE_PARAM",
    "OciJsonError",
    "agent_pb2",
    "csi_pb2",
    "health_pb2",
    "oci_from_json",
    "oci_json_tag",
    "oci_pb2",
    "types_pb2",
]

#: ``grpc.AgentService``: the agent's main service on vsock port 1024.
AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
#: ``grpc.Health``: Check and Version.
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]

#: The vsock port the agent serves ttrpc on, and the one it streams its JSON log lines on (Kata's defaults).
AGENT_VSOCK_PORT = 1024
LOG_VSOCK_PORT = 1025

#: The guest kernel parameter naming the agent's passfd stdio listener port (Kata's agent config key):
#: the shim's VMM back-end writes it, the agent reads it from /proc/cmdline.
PASSFD_CMDLINE_PARAM = "agent.passfd_listener_port"
#: The kernel parameter the agent takes its log level from (upstream's; the runtime sets it to debug with
#: `[agent.kata] enable_debug`).
LOG_CMDLINE_PARAM = "agent.log"

# oci.proto names fields as Go does (``UIDMappings``); config.json uses the runtime-spec JSON tags. A tag is
# the field name with its first letter lowered, except for these.
_OCI_JSON_TAGS = {
    "Version": "ociVersion",
    "UID": "uid",
    "GID": "gid",
    "UIDMappings": "uidMappings",
    "GIDMappings": "gidMappings",
    "HostID": "hostID",
    "ContainerID": "containerID",
    "OOMScoreAdj": "oomScoreAdj",
    "CPU": "cpu",
    "KernelTCP": "kernelTCP",
    "DisableOOMKiller": "disableOOMKiller",
    "BlockIO": "blockIO",
    "ClassID": "classID",
    "errnoret": "errnoRet",
    "ThrottleReadIOPSDevice": "throttleReadIOPSDevice",
    "ThrottleWriteIOPSDevice": "throttleWriteIOPSDevice",
    "Pagesize": "pageSize",
}


def oci_json_tag(field_name: str) -> str:
    """The runtime-spec (config.json) key of an oci.proto field, e.g. ``UIDMappings`` -> ``uidMappings``."""
    return _OCI_JSON_TAGS.get(field_name) or field_name[:1].lower() + field_name[1:]


M = TypeVar("M", bound=Message)


class OciJsonError(ValueError):
    """A runtime-spec JSON value that does not fit its oci.proto field; the message names its JSON path."""


@functools.cache
def _oci_fields(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    return {oci_json_tag(f.name): f for f in descriptor.fields}


def oci_from_json(data: Mapping[str, Any], msg: M, where: str = "") -> M:
    """Fill `msg` (any oci.proto message: Spec, Process, LinuxResources...) from its runtime-spec JSON and
    return it. Unknown keys and nulls are skipped, as the agent's Go and Rust peers do; a value of the wrong
    type or range raises `OciJsonError` naming its path (``process.user.uid``)."""
    fields = _oci_fields(msg.DESCRIPTOR)
    for key, value in data.items():
        field = fields.get(key)
        if field is None or value is None:
            continue
        path = f"{where}.{key}" if where else key
        try:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                getattr(msg, field.name).update({str(k): str(v) for k, v in value.items()})
            elif field.is_repeated:
                target = getattr(msg, field.name)
                for i, item in enumerate(value):
                    if field.message_type is not None:
                        oci_from_json(item, target.add(), f"{path}[{i}]")
                    else:
                        target.append(item)
            elif field.message_type is not None:
                oci_from_json(value, getattr(msg, field.name), path)
            else:
                setattr(msg, field.name, value)
        except OciJsonError:
            raise
        except (TypeError, ValueError, AttributeError) as err:
            raise OciJsonError(f"OCI spec {path}: {err}") from err
    return msg
