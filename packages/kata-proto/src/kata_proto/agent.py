"""The Kata agent API (kata-containers 4.x protos): messages and service descriptors.

``agent_pb2`` holds grpc.AgentService's requests and responses, ``oci_pb2`` the OCI spec
(package ``grpc``), ``types_pb2`` interfaces, routes and ARP neighbours (package ``types``),
``health_pb2`` grpc.Health, ``csi_pb2`` volume statistics.
"""

from __future__ import annotations

from kata_proto._gen.kata import agent_pb2, csi_pb2, health_pb2, oci_pb2, types_pb2

__all__ = ["AGENT_SERVICE", "HEALTH_SERVICE", "agent_pb2", "csi_pb2", "health_pb2", "oci_pb2", "types_pb2"]

#: ``grpc.AgentService``: the agent's main service on vsock port 1024.
AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
#: ``grpc.Health``: Check and Version.
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]
