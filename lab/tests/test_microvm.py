"""lab/framework/microvm.py on the host (not marked ``lab``): a guest that is late says why."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1]
if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))

from framework.microvm import GuestConfig, MicroVM, MicroVMTimeout, QemuBackend  # noqa: E402


class TcgFirmwareOnly(QemuBackend):
    """QEMU under TCG with no kernel and no boot device: the firmware runs and never prints our marker."""

    def command(self, config: GuestConfig) -> list[str]:
        return [
            "qemu-system-x86_64", "-accel", "tcg", "-M", "q35", "-m", "64", "-nographic", "-nodefaults",
            "-no-user-config", "-serial", "stdio",
        ]  # fmt: skip


class SleepBackend(TcgFirmwareOnly):
    """A "VMM" without a monitor that never prints anything."""

    name = "sleep"

    def command(self, config: GuestConfig) -> list[str]:
        return ["sleep", "600"]

    def monitor_args(self, path: Path) -> list[str]:
        return []

    def probe(self, path: Path) -> str:
        return ""


def test_a_late_qemu_guest_reports_load_threads_run_state_and_rip(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 is missing: ./dev installs qemu-system-x86", pytrace=False)
    vm = MicroVM(TcgFirmwareOnly(), GuestConfig(kernel=Path("/nonexistent")), tmp_path, "late")
    vm.spawn()
    try:
        with pytest.raises(MicroVMTimeout) as caught:
            vm.wait_for_console("NEVER-PRINTED", timeout=3)
    finally:
        vm.kill()
    message = str(caught.value)
    assert "no 'NEVER-PRINTED' within 3 s on late" in message
    assert re.search(r"host load [0-9.]+ [0-9.]+ [0-9.]+; \d+ CPUs", message), message
    assert f"(pid {vm.proc.pid if vm.proc else 0})" in message
    assert "qemu-system-x86" in message  # the main thread's name, with its state and CPU seconds
    assert re.search(r"qemu: status running; vCPU 0 [RE]IP=[0-9a-f]+ [RE]FL=", message), message
    assert re.search(r"registers (did not )?move(d)? in 1 s", message), message


def test_a_late_guest_without_monitor_still_reports_threads(tmp_path: Path) -> None:
    vm = MicroVM(SleepBackend(), GuestConfig(kernel=Path("/nonexistent")), tmp_path, "quiet")
    vm.spawn()
    try:
        with pytest.raises(MicroVMTimeout) as caught:
            vm.wait_exit(timeout=1)
    finally:
        vm.kill()
    message = str(caught.value)
    assert "quiet still running after 1 s" in message
    assert f"threads of sleep (pid {vm.proc.pid if vm.proc else 0}): sleep S 0.0 s" in message, message
    assert "qemu:" not in message
    assert os.cpu_count() is not None and f"{os.cpu_count()} CPUs" in message
