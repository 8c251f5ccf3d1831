"""pytest plugin for `nox -s lab`: tests that passed in a lab VM that then died are not run again.

The lab VM (QEMU's TCG emulation of nested SVM) may crash or freeze on its own (lab/README.md, "The lab VM's
own failures"). `nox -s lab` then boots another lab VM; without this plugin that VM runs the whole selection
again (~20 minutes). With it, each run appends each passed test's node id to the file named by
``KATA_LAB_PASSED`` as the test finishes, and the next run (``KATA_LAB_RESUME=1``) deselects those, saying
how many it leaves out. A test that failed, errored or was skipped is not recorded, so it runs again.
Without the variables the plugin does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PASSED_ENV = "KATA_LAB_PASSED"
RESUME_ENV = "KATA_LAB_RESUME"

_not_passed: set[str] = set()


def _passed_file() -> Path | None:
    name = os.environ.get(PASSED_ENV)
    return Path(name) if name else None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = _passed_file()
    if path is None:
        return
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
