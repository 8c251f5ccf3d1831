"""The Kata agent API (kata-containers 4.x protos): messages and service descriptors.

``agent_pb2`` holds grpc.AgentService's requests and responses, ``oci_pb2`` the OCI spec
(package ``grpc``), ``types_pb2`` interfaces, routes and ARP neighbours (package ``types``),
``health_pb2`` grpc.Health, ``csi_pb2`` volume statistics.
"""

from __future__ import annotations

from kata_proto._gen.kata import agent_pb2, csi_pb2, health_pb2, oci_pb2, types_pb2

__all__ = [
    "AGENT_SERVICE",
    "AGENT_VSOCK_PORT",
    "HEALTH_SERVICE",
    "LOG_VSOCK_PORT",
    "PASSFD_CMDLINE_PARAM",
    "agent_pb2",
    "csi_pb2",
    "health_pb2",
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
