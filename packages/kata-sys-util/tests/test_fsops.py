"""getdents64: one batch from the directory fd's position, resumable at any d_off it returned."""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_sys_util import getdents64


@pytest.fixture
def listed(tmp_path: Path) -> Iterator[tuple[int, set[bytes]]]:
    """A directory fd of 300 files, and the names getdents64 must list ('.' and '..' included)."""
    names = {f"entry-{i:04d}".encode() for i in range(300)}
    for name in names:
        (tmp_path / os.fsdecode(name)).touch()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd, names | {b".", b".."}
    os.close(fd)


def test_getdents64_batches_list_every_entry_once_and_resume_at_a_returned_offset(
    listed: tuple[int, set[bytes]],
) -> None:
    fd, names = listed
    batches = []
    while batch := getdents64(fd, 1024):
        batches.append(batch)
    seen = [name for batch in batches for name, _ino, _off, _dtype in batch]
    assert len(batches) > 2 and len(seen) == len(names) and set(seen) == names
    os.lseek(fd, batches[0][-1][2], os.SEEK_SET)
    assert getdents64(fd, 1024) == batches[1]


def test_getdents64_builds_no_ctypes_type(listed: tuple[int, set[bytes]]) -> None:
    """ctypes caches a `c_char * size` type only weakly: a buffer made through one was a new type (a few KiB)
    whenever the collector had taken the last, so what a call allocated depended on when the GC last ran."""
    fd, _ = listed
    gc.collect()
    gc.disable()  # else a collection could take the type before it is looked for
    try:
        before = set(ctypes.Array.__subclasses__())
        assert getdents64(fd, 4321)
        assert set(ctypes.Array.__subclasses__()) == before
    finally:
        gc.enable()
