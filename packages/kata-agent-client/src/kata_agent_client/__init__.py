"""trio client for the Kata agent API (grpc.AgentService, grpc.Health) over hybrid vsock.

async with open_agent_client("hvsock:/run/vm/kata.hvsock:1024") as agent:
    await agent.create_container("c1", ContainerSpec(root="/run/.../rootfs", process=Process(["sh"])))
    await agent.start_container("c1")
    status = await agent.wait_process("c1")
"""

from kata_agent_client.__about__ import __version__
from kata_agent_client._budget import GUEST_WALL_CAP, guest_timed
from kata_agent_client._client import DEFAULT_TIMEOUT, NO_TIMEOUT, AgentClient, open_agent_client
from kata_agent_client._connect import AGENT_PORT, LOG_PORT, AgentAddress, connect
from kata_agent_client._errors import (
    AgentAlreadyExists,
    AgentCallError,
    AgentConnectionLost,
    AgentDeadlineExceeded,
    AgentDisconnected,
    AgentError,
    AgentFailedPrecondition,
    AgentInvalidArgument,
    AgentNotFound,
    AgentTimeout,
    AgentUnimplemented,
    BadAddress,
    BadSpec,
    HandshakeFailed,
    agent_error,
)
from kata_agent_client._health import CHECK_INTERVAL, HealthChecker
from kata_agent_client._logs import forward_line, forward_logs
from kata_agent_client._types import (
    BLKIO_LISTS,
    AgentVersion,
    BlkioEntry,
    ContainerSpec,
    ContainerStats,
    Device,
    GuestDetails,
    HugetlbStats,
    MemoryEntry,
    Mount,
    NetworkStats,
    Process,
    Resources,
    StdioPorts,
    Storage,
    default_mounts,
)
from kata_proto.network import ARPNeighbor, Interface, IPAddress, Route

__all__ = [
    "AGENT_PORT",
    "BLKIO_LISTS",
    "CHECK_INTERVAL",
    "DEFAULT_TIMEOUT",
    "GUEST_WALL_CAP",
    "LOG_PORT",
    "NO_TIMEOUT",
    "ARPNeighbor",
    "AgentAddress",
    "AgentAlreadyExists",
    "AgentCallError",
    "AgentClient",
    "AgentConnectionLost",
    "AgentDeadlineExceeded",
    "AgentDisconnected",
    "AgentError",
    "AgentFailedPrecondition",
    "AgentInvalidArgument",
    "AgentNotFound",
    "AgentTimeout",
    "AgentUnimplemented",
    "AgentVersion",
    "BadAddress",
    "BadSpec",
    "BlkioEntry",
    "ContainerSpec",
    "ContainerStats",
    "Device",
    "GuestDetails",
    "HandshakeFailed",
    "HealthChecker",
    "HugetlbStats",
    "IPAddress",
    "Interface",
    "MemoryEntry",
    "Mount",
    "NetworkStats",
    "Process",
    "Resources",
    "Route",
    "StdioPorts",
    "Storage",
    "__version__",
    "agent_error",
    "connect",
    "default_mounts",
    "forward_line",
    "forward_logs",
    "guest_timed",
    "open_agent_client",
]
