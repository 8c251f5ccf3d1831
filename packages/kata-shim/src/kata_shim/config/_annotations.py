"""`io.katacontainers.config.*` annotations of a pod, applied to its configuration as upstream runtime-rs
does where `[hypervisor.<name>] enable_annotations` allows them, and refused with a clear error otherwise."""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping

from kata_shim.config._loader import ConfigError
from kata_shim.config._types import TomlConfig

ANNOTATION_PREFIX = "io.katacontainers.config."
HYPERVISOR_PREFIX = ANNOTATION_PREFIX + "hypervisor."
# the hypervisor keys an annotation may set here (upstream has more; paths are left out on purpose: they
# would let a workload pick host files) and how their value is read
_SETTABLE = {"kernel_params": str, "default_vcpus": int, "default_maxvcpus": int, "default_memory": int}


def apply_annotations(config: TomlConfig, annotations: Mapping[str, str]) -> TomlConfig:
    """`config` with the allowed `io.katacontainers.config.hypervisor.*` annotations applied.

    Raises `ConfigError` naming the annotation when `enable_annotations` does not allow it, this shim
    does not support it, or its value is not of the key's type."""
    changes: dict[str, typing.Any] = {}
    table = f"hypervisor.{config.runtime.hypervisor_name}"
    for name, value in sorted(annotations.items()):
        if not name.startswith(ANNOTATION_PREFIX):
            continue
        if not name.startswith(HYPERVISOR_PREFIX):
            raise ConfigError(f"annotation {name}: not supported by this shim (only {HYPERVISOR_PREFIX}*)")
        key = name.removeprefix(HYPERVISOR_PREFIX)
        if not any(re.fullmatch(pattern, key) for pattern in config.enable_annotations):
            allowed = ", ".join(config.enable_annotations) or "nothing"
            raise ConfigError(f"annotation {name}: not enabled ({table}.enable_annotations allows {allowed})")
        kind = _SETTABLE.get(key)
        if kind is None:
            raise ConfigError(
                f"annotation {name}: not supported by this shim (settable: {', '.join(_SETTABLE)})"
            )
        if kind is int:
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"annotation {name}: {value!r} is not a positive integer")
            changes[key] = int(value)
        else:
            changes[key] = value
    if not changes:
        return config
    return dataclasses.replace(
        config,
        hypervisor=dataclasses.replace(config.hypervisor, **changes),
        annotated=sorted({*config.annotated, *changes}),
    )
