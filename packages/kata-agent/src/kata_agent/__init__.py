"""The in-guest Kata agent: grpc.AgentService and grpc.Health over ttrpc on vsock port 1024.

async with open_agent("unix:/tmp/agent.sock", AgentConfig(runtime="/usr/bin/runc")) as agent:
    ...  # serve until the block exits; containers are destroyed then
"""

from kata_agent.__about__ import __version__
from kata_agent._agent import open_agent
from kata_agent._errors import AgentError, RuntimeFailed
from kata_agent._listen import AGENT_VSOCK_PORT, LOG_VSOCK_PORT
from kata_agent._service import AgentConfig, AgentService, HealthService

__all__ = [
    "AGENT_VSOCK_PORT",
    "LOG_VSOCK_PORT",
    "AgentConfig",
    "AgentError",
    "AgentService",
    "HealthService",
    "RuntimeFailed",
    "__version__",
    "open_agent",
]
