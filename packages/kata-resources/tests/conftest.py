"""Fixtures: a scratch directory that must end with nothing mounted below it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_resources import mounts_below, umount


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A tmp dir; the test fails if it leaves a mount below it (which is then removed)."""
    root = Path(tempfile.mkdtemp(prefix="kres-", dir="/tmp"))
    try:
        yield root
    finally:
        left = mounts_below(root)
        for point in left:
            umount(point)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"left mounted: {left}"


@pytest.fixture
def needs_root() -> None:
    """Skip unless we may mount."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mount(2))")
