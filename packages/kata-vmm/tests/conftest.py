"""Shared fixtures: tiny kernels on disk, and a check that a test leaves no thread or fd behind."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kata_vmm.testing import tiny_bzimage

KernelFactory = Callable[[bytes], Path]


@pytest.fixture
def make_kernel(tmp_path: Path) -> KernelFactory:
    """Write a tiny bzImage running the given 64-bit code; returns its path."""
    count = 0

    def make(code: bytes) -> Path:
        nonlocal count
        count += 1
        path = tmp_path / f"tiny-{count}.bzImage"
        path.write_bytes(tiny_bzimage(code))
        return path

    return make


def _open_fds() -> set[str]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the fd listdir itself used
            fds.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
    return fds


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Fail the test if it leaves a thread or a file descriptor behind."""
    threads = set(threading.enumerate())
    fds = _open_fds()
    yield
    # trio.to_thread's idle workers ("Trio thread N") are its cache: they end on their own after 10 s
    leaked_threads = [
        t.name
        for t in threading.enumerate()
        if t not in threads and t.is_alive() and not t.name.startswith("Trio thread")
    ]
    assert leaked_threads == []
    assert _open_fds() - fds == set()
