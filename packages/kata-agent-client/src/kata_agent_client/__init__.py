"""trio client for the Kata agent API (grpc.AgentService, grpc.Health) over hybrid vsock.

async with open_agent_client("hvsock:/run/vm/kata.hvsock:1024") as agent:
    await agent.create_container("c1", ContainerSpec(root="/run/.../rootfs", process=Process(["sh"])))
    await agent.start_container("c1")
    status = await agent.wait_process("c1")
"""

from kata_agent_client.__about__ import __version__
from kata_agent_client._client import DEFAULT_TIMEOUT, NO_TIMEOUT, AgentClient, open_agent_client
from kata_agent_client._connect import AGENT_PORT, LOG_PORT, AgentAddress, connect
from kata_agent_client._errors import AgentError, AgentTimeout, BadAddress, HandshakeFailed
from kata_agent_client._health import CHECK_INTERVAL, HealthChecker
from kata_agent_client._logs import forward_line, forward_logs
from kata_agent_client._types import (
    AgentVersion,
    ARPNeighbor,
    ContainerSpec,
    ContainerStats,
    Device,
    GuestDetails,
    Interface,
    IPAddress,
    Mount,
    Process,
    Resources,
    Route,
    StdioPorts,
    Storage,
    default_mounts,
)

__all__ = [
    "AGENT_PORT",
    "CHECK_INTERVAL",
    "DEFAULT_TIMEOUT",
    "LOG_PORT",
    "NO_TIMEOUT",
    "ARPNeighbor",
    "AgentAddress",
    "AgentClient",
    "AgentError",
    "AgentTimeout",
    "AgentVersion",
    "BadAddress",
    "ContainerSpec",
    "ContainerStats",
    "Device",
    "GuestDetails",
    "HandshakeFailed",
    "HealthChecker",
    "IPAddress",
    "Interface",
    "Mount",
    "Process",
    "Resources",
    "Route",
    "StdioPorts",
    "Storage",
    "__version__",
    "connect",
    "default_mounts",
    "forward_line",
    "forward_logs",
    "open_agent_client",
]
