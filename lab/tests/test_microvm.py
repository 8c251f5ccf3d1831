"""lab/framework/microvm.py on the host (not marked ``lab``): a guest that is late says why."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from framework.microvm import (
    FIRMWARE_HANDOVER,
    GuestConfig,
    LabPlatformWarning,
    MicroVM,
    MicroVMTimeout,
    QemuBackend,
    QmpClient,
)


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

    def monitor_args(self, path: Path, log: Path) -> list[str]:
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


class TcgTinyKernel(QemuBackend):
    """QEMU under TCG booting a tiny bzImage that prints nothing: the console stops at the firmware's
    "Booting from ROM..."."""

    def command(self, config: GuestConfig) -> list[str]:
        return [
            "qemu-system-x86_64", "-accel", "tcg", "-M", "q35", "-m", "64", "-nographic", "-nodefaults",
            "-no-user-config", "-serial", "stdio", "-no-reboot", "-kernel", str(config.kernel),
        ]  # fmt: skip


def _reset_each_boot(vm: MicroVM, boots: int, stop: threading.Event) -> None:
    """Reset the guest (QMP system_reset: QEMU -no-reboot then exits 0) once the firmware handed over."""
    done = 0
    while done < boots and not stop.is_set():
        proc = vm.proc  # this boot's QEMU: MicroVM replaces vm.proc when it boots the guest again
        running = proc is not None and proc.poll() is None
        if running and FIRMWARE_HANDOVER.search(vm.console):
            try:
                with QmpClient(vm.monitor_path) as qmp:
                    qmp.execute("system_reset")
                done += 1
                # wait for THIS QEMU to exit: re-reading vm.proc here would wait on the next boot's QEMU
                # when MicroVM boots the guest again before this loop sees the exit
                while proc.poll() is None and not stop.is_set():
                    time.sleep(0.05)
            except (OSError, ValueError):
                pass
        time.sleep(0.05)


def test_a_guest_reset_before_its_kernel_printed_is_booted_once_more_then_reported(tmp_path: Path) -> None:
    """The lab's emulated nested SVM sometimes resets a QEMU guest before its kernel prints a byte: the
    guest is booted once more with a LabPlatformWarning; a second early reset fails with the CPU state."""
    from kata_vmm import testing as tk

    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(tk.tiny_bzimage(tk.HALT_FOREVER))
    vm = MicroVM(TcgTinyKernel(), GuestConfig(kernel=kernel), tmp_path, "early")
    stop = threading.Event()
    resetter = threading.Thread(target=_reset_each_boot, args=(vm, 2, stop))
    vm.spawn()
    resetter.start()
    try:
        warned = pytest.warns(LabPlatformWarning, match="reset before its kernel printed anything")
        with warned, pytest.raises(MicroVMTimeout) as caught:
            vm.wait_for_console("NEVER-PRINTED", timeout=120)
    finally:
        stop.set()
        resetter.join()
        vm.kill()
    assert vm.early_resets == 1
    assert "qemu exited (0) before 'NEVER-PRINTED'" in str(caught.value)
    assert "--- CPU state at the last reset ---" in str(caught.value)
    assert re.search(r"[RE]IP=[0-9a-f]+", str(caught.value)), str(caught.value)
    assert FIRMWARE_HANDOVER.search((tmp_path / "early.console.1").read_text())
