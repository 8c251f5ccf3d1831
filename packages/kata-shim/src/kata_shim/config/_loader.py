"""Find and load Kata's configuration.toml (runtime-rs layout) into a `TomlConfig`.

Lookup order (Kata's Go shim and the issue agree): the runtime options' config_path, then the
KATA_CONF_FILE environment variable, then /etc/kata-containers/runtime-rs/configuration.toml when it
exists, then the configuration shipped inside this package. Every problem is one `ConfigError`
naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from kata_shim.config._types import AgentConfig, RuntimeConfig, TomlConfig
from kata_shim.hypervisor._base import HypervisorConfig
from kata_shim.hypervisor._registry import HYPERVISORS
from kata_shim.runtime._base import InvalidArgument
from kata_shim.runtime._registry import RUNTIME_HANDLERS

ENV_CONFIG_FILE = "KATA_CONF_FILE"
SYSTEM_CONFIG = Path("/etc/kata-containers/runtime-rs/configuration.toml")
AGENTS = ("kata",)
INTERNETWORKING_MODELS = ("tcfilter", "route", "none")
"""`[runtime] internetworking_model`: how guest frames reach the pod's veth (kata_resources.NetworkModel)."""


class ConfigError(InvalidArgument):
    """The configuration file is missing, is not valid TOML, has a key of the wrong type or value, or
    names an unknown runtime, hypervisor or agent (the message names the file and the key)."""


def shipped_config() -> Path:
    """The configuration.toml inside the installed package."""
    return Path(str(resources.files("kata_shim.config") / "configuration.toml"))


def find_config(option_path: str = "", env: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """The file to load and where its name came from (for messages), in Kata's lookup order."""
    env = os.environ if env is None else env
    if option_path:
        return Path(option_path), "runtime options config_path"
    if env.get(ENV_CONFIG_FILE):
        return Path(env[ENV_CONFIG_FILE]), ENV_CONFIG_FILE
    if SYSTEM_CONFIG.is_file():
        return SYSTEM_CONFIG, "system default"
    return shipped_config(), "shipped default"


def load_config(option_path: str = "", env: Mapping[str, str] | None = None) -> TomlConfig:
    """Find (see `find_config`), parse and validate the configuration."""
    path, origin = find_config(option_path, env)
    return load_config_file(path, origin)


def load_config_file(path: Path, origin: str = "") -> TomlConfig:
    """Parse and validate one configuration file."""
    where = f" (from {origin})" if origin else ""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path}{where} does not exist") from None
    except OSError as err:
        raise ConfigError(f"cannot read configuration file {path}{where}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    return _Parser(path).parse(doc)


class _Parser:
    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {problem}")

    def table(self, doc: Mapping[str, Any], key: str) -> dict[str, Any]:
        node: Any = doc
        for part in key.split("."):
            node = node.get(part, {}) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                raise self.error(key, "must be a table")
        return node

    def parse(self, doc: dict[str, Any]) -> TomlConfig:
        runtime_table = self.table(doc, "runtime")
        hypervisors = self.table(doc, "hypervisor")
        if "hypervisor_name" not in runtime_table and len(hypervisors) == 1:
            # One [hypervisor.X] table and no hypervisor_name: that table is the one meant.
            runtime_table = {**runtime_table, "hypervisor_name": next(iter(hypervisors))}
        runtime, _ = self.fill(RuntimeConfig, runtime_table, "runtime")
        if runtime.name not in RUNTIME_HANDLERS:
            raise self.error("runtime.name", self.unknown("runtime handler", runtime.name, RUNTIME_HANDLERS))
        if runtime.hypervisor_name not in HYPERVISORS:
            raise self.error(
                "runtime.hypervisor_name", self.unknown("hypervisor", runtime.hypervisor_name, HYPERVISORS)
            )
        if not 0 < runtime.passfd_listener_port <= 0xFFFFFFFF:
            raise self.error("runtime.passfd_listener_port", "must be a vsock port (1 to 4294967295)")
        if runtime.internetworking_model not in INTERNETWORKING_MODELS:
            raise self.error(
                "runtime.internetworking_model",
                self.unknown("internetworking model", runtime.internetworking_model, INTERNETWORKING_MODELS),
            )
        if runtime.agent_name not in AGENTS:
            raise self.error("runtime.agent_name", self.unknown("agent", runtime.agent_name, AGENTS))
        hv_key = f"hypervisor.{runtime.hypervisor_name}"
        if runtime.hypervisor_name not in hypervisors:
            raise self.error(hv_key, "table missing (runtime.hypervisor_name selects it)")
        hypervisor, extra = self.fill(HypervisorConfig, self.table(doc, hv_key), hv_key)
        hypervisor.extra = extra
        self.check_hypervisor(hypervisor, hv_key)
        agent, _ = self.fill(AgentConfig, self.table(doc, f"agent.{runtime.agent_name}"), "agent.kata")
        for key in ("dial_timeout_ms", "reconnect_timeout_ms", "request_timeout_ms"):
            if getattr(agent, key) <= 0:
                raise self.error(f"agent.kata.{key}", "must be positive")
        return TomlConfig(path=self.path, runtime=runtime, hypervisor=hypervisor, agent=agent)

    @staticmethod
    def unknown(what: str, name: str, known: typing.Iterable[str]) -> str:
        return f"unknown {what} {name!r} (known: {', '.join(sorted(known))})"

    def check_hypervisor(self, hv: HypervisorConfig, key: str) -> None:
        if hv.kernel == Path():
            raise self.error(f"{key}.kernel", "missing (the guest kernel is required)")
        for name in ("kernel", "image", "initrd"):
            value: Path | None = getattr(hv, name)
            if value is not None and not value.is_file():
                raise self.error(f"{key}.{name}", f"{value} does not exist")
        if hv.default_vcpus < 1:
            raise self.error(f"{key}.default_vcpus", "must be at least 1")
        if hv.default_maxvcpus and hv.default_maxvcpus < hv.default_vcpus:
            raise self.error(f"{key}.default_maxvcpus", "must not be below default_vcpus")
        if hv.default_memory < 64:
            raise self.error(f"{key}.default_memory", "must be at least 64 (MiB)")

    def fill(self, cls: type[Any], table: dict[str, Any], prefix: str) -> tuple[Any, dict[str, object]]:
        """An instance of the dataclass `cls` from `table`; keys it lacks are returned apart."""
        hints = typing.get_type_hints(cls)
        values: dict[str, object] = {}
        extra: dict[str, object] = {}
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
        for key, value in table.items():
            if key in names:
                values[key] = self.convert(value, hints[key], f"{prefix}.{key}")
            else:
                extra[key] = value
        return cls(**values), extra

    def convert(self, value: object, hint: object, key: str) -> object:
        optional = False
        if isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint):
            optional = True
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if hint is Path:
            if not isinstance(value, str):
                raise self.error(key, f"must be a path string, not {type(value).__name__}")
            if optional and not value:
                return None
            return Path(value)
        if hint is bool:
            if not isinstance(value, bool):
                raise self.error(key, f"must be true or false, not {value!r}")
            return value
        if hint is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.error(key, f"must be an integer, not {value!r}")
            if value < 0:
                raise self.error(key, f"must not be negative, not {value}")
            return value
        if hint is str:
            if not isinstance(value, str):
                raise self.error(key, f"must be a string, not {value!r}")
            return value
        if typing.get_origin(hint) is list:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.error(key, "must be a list of strings")
            return list(value)
        raise self.error(key, f"unsupported type {hint}")  # pragma: no cover (a new field type)
