"""Find and load Kata's configuration.toml (runtime-rs layout) into a `TomlConfig`.

Lookup order, as upstream runtime-rs: the KATA_CONF_FILE environment variable, then the containerd runtime
options' config_path, then the first of SYSTEM_CONFIGS that exists (/etc, /usr/share/defaults, /opt/kata),
then the configuration shipped inside this package. The `config.d/*.toml` drop-ins next to the file are
merged over it in name order (tables merge key by key, other values replace). Keys this shim does not use
are logged once as a warning naming the file and the keys (an upstream file loads unchanged); every
problem is one `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from kata_proto.agent import LOG_CMDLINE_PARAM
from kata_shim.config._types import (
    TEMPLATE_HYPERVISORS,
    AgentConfig,
    FactoryConfig,
    RuntimeConfig,
    TomlConfig,
)
from kata_shim.hypervisor._base import HypervisorConfig
from kata_shim.hypervisor._registry import HYPERVISORS
from kata_shim.runtime._base import InvalidArgument
from kata_shim.runtime._registry import RUNTIME_HANDLERS

log = logging.getLogger(__name__)

ENV_CONFIG_FILE = "KATA_CONF_FILE"
SYSTEM_CONFIGS = (
    Path("/etc/kata-containers/runtime-rs/configuration.toml"),
    Path("/usr/share/defaults/kata-containers/runtime-rs/configuration.toml"),
    Path("/opt/kata/share/defaults/kata-containers/runtime-rs/configuration.toml"),
)
"""Upstream runtime-rs's default configuration files, first found wins."""
SYSTEM_CONFIG = SYSTEM_CONFIGS[0]
"""Where `kata-shim install` writes the configuration."""
DROP_IN_DIR = "config.d"
AGENTS = ("kata",)
# Block drivers upstream names for the PCI machines, and what a back-end without PCI uses instead.
_MMIO_BLOCK_DRIVERS = {"virtio-blk-pci": "virtio-mmio", "virtio-blk": "virtio-mmio"}
_MMIO_HYPERVISORS = ("dragonball", "firecracker")
# Block drivers upstream names that the qemu and clh back-ends serve as virtio-blk-pci (no virtio-scsi).
_PCI_BLOCK_DRIVERS = {"virtio-scsi": "virtio-blk-pci", "virtio-blk": "virtio-blk-pci"}
_PCI_HYPERVISORS = ("qemu", "clh")
INTERNETWORKING_MODELS = ("tcfilter", "route", "none")
"""`[runtime] internetworking_model`: how guest frames reach the pod's veth (kata_resources.NetworkModel)."""


class ConfigError(InvalidArgument):
    """The configuration file is missing, is not valid TOML, has a key of the wrong type or value, or
    names an unknown runtime, hypervisor or agent (the message names the file and the key)."""


def shipped_config() -> Path:
    """The configuration.toml inside the installed package."""
    return Path(str(resources.files("kata_shim.config") / "configuration.toml"))


def find_config(
    option_path: str = "", env: Mapping[str, str] | None = None, defaults: Sequence[Path] | None = None
) -> tuple[Path, str]:
    """The file to load and where its name came from (for messages), in upstream's lookup order."""
    env = os.environ if env is None else env
    if env.get(ENV_CONFIG_FILE):
        return Path(env[ENV_CONFIG_FILE]), ENV_CONFIG_FILE
    if option_path:
        return Path(option_path), "runtime options config_path"
    for candidate in SYSTEM_CONFIGS if defaults is None else defaults:
        if candidate.is_file():
            return candidate, "system default"
    return shipped_config(), "shipped default"


def load_config(
    option_path: str = "", env: Mapping[str, str] | None = None, defaults: Sequence[Path] | None = None
) -> TomlConfig:
    """Find (see `find_config`), parse, merge the drop-ins and validate the configuration."""
    path, origin = find_config(option_path, env, defaults)
    return load_config_file(path, origin)


def drop_ins(path: Path) -> list[Path]:
    """The `config.d/*.toml` files next to `path`, in the order they are merged (by name)."""
    directory = path.parent / DROP_IN_DIR
    try:
        names = sorted(os.listdir(directory), key=os.fsencode)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise ConfigError(f"cannot read drop-in directory {directory}: {err.strerror}") from err
    return [directory / name for name in names if name.endswith(".toml")]


