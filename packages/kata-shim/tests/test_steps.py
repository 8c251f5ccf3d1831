"""The shim's process age and its own start-up line (issue 16: each step's time in the shim log)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kata_shim._steps import ENV_STARTED_AT, process_age
from kata_shim.shim._run import startup_line


def test_process_age_reads_starttime_after_a_command_name_with_spaces_and_parens(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    boot_now = time.clock_gettime(time.CLOCK_BOOTTIME)
    started = int((boot_now - 30) * ticks)
    fields = ["S"] + ["0"] * 18 + [str(started)] + ["0"] * 10  # field 22 is starttime
    stat = tmp_path / "stat"
    stat.write_text(f"4242 (a b) c) {' '.join(fields)}\n")
    age = process_age(str(stat))
    assert age is not None and 29 <= age <= 31
    stat.write_text("garbage")
    assert process_age(str(stat)) is None
    assert process_age(str(tmp_path / "absent")) is None
    own = process_age()  # this test process: started before now, not before boot
    assert own is not None and 0 < own < boot_now


def test_startup_line_says_since_exec_and_since_start_when_known() -> None:
    line = startup_line("100.000", 2.25, 103.5)
    assert line == "serving 2.25 s after its exec, 3.50 s after `start` was exec'd"
    assert startup_line("", 2.25, 103.5) == "serving 2.25 s after its exec"
    assert startup_line("junk", None, 1.0) == "serving (exec time unknown)"


def test_a_fork_standing_in_for_a_client_counts_from_the_clients_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    own = process_age()
    assert own is not None
    monkeypatch.setenv(ENV_STARTED_AT, f"{time.clock_gettime(time.CLOCK_BOOTTIME) - own - 100:.3f}")
    age = process_age()
    assert age is not None and own + 99 < age < own + 200
    monkeypatch.setenv(ENV_STARTED_AT, "not a number")
    fallback = process_age()
    assert fallback is not None and fallback < own + 99
