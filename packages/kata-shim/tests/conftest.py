"""Makes restvmm_harness (this directory's helpers) importable: with --import-mode=importlib test directories
are not on sys.path. The REST back-ends' tests share their fixtures here."""

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_shim.shim._zygote import zygotes_in

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from restvmm_harness import processes_running  # noqa: E402 (importable once _HERE is on sys.path)


@pytest.fixture
def root() -> Iterator[Path]:
    """A short state root under /tmp (unix socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="krv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the fake REST VMM records every request it gets (JSON lines); the fake's normal mode."""
    path = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_VMM_RECORD", str(path))
    monkeypatch.delenv("FAKE_VMM_MODE", raising=False)
    return path


@pytest.fixture
def reap_fakes(tmp_path: Path) -> Iterator[None]:
    """After the test: SIGKILL every fake VMM or virtiofsd from ``tmp_path`` still running (a test that
    failed before its cleanup must not leave them to the next ones), with a warning naming them."""
    yield
    left = processes_running(tmp_path)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        warnings.warn(f"fake VMM processes left running: {left}", stacklevel=1)


@pytest.fixture(autouse=True, scope="session")
def zygote_dir() -> Iterator[str]:
    """Every shim these tests start uses zygotes of this session's (not the host's /run/kata-shim-zygote),
    ended at its end."""
    with zygotes_in() as directory:
        yield directory
