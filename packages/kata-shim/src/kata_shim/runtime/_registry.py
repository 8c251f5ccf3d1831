"""Container abstractions by `[runtime] name` (runtime-rs registers them the same way)."""

from __future__ import annotations

from typing import cast

from kata_shim._lazy import load_entry
from kata_shim.runtime._base import RuntimeHandler

RUNTIME_HANDLERS: dict[str, str] = {
    "virt_container": "kata_shim.virt_container:VirtContainer",
}
"""`[runtime] name` -> import string of a class whose no-argument instance is a `RuntimeHandler`."""


def runtime_handler(name: str) -> RuntimeHandler:
    """A new handler for `name`; raises `UnknownNameError` (a KeyError) for a name nobody registered."""
    cls = load_entry(RUNTIME_HANDLERS, name, "runtime handler")
    return cast(RuntimeHandler, cast(type, cls)())