def _read(path: Path, where: str = "") -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path}{where} does not exist") from None
    except OSError as err:
        raise ConfigError(f"cannot read configuration file {path}{where}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err


def _merge(
    base: dict[str, Any], over: Mapping[str, Any], source: Path, origins: dict[str, Path], at: str
) -> None:
    """Merge a drop-in into `base` as upstream does: tables key by key, any other value replaces."""
    for key, value in over.items():
        dotted = f"{at}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, source, origins, f"{dotted}.")
        else:
            base[key] = value
            _record(value, source, origins, dotted)


def _record(value: object, source: Path, origins: dict[str, Path], dotted: str) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _record(inner, source, origins, f"{dotted}.{key}")
    else:
        origins[dotted] = source


def load_config_file(path: Path, origin: str = "") -> TomlConfig:
    """Parse one configuration file, merge its drop-ins and validate the result."""
    where = f" (from {origin})" if origin else ""
    doc = _read(path, where)
    origins: dict[str, Path] = {}
    for key, value in doc.items():
        _record(value, path, origins, key)
    sources = [path]
    for drop_in in drop_ins(path):
        if not drop_in.is_file():
            raise ConfigError(f"drop-in {drop_in}: not a regular file")
        _merge(doc, _read(drop_in), drop_in, origins, "")
        sources.append(drop_in)
    config = _Parser(path, origins).parse(doc)
    config.sources = sources
    config.origins = origins
    _warn_unused(config)
    return config


def _warn_unused(config: TomlConfig) -> None:
    by_file: dict[Path, list[str]] = {}
    for key in config.unused_keys:
        by_file.setdefault(config.origins.get(key, config.path), []).append(key)
    for source, keys in by_file.items():
        log.warning("configuration %s: keys this shim does not use, ignored: %s", source, ", ".join(keys))


class _Parser:
    def __init__(self, path: Path, origins: Mapping[str, Path] | None = None) -> None:
        self.path = path
        self.origins = origins or {}
        self.unused: list[str] = []

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.origins.get(key, self.path)}: {key}: {problem}")

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
        self.unused += [key for key in doc if key not in ("runtime", "hypervisor", "agent", "factory")]
        runtime, unused = self.fill(RuntimeConfig, runtime_table, "runtime")
        self.unused += [f"runtime.{key}" for key in unused]
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
        hv_table = dict(self.table(doc, hv_key))
        factory_table = dict(self.table(doc, "factory"))
        if "factory" in hv_table:  # runtime-rs nests it in the hypervisor's table: its keys win
            factory_table.update(self.table(doc, f"{hv_key}.factory"))
            hv_table.pop("factory")
        factory, unused = self.fill(FactoryConfig, factory_table, "factory")
        self.unused += [f"factory.{key}" for key in unused]
        if factory.enable_template and runtime.hypervisor_name not in TEMPLATE_HYPERVISORS:
            raise self.error(
                "factory.enable_template",
                f"VM templates need the built-in VMM (hypervisor_name = "
                f"{' or '.join(repr(h) for h in TEMPLATE_HYPERVISORS)}), not {runtime.hypervisor_name!r}",
            )
        if factory.enable_template and not factory.template_path.is_absolute():
            raise self.error(
                "factory.template_path", f"must be an absolute path, not {factory.template_path}"
            )
        enable_annotations = self.convert(
            hv_table.pop("enable_annotations", []), list[str], f"{hv_key}.enable_annotations"
        )
        hypervisor, extra = self.fill(HypervisorConfig, hv_table, hv_key)
        hypervisor.extra = extra
        self.unused += [f"{hv_key}.{key}" for key in extra]
        self.block_driver(hypervisor, runtime.hypervisor_name, hv_key)
        self.check_hypervisor(hypervisor, hv_key)
        agent_key = f"agent.{runtime.agent_name}"
        agent_table = dict(self.table(doc, agent_key))
        if "create_container_timeout" in agent_table:
            # upstream's name for request_timeout_ms, in seconds
            seconds = self.convert(
                agent_table.pop("create_container_timeout"), int, f"{agent_key}.create_container_timeout"
            )
            agent_table.setdefault("request_timeout_ms", typing.cast(int, seconds) * 1000)
        agent, unused = self.fill(AgentConfig, agent_table, agent_key)
        self.unused += [f"{agent_key}.{key}" for key in unused]
        for key in ("dial_timeout_ms", "reconnect_timeout_ms", "request_timeout_ms"):
            if getattr(agent, key) <= 0:
                raise self.error(f"{agent_key}.{key}", "must be positive")
        if agent.enable_debug and not any(
            word.startswith(LOG_CMDLINE_PARAM + "=") for word in hypervisor.kernel_params.split()
        ):
            # as upstream: the agent logs at debug level (its own kernel parameter wins when given)
            hypervisor.kernel_params = f"{hypervisor.kernel_params.strip()} {LOG_CMDLINE_PARAM}=debug".strip()
        return TomlConfig(
            path=self.path,
            runtime=runtime,
            hypervisor=hypervisor,
            agent=agent,
            factory=factory,
            enable_annotations=typing.cast(list[str], enable_annotations),
            unused_keys=self.unused,
        )

    def block_driver(self, hv: HypervisorConfig, name: str, key: str) -> None:
        """Upstream's default block driver on a back-end that serves another: say so and use that
        (`virtio-blk-pci` on dragonball's virtio-mmio; `virtio-scsi` on qemu, which attaches
        virtio-blk-pci)."""
        if name in _MMIO_HYPERVISORS and hv.block_device_driver in _MMIO_BLOCK_DRIVERS:
            mapped = _MMIO_BLOCK_DRIVERS[hv.block_device_driver]
            kind = "virtio-mmio"
        elif name in _PCI_HYPERVISORS and hv.block_device_driver in _PCI_BLOCK_DRIVERS:
            mapped = _PCI_BLOCK_DRIVERS[hv.block_device_driver]
            kind = "virtio-blk-pci"
        else:
            return
        log.info(
            "configuration %s: %s.block_device_driver %r: %s devices are %s, using %s",
            self.origins.get(f"{key}.block_device_driver", self.path),
            key,
            hv.block_device_driver,
            name,
            kind,
            mapped,
        )
        hv.block_device_driver = mapped

    @staticmethod
    def unknown(what: str, name: str, known: typing.Iterable[str]) -> str:
        return f"unknown {what} {name!r} (known: {', '.join(sorted(known))})"

    def check_hypervisor(self, hv: HypervisorConfig, key: str) -> None:
        if hv.kernel == Path():
            raise self.error(f"{key}.kernel", "missing (the guest kernel is required)")
        for name in ("kernel", "image", "initrd"):
            value: Path | None = getattr(hv, name)
            if value is not None and not value.is_file():
                raise self.error(
                    f"{key}.{name}", f"{value} does not exist (install the guest assets: ./dev install)"
                )
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
