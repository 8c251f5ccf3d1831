"""Run the lab tests in several lab VMs at once: one test file per lab VM boot (stdlib only; `nox -s lab`).

Why: two nested guests running at the same time on two vCPUs of one lab VM break QEMU's TCG at random (the
lab kernel's stack guard page, nested guests that triple-fault in their first second; lab/README.md, "The
lab VM's own failures"), and a lab VM with one vCPU cannot hit that. So the suite runs in ``workers`` lab
VMs of one vCPU each, side by side, each booted for one test file (its module-scoped fixtures stay
together; the lab tests share nothing across files). The longest files start first: the last run's
durations (``durations.json`` in the log directory), else the count of tests in the file.

A lab VM that died or froze (labvm's exit 125: the emulator, not a test) costs only its file: it runs again
in a new lab VM without the tests that had passed (lab/plugins/kata_lab_resume.py), up to ``attempts``
boots per file. So is a run whose only failures are a nested guest's oops that the emulator causes (a
wrong GS base, lab/plugins/kata_lab_resume.py exits 125 for it). Any other test failure is never retried.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# lab/labvm's exit status when the lab VM itself died or froze (its own LABVM_FAILED)
LABVM_FAILED = 125
# expected seconds per test of a file never timed (the lab tests take ~30 s each under TCG)
SECONDS_PER_TEST = 30.0


@dataclass
class Shard:
    """One test file and what its lab VM boots need."""

    path: str
    tests: int
    expected: float
    logdir: Path
    attempts: int = 0
    seconds: float = 0.0
    code: int | None = None

    @property
    def stem(self) -> str:
        return self.path.replace("/", "_").removesuffix(".py")

    @property
    def passed_file(self) -> Path:
        """Where kata_lab_resume writes each of this file's passed tests."""
        return self.logdir / f"passed-{self.stem}.txt"

    @property
    def log(self) -> Path:
        """This file's lab VM output (every boot's)."""
        return self.logdir / f"{self.stem}.log"


# (shard, resume) -> the argv of one lab VM run for that shard
Command = Callable[[Shard, bool], list[str]]


def files_of(nodeids: Iterable[str]) -> Counter[str]:
    """Tests per file, from pytest node ids (``path::name[param]``)."""
    return Counter(n.split("::", 1)[0] for n in nodeids if "::" in n)


def plan(counts: Counter[str], durations: dict[str, float], logdir: Path) -> list[Shard]:
    """One shard per file, the longest expected first."""
    shards = [
        Shard(path=path, tests=n, expected=durations.get(path, n * SECONDS_PER_TEST), logdir=logdir)
        for path, n in counts.items()
    ]
    shards.sort(key=lambda s: (-s.expected, s.path))
    return shards


def load_durations(logdir: Path) -> dict[str, float]:
    try:
        data = json.loads((logdir / "durations.json").read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}


def save_durations(logdir: Path, shards: list[Shard]) -> None:
    """Record the files that passed in their first lab VM (a retried file's time says nothing)."""
    durations = load_durations(logdir)
    durations.update({s.path: round(s.seconds, 1) for s in shards if s.code == 0 and s.attempts == 1})
    (logdir / "durations.json").write_text(json.dumps(durations, indent=1, sort_keys=True) + "\n")


def run(
    shards: list[Shard],
    command: Command,
    *,
    workers: int,
    attempts: int,
    say: Callable[[str], None],
    poll: float = 0.5,
) -> list[Shard]:
    """Run every shard, at most ``workers`` at a time; returns them with their exit codes and times.

    Each shard's output goes to its log file, printed whole (``say``) when the shard ends."""
    queue = list(shards)
    running: dict[int, tuple[Shard, subprocess.Popen[bytes], float]] = {}
    slot_free = list(range(workers, 0, -1))
    for s in shards:
        s.passed_file.unlink(missing_ok=True)
        s.log.unlink(missing_ok=True)
    try:
        while queue or running:
            while queue and slot_free:
                shard = queue.pop(0)
                slot = slot_free.pop()
                shard.attempts += 1
                resume = shard.attempts > 1
                with shard.log.open("ab") as out:
                    proc = subprocess.Popen(
                        command(shard, resume), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                    )
                running[slot] = (shard, proc, time.monotonic())
                again = f" again ({shard.attempts} of {attempts})" if resume else ""
                say(f"lab VM {slot}: {shard.path}{again} ({shard.tests} tests)")
            time.sleep(poll)
            for slot, (shard, proc, started) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[slot]
                slot_free.append(slot)
                shard.seconds += time.monotonic() - started
                shard.code = code
                if code == LABVM_FAILED and shard.attempts < attempts:
                    passed = shard.passed_file
                    done = len(passed.read_text().splitlines()) if passed.exists() else 0
                    say(
                        f"LAB VM FAILURE, not a test failure: the lab VM running {shard.path} died or froze "
                        f"after {done} of its tests passed; its other tests run again in a new lab VM"
                    )
                    queue.insert(0, shard)
                    continue
                verdict = "passed" if code == 0 else f"FAILED (labvm exit {code})"
                say(
                    f"===== {shard.path}: {verdict} in {shard.seconds:.0f} s, {shard.attempts} lab VM(s); "
                    f"its output ({shard.log}):\n{shard.log.read_text(errors='replace').rstrip()}\n"
                    f"===== end of {shard.path}"
                )
    finally:
        for _shard, proc, _started in running.values():
            proc.terminate()
        for _shard, proc, _started in running.values():
            proc.wait()
    return shards
