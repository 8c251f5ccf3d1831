"""preload_runtime: the agent runs the OCI runtime once before it serves (its binary and libraries read)."""

from __future__ import annotations

import os
from pathlib import Path

from agent_harness import RUNC

from kata_agent._runtime import preload_runtime


def test_a_runtime_that_runs_is_timed(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    fake = tmp_path / "crun"
    fake.write_text(f'#!/bin/sh\n[ "$1" = --version ] && echo "$1" > {marker}\n')
    fake.chmod(0o755)
    took = preload_runtime(str(fake))
    assert took is not None and took >= 0
    assert marker.read_text() == "--version\n"


def test_the_real_runtime_answers_version() -> None:
    assert os.access(RUNC, os.X_OK)
    assert preload_runtime(RUNC) is not None


def test_a_missing_or_hanging_runtime_is_none_and_never_blocks_for_long(tmp_path: Path) -> None:
    assert preload_runtime(str(tmp_path / "absent")) is None
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    assert preload_runtime(str(hang), timeout=0.3) is None
