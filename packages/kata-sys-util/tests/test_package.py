"""The installed distribution and the import package agree on their version."""

from importlib.metadata import version

import kata_sys_util


def test_installed_version_matches_about() -> None:
    assert version("kata-sys-util") == kata_sys_util.__version__
