"""./dev and lab/demo.py on the host: a failing step prints one line saying what failed and what to do."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_failing_dev_step_prints_one_line_naming_it_and_the_fix() -> None:
    if not (REPO / ".venv" / "bin" / "nox").exists():
        pytest.skip("needs the .venv that ./dev creates")
    done = subprocess.run(
        [str(REPO / "dev"), "nox", "-s", "no-such-session"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert done.returncode != 0
    failed = [line for line in done.stderr.splitlines() if line.startswith("[dev] FAILED")]
    rc = done.returncode
    assert failed == [f"[dev] FAILED: nox -s no-such-session (exit {rc}); see nox's output above"]
    assert "Traceback" not in done.stderr


def test_failing_demo_step_prints_one_line_without_a_traceback(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "lab"))
    try:
        import demo
    finally:
        sys.path.remove(str(REPO / "lab"))
    with pytest.raises(demo.StepFailed, match=r"^building x failed \(exit 3\); do y$"):
        demo.step("building x", [sys.executable, "-c", "raise SystemExit(3)"], "do y")
    with pytest.raises(demo.StepFailed, match=r"^building x: .*No such file.*; do y$"):
        demo.step("building x", [str(tmp_path / "missing")], "do y")


def test_demo_boots_the_lab_vm_again_only_when_the_lab_vm_itself_failed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """labvm's 125 (the emulated lab VM died: a crash seen in ./dev demo on 2026-12-07) gets one more boot,
    said on the console; the demo's own failure (any other status) does not."""
    sys.path.insert(0, str(REPO / "lab"))
    try:
        import demo
    finally:
        sys.path.remove(str(REPO / "lab"))

    def runner(codes: list[int]) -> tuple[list[list[str]], Callable[[list[str]], int]]:
        calls: list[list[str]] = []

        def run(argv: list[str]) -> int:
            calls.append(argv)
            return codes[len(calls) - 1]

        return calls, run

    calls, run = runner([125, 0])
    assert demo.run_in_lab_vm(["labvm", "exec"], run=run) == 0
    assert len(calls) == 2
    assert "LAB VM FAILURE, not the demo's" in capsys.readouterr().err
    calls, run = runner([125, 125, 0])
    assert demo.run_in_lab_vm(["labvm", "exec"], run=run) == 125
    assert len(calls) == 2  # LAB_VM_ATTEMPTS boots, no more
    calls, run = runner([1, 0])
    assert demo.run_in_lab_vm(["labvm", "exec"], run=run) == 1
    assert len(calls) == 1
