"""A pure-Python KVM VMM (our Dragonball): KVM bindings, guest memory, vCPUs, boot, ACPI, legacy devices."""

from kata_vmm.__about__ import __version__

__all__ = ["__version__"]
