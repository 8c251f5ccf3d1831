"""Process helpers that need no privilege: the fd limit."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import pytest

from kata_sys_util import raise_nofile


@pytest.fixture
def restore_nofile() -> Iterator[tuple[int, int]]:
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield old
    resource.setrlimit(resource.RLIMIT_NOFILE, old)


def test_raise_nofile_lifts_the_soft_limit_to_the_hard_one(restore_nofile: tuple[int, int]) -> None:
    _soft, hard = restore_nofile
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
    assert raise_nofile() == hard
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)


def test_raise_nofile_leaves_a_limit_already_at_the_hard_one(restore_nofile: tuple[int, int]) -> None:
    _soft, hard = restore_nofile
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert raise_nofile() == hard
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
