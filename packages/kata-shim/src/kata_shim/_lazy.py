"""Registries whose entries are import strings ("package.module:Name"), loaded on first use.

The shim's start path must not import the VMM or trio; a registry entry costs nothing until it is chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping


class UnknownNameError(KeyError):
    """A registry has no entry of that name."""

    def __str__(self) -> str:
        return str(self.args[0])


def load_entry(registry: Mapping[str, str], name: str, what: str) -> object:
    """Import and return the object registered under `name`; `what` names the registry in errors."""
    try:
        target = registry[name]
    except KeyError:
        known = ", ".join(sorted(registry)) or "none"
        raise UnknownNameError(f"unknown {what} {name!r} (known: {known})") from None
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr)
