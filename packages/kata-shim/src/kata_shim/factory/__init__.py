"""VM templates (`[factory] enable_template`, upstream's factory): a VM booted once to agent-ready and
saved; every sandbox then starts as a copy-on-write clone of it and gets its own identity through the
agent (hostname, clock, RNG seed)."""

from kata_shim.factory._template import (
    TEMPLATE_FORMAT,
    TEMPLATE_VERSION,
    FactoryError,
    Template,
    TemplateBusy,
    TemplateStatus,
    expected_manifest,
    mismatch,
    opened,
    template_for,
)

__all__ = [
    "TEMPLATE_FORMAT",
    "TEMPLATE_VERSION",
    "FactoryError",
    "Template",
    "TemplateBusy",
    "TemplateStatus",
    "expected_manifest",
    "mismatch",
    "opened",
    "template_for",
]
