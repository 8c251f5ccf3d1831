"""pytest plugin for `nox -s lab`: tests that passed in a lab VM that then died are not run again.

The lab VM (QEMU's TCG emulation of nested SVM) may crash or freeze on its own (lab/README.md, "The lab VM's
own failures"). `nox -s lab` then boots another lab VM; without this plugin that VM runs the whole selection
again (~20 minutes). With it, each run appends each passed test's node id to the file named by
``KATA_LAB_PASSED`` as the test finishes, and the next run (``KATA_LAB_RESUME=1``) deselects those, saying
how many it leaves out. A test that failed, errored or was skipped is not recorded, so it runs again.
Without the variables the plugin does nothing.

The same emulator also breaks nested guests in one known way (lab/README.md): a guest kernel takes a page
fault on a GS-relative load in kernel mode, i.e. it runs with a GS base that is not its own (the per-CPU
area it reads through %gs is always mapped). Neither kata-vmm nor the shim touches a running guest's GS
base, and a kernel's own bug does not look like this. When every failed test of a run shows that oops
(its ``RIP: 0010:`` line followed by a ``Code:`` line whose faulting byte is ``<65>``, the GS prefix), the
run exits with the lab VM's failure status (125): `nox -s lab` then boots a new lab VM for the file and
runs the tests that had not passed, within its per-file limit of lab VM boots, and says so. Any other
failure in the run keeps pytest's status: nothing else is run again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

PASSED_ENV = "KATA_LAB_PASSED"
RESUME_ENV = "KATA_LAB_RESUME"
# lab/labvm's and lab/shards.py's status for "the lab VM (the emulator) failed, not a test"
LABVM_FAILED = 125

_not_passed: set[str] = set()
# failed tests -> whether their report shows the emulator's wrong-GS-base oops in a nested guest
_failed: dict[str, bool] = {}

_OOPS_RIP = re.compile(r"RIP: 0010:(?P<where>[\w.]+\+0x[0-9a-f]+/0x[0-9a-f]+)")
_OOPS_CODE = re.compile(r"Code: (?:[0-9a-f]{2} )*<(?P<byte>[0-9a-f]{2})>")


def wrong_gs_base_oops(text: str) -> str | None:
    """Where a guest kernel faulted on a GS-relative load in kernel mode (``function+off/len``), else None.

    A kernel oops prints ``RIP: 0010:function+off/len`` and, on one of the next lines, ``Code:`` with the
    faulting instruction's first byte in angle brackets; 0x65 is the GS segment prefix."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        rip = _OOPS_RIP.search(line)
        if rip is None:
            continue
        for after in lines[i + 1 : i + 3]:
            code = _OOPS_CODE.search(after)
            if code is not None:
                if code["byte"] == "65":
                    return rip["where"]
                break
    return None


def _passed_file() -> Path | None:
    name = os.environ.get(PASSED_ENV)
    return Path(name) if name else None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = _passed_file()
    if path is None:
        return
    if report.failed:
        emulator = wrong_gs_base_oops(report.longreprtext) is not None
        _failed[report.nodeid] = _failed.get(report.nodeid, True) and emulator
    if not report.passed:
        _not_passed.add(report.nodeid)
    elif report.when == "teardown" and report.nodeid not in _not_passed:
        # one line per test, written through at once: the lab VM may die during the next test
        with path.open("a") as out:
            out.write(report.nodeid + "\n")
            out.flush()
            os.fsync(out.fileno())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = _passed_file()
    if path is None or os.environ.get(RESUME_ENV) != "1" or not path.exists():
        return
    done = set(path.read_text().splitlines())
    kept = [item for item in items if item.nodeid not in done]
    left_out = [item for item in items if item.nodeid in done]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            what = f"{len(left_out)} tests passed in the lab VM that died; not run again"
            reporter.write_line(f"kata-lab-resume: {what}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _passed_file() is None or exitstatus != pytest.ExitCode.TESTS_FAILED or not _failed:
        return
    if not all(_failed.values()):
        return
    session.exitstatus = LABVM_FAILED
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        names = ", ".join(sorted(_failed))
        reporter.write_line(
            f"kata-lab-resume: EMULATOR FAILURE, not a test failure: a nested guest's kernel faulted on a "
            f"GS-relative load (a GS base not its own; lab/README.md) in {names}; exit {LABVM_FAILED} so "
            "that nox -s lab runs the tests that did not pass in a new lab VM"
        )
