"""The installed distribution and the import package agree on their version."""

from importlib.metadata import version

import kata_agent_client


def test_installed_version_matches_about() -> None:
    assert version("kata-agent-client") == kata_agent_client.__version__
