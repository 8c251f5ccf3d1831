"""The loaded configuration: the `[runtime]`, `[agent.<name>]` and selected `[hypervisor.<name>]` tables
of Kata's configuration.toml (runtime-rs layout), as typed dataclasses.
The loader (kata_shim.config) fills them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kata_shim.hypervisor._base import HypervisorConfig

MIN_RECONNECT_TIMEOUT_MS = 10_000
"""Upstream runtime-rs's floor under `reconnect_timeout_ms` (agent/src/sock/mod.rs)."""


@dataclass
class AgentConfig:
    """`[agent.kata]`."""

    dial_timeout_ms: int = 10
    """The pause between two attempts to reach the agent's vsock port (upstream runtime-rs)."""
    reconnect_timeout_ms: int = 3_000
    """The whole budget for reaching the agent after the VM started; upstream raises it to at least
    `MIN_RECONNECT_TIMEOUT_MS` (see `connect_budget_s`)."""
    request_timeout_ms: int = 30_000
    """Per-call budget of agent requests (upstream's key is `create_container_timeout`, in seconds)."""
    health_check_request_timeout_ms: int = 90_000
    kernel_modules: list[str] = field(default_factory=list)
    container_pipe_size: int = 0
    enable_debug: bool = False
    debug_console_enabled: bool = False

    @property
    def connect_budget_s(self) -> float:
        """Seconds to keep dialling the agent: `reconnect_timeout_ms`, at least 10 s, as upstream."""
        return max(self.reconnect_timeout_ms, MIN_RECONNECT_TIMEOUT_MS) / 1000

    @property
    def dial_interval_s(self) -> float:
        """Seconds between two dial attempts (`dial_timeout_ms`)."""
        return max(self.dial_timeout_ms, 1) / 1000


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


DEFAULT_TEMPLATE_PATH = Path("/run/vc/vm/template")
"""Upstream's default `[factory] template_path` (the Go runtime's and runtime-rs's)."""
TEMPLATE_HYPERVISORS = ("dragonball",)
"""Back-ends a VM template works with: the built-in VMM, whose snapshot/restore the factory drives."""


@dataclass
class FactoryConfig:
    """`[factory]` (upstream's keys; `[hypervisor.<name>.factory]`, as runtime-rs nests it, is read too)."""

    enable_template: bool = False
    """Start each sandbox as a copy-on-write clone of a template VM booted once to agent-ready."""
    template_path: Path = DEFAULT_TEMPLATE_PATH
    """Where the template (memory files, VM state, manifest) and its lock file live."""


@dataclass
class TomlConfig:
    """A whole configuration, with the file it came from."""

    path: Path
    runtime: RuntimeConfig
    hypervisor: HypervisorConfig
    agent: AgentConfig
    factory: FactoryConfig = field(default_factory=FactoryConfig)
    enable_annotations: list[str] = field(default_factory=list)
    """`[hypervisor.<name>] enable_annotations`: patterns of the hypervisor keys a pod's
    `io.katacontainers.config.hypervisor.<key>` annotations may set (see `apply_annotations`)."""
    annotated: list[str] = field(default_factory=list)
    """The `[hypervisor.<name>]` keys a pod's annotations changed (`apply_annotations`): such a pod's VM is
    not the configuration file's, so it does not start from the VM template."""
    unused_keys: list[str] = field(default_factory=list)
    """Dotted keys this shim does not use (logged once as a warning when loaded)."""
    sources: list[Path] = field(default_factory=list)
    """`path` then its `config.d` drop-ins, in merge order."""
    origins: dict[str, Path] = field(default_factory=dict)
    """Dotted key -> the file that set its value (the last drop-in that did, else `path`)."""
