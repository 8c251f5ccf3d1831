"""The loaded configuration: the `[runtime]`, `[agent.<name>]` and selected `[hypervisor.<name>]` tables
of Kata's configuration.toml (runtime-rs layout), as typed dataclasses.
The loader (kata_shim.config) fills them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kata_shim.hypervisor._base import HypervisorConfig


@dataclass
class AgentConfig:
    """`[agent.kata]`."""

    dial_timeout_ms: int = 90_000
    """How long the shim keeps retrying the agent's vsock port after the VM started (nested KVM is slow)."""
    reconnect_timeout_ms: int = 3_000
    request_timeout_ms: int = 30_000
    health_check_request_timeout_ms: int = 90_000
    kernel_modules: list[str] = field(default_factory=list)
    container_pipe_size: int = 0
    enable_debug: bool = False
    debug_console_enabled: bool = False


@dataclass
class RuntimeConfig:
    """`[runtime]`."""

    name: str = "virt_container"
    hypervisor_name: str = "dragonball"
    agent_name: str = "kata"
    enable_debug: bool = False
    internetworking_model: str = "tcfilter"
    disable_new_netns: bool = False
    sandbox_cgroup_only: bool = False
    static_sandbox_resource_mgmt: bool = False
    enable_pprof: bool = False
    use_passfd_io: bool = False
    """Hand containerd's stdio fifos to the VMM (Dragonball passfd) instead of copying over ttrpc."""
    passfd_listener_port: int = 1027
    """The agent's passfd vsock port (the VMM adds `agent.passfd_listener_port=` to the kernel cmdline)."""


@dataclass
class TomlConfig:
    """A whole configuration, with the file it came from."""

    path: Path
    runtime: RuntimeConfig
    hypervisor: HypervisorConfig
    agent: AgentConfig
