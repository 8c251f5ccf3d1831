"""Errors of kata-resources."""

from __future__ import annotations


class ResourceError(Exception):
    """Base of every error kata-resources raises."""


class MountError(ResourceError, OSError):
    """Raised when mount(2) or umount2(2) fails; carries the errno and names the target."""


class VolumeError(ResourceError, ValueError):
    """Raised for an OCI mount this package cannot share with the guest (missing or unsupported source)."""
