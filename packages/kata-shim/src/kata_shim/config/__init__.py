"""Kata's configuration.toml (`[runtime]`, `[agent.kata]`, `[hypervisor.<name>]`, `[factory]`): lookup,
loading, types."""

from kata_shim.config._annotations import ANNOTATION_PREFIX, apply_annotations
from kata_shim.config._loader import (
    DROP_IN_DIR,
    ENV_CONFIG_FILE,
    SYSTEM_CONFIG,
    SYSTEM_CONFIGS,
    ConfigError,
    drop_ins,
    find_config,
    load_config,
    load_config_file,
    shipped_config,
)
from kata_shim.config._types import (
    DEFAULT_TEMPLATE_PATH,
    AgentConfig,
    FactoryConfig,
    RuntimeConfig,
    TomlConfig,
)

__all__ = [
    "ANNOTATION_PREFIX",
    "DEFAULT_TEMPLATE_PATH",
    "DROP_IN_DIR",
    "ENV_CONFIG_FILE",
    "SYSTEM_CONFIG",
    "SYSTEM_CONFIGS",
    "AgentConfig",
    "ConfigError",
    "FactoryConfig",
    "RuntimeConfig",
    "TomlConfig",
    "apply_annotations",
    "drop_ins",
    "find_config",
    "load_config",
    "load_config_file",
    "shipped_config",
]
