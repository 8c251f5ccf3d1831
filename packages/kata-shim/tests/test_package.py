"""The installed distribution and the import package agree on their version."""

from importlib.metadata import version

import kata_shim


def test_installed_version_matches_about() -> None:
    assert version("kata-shim") == kata_shim.__version__
