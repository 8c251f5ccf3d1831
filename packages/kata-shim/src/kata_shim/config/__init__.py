"""Kata's configuration.toml (`[runtime]`, `[agent.kata]`, `[hypervisor.<name>]`): lookup, loading, types."""

from kata_shim.config._loader import (
    ENV_CONFIG_FILE,
    SYSTEM_CONFIG,
    ConfigError,
    find_config,
    load_config,
    load_config_file,
    shipped_config,
)
from kata_shim.config._types import AgentConfig, RuntimeConfig, TomlConfig

__all__ = [
    "ENV_CONFIG_FILE",
    "SYSTEM_CONFIG",
    "AgentConfig",
    "ConfigError",
    "RuntimeConfig",
    "TomlConfig",
    "find_config",
    "load_config",
    "load_config_file",
    "shipped_config",
]
