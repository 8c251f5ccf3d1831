"""Makes the helper modules of this directory (ttrpc_echo, containerd_fixture) importable.

Other packages' tests reuse the private containerd the same way: put this directory on
sys.path and `from containerd_fixture import private_containerd`.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterator

import pytest

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from containerd_fixture import PrivateContainerd, private_containerd  # noqa: E402


@pytest.fixture
def containerd() -> Iterator[PrivateContainerd]:
    """A private containerd 1.6 (own root, state, sockets; CRI off), killed and removed afterwards."""
    with private_containerd() as instance:
        yield instance
