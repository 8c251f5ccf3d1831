"""lab/shards.py on the host: the lab run's scheduler, driven by stand-in commands instead of lab VMs."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1]
if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))

import shards  # noqa: E402


def test_files_of_counts_tests_per_file_and_ignores_other_lines() -> None:
    lines = [
        "lab/tests/test_a.py::test_one",
        "lab/tests/test_a.py::test_two[qemu]",
        "packages/x/tests/test_b.py::TestC::test_d[/a/../b]",
        "",
        "3 tests collected in 0.5s",
    ]
    assert shards.files_of(lines) == Counter({"lab/tests/test_a.py": 2, "packages/x/tests/test_b.py": 1})


def test_plan_starts_the_longest_first_from_last_durations_else_test_counts(tmp_path: Path) -> None:
    counts = Counter({"a.py": 1, "b.py": 5, "c.py": 2})
    plan = shards.plan(counts, {"a.py": 900.0}, tmp_path)
    assert [s.path for s in plan] == ["a.py", "b.py", "c.py"]  # 900 s, 5 x 30 s, 2 x 30 s
    assert plan[1].passed_file == tmp_path / "passed-b.txt"
    assert shards.plan(Counter({"lab/tests/t.py": 1}), {}, tmp_path)[0].log == tmp_path / "lab_tests_t.log"


def _fake(codes: dict[str, list[int]]) -> tuple[shards.Command, list[tuple[str, bool]]]:
    """A command per shard that records its start and exits with the next code listed for its file, writing
    one passed test before a 125 (as a lab VM that died after one test would)."""
    calls: list[tuple[str, bool]] = []

    def command(shard: shards.Shard, resume: bool) -> list[str]:
        calls.append((shard.path, resume))
        code = codes[shard.path].pop(0)
        script = (
            f"import pathlib, sys, time; print('output of {shard.path}'); time.sleep(0.2); "
            f"p = pathlib.Path({str(shard.passed_file)!r}); "
            f"p.write_text(p.read_text() + 'x\\n' if p.exists() else 'x\\n') if {code} == 125 else None; "
            f"sys.exit({code})"
        )
        return [sys.executable, "-c", script]

    return command, calls


def test_a_dead_lab_vm_reruns_only_its_file_with_resume_and_a_test_failure_is_never_retried(
    tmp_path: Path,
) -> None:
    plan = shards.plan(Counter({"dies.py": 3, "fails.py": 2, "ok.py": 1}), {}, tmp_path)
    command, calls = _fake({"dies.py": [125, 0], "fails.py": [1], "ok.py": [0]})
    said: list[str] = []
    done = {s.path: s for s in shards.run(plan, command, workers=2, attempts=3, say=said.append, poll=0.05)}
    assert (done["dies.py"].code, done["dies.py"].attempts) == (0, 2)
    assert (done["fails.py"].code, done["fails.py"].attempts) == (1, 1)
    assert done["ok.py"].code == 0
    assert ("dies.py", True) in calls and ("fails.py", True) not in calls
    assert calls[0] == ("dies.py", False)  # the most tests first
    assert any("LAB VM FAILURE" in line and "after 1 of its tests passed" in line for line in said)
    assert any("fails.py: FAILED (labvm exit 1)" in line and "output of fails.py" in line for line in said)
    # the retried file's log holds both lab VMs' output
    assert done["dies.py"].log.read_text().count("output of dies.py") == 2


def test_a_file_whose_lab_vms_keep_dying_fails_after_the_attempts(tmp_path: Path) -> None:
    plan = shards.plan(Counter({"dies.py": 1}), {}, tmp_path)
    command, calls = _fake({"dies.py": [125, 125, 125, 0]})
    [shard] = shards.run(plan, command, workers=1, attempts=3, say=lambda _line: None, poll=0.05)
    assert (shard.code, shard.attempts, len(calls)) == (125, 3, 3)


def test_no_more_lab_vms_than_workers_at_once(tmp_path: Path) -> None:
    names = [f"t{i}.py" for i in range(5)]
    plan = shards.plan(Counter(dict.fromkeys(names, 1)), {}, tmp_path)
    marker = tmp_path / "running"
    marker.mkdir()
    script = (
        "import os, pathlib, sys, time; d = pathlib.Path(sys.argv[1]); "
        "me = d / str(os.getpid()); me.touch(); n = len(list(d.iterdir())); time.sleep(0.3); "
        "me.unlink(); sys.exit(0 if n <= 2 else 7)"
    )
    done = shards.run(
        plan,
        lambda _shard, _resume: [sys.executable, "-c", script, str(marker)],
        workers=2,
        attempts=1,
        say=lambda _line: None,
        poll=0.02,
    )
    assert [s.code for s in done] == [0] * 5


def test_durations_are_kept_for_files_that_passed_in_their_first_lab_vm(tmp_path: Path) -> None:
    plan = shards.plan(Counter({"a.py": 1, "b.py": 1, "c.py": 1}), {}, tmp_path)
    a, b, c = sorted(plan, key=lambda s: s.path)
    a.code, a.attempts, a.seconds = 0, 1, 12.34
    b.code, b.attempts, b.seconds = 0, 2, 99.0  # retried: its time says nothing
    c.code, c.attempts, c.seconds = 1, 1, 5.0
    shards.save_durations(tmp_path, plan)
    assert shards.load_durations(tmp_path) == {"a.py": 12.3}
    (tmp_path / "durations.json").write_text("not json")
    assert shards.load_durations(tmp_path) == {}


def test_an_interrupted_run_stops_its_lab_vms(tmp_path: Path) -> None:
    plan = shards.plan(Counter({"a.py": 1}), {}, tmp_path)
    pidfile = tmp_path / "pid"
    script = (
        f"import os, pathlib, time; pathlib.Path({str(pidfile)!r}).write_text(str(os.getpid())); "
        "time.sleep(60)"
    )

    def say(line: str) -> None:
        # Ctrl-C once the stand-in lab VM runs
        for _ in range(200):
            if pidfile.exists() and pidfile.read_text():
                raise KeyboardInterrupt
            time.sleep(0.05)

    with pytest.raises(KeyboardInterrupt):
        shards.run(plan, lambda _s, _r: [sys.executable, "-c", script], workers=1, attempts=1, say=say)
    with pytest.raises(ProcessLookupError):  # terminated and reaped
        os.kill(int(pidfile.read_text()), 0)
