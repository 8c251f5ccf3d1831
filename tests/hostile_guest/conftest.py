"""Hostile-guest reproductions: each scenario runs in a forked child inside a private mount namespace
(unshare(CLONE_NEWNS) + MS_REC|MS_PRIVATE on /), so whatever an attack mounts or unmounts there vanishes
with the child and never reaches the host's namespace. Needs root.

Only ctypes here (no project import), so the harness itself works on any revision under test.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _private_mount_namespace() -> None:
    if _libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if _libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "make / rprivate")


def run_isolated(scenario: Callable[[Path], None], base: Path) -> None:
    """Run `scenario(base)` in a forked child in a private mount namespace; its failure fails the test."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            _private_mount_namespace()
            scenario(base)
        except BaseException:
            os.write(w, traceback.format_exc().encode(errors="replace")[-60_000:])
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        pytest.fail(
            f"scenario failed in the child:\n{b''.join(chunks).decode(errors='replace')}", pytrace=False
        )


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch directory for one scenario (removed afterwards; the child's mounts are gone by then)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mount namespaces, mount(2))")
    root = Path(tempfile.mkdtemp(prefix="hostile-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def isolated(base: Path) -> Callable[[Callable[[Path], None]], None]:
    """`isolated(scenario)` runs `scenario(base)` in a forked child in a private mount namespace."""
    return lambda scenario: run_isolated(scenario, base)
