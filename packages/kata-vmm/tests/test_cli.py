"""The ``kata-vmm run`` command: exit codes and one-line errors, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kata_vmm import testing as tk

KernelFactory = Callable[[bytes], Path]
needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")


def kata_vmm(
    *args: str | Path, stdin: bytes = b"", timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "kata_vmm._cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[bytes], code: int, text: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == code, err
    assert err.count("\n") == 1, err
    assert err.startswith("kata-vmm: ")
    assert text in err
    assert "Traceback" not in err


@pytest.mark.kvm
@needs_kvm
def test_run_prints_console_and_exits_zero_on_power_off(make_kernel: KernelFactory) -> None:
    kernel = make_kernel(tk.print_serial(b"KATA-OK\n") + tk.ACPI_POWER_OFF + tk.HALT_FOREVER)
    result = kata_vmm("run", "--kernel", kernel, "--memory", "32", "--vcpus", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"KATA-OK\n"
    assert result.stderr == b""


@pytest.mark.kvm
@needs_kvm
def test_run_echoes_stdin_through_the_serial_console(make_kernel: KernelFactory) -> None:
    kernel = make_kernel(tk.echo_one_serial_byte() + tk.I8042_RESET + tk.HALT_FOREVER)
    result = kata_vmm("run", "--kernel", kernel, "--memory", "32", stdin=b"Q")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"Q"


@pytest.mark.kvm
@needs_kvm
def test_triple_fault_exits_one_with_a_clear_message(make_kernel: KernelFactory) -> None:
    result = kata_vmm("run", "--kernel", make_kernel(tk.UD2), "--memory", "32")
    assert_one_line_error(result, 1, "triple fault")


@pytest.mark.kvm
@needs_kvm
def test_hung_guest_times_out(make_kernel: KernelFactory) -> None:
    result = kata_vmm("run", "--kernel", make_kernel(tk.spin_forever()), "--memory", "32", "--timeout", "0.5")
    assert_one_line_error(result, 124, "did not power off within 0.5 s")


@pytest.mark.kvm
@needs_kvm
def test_stats_are_printed_as_json(make_kernel: KernelFactory) -> None:
    kernel = make_kernel(tk.print_serial(b"x") + tk.I8042_RESET)
    result = kata_vmm("run", "--kernel", kernel, "--memory", "32", "--stats")
    assert result.returncode == 0
    assert result.stdout == b"x"  # flushed at exit although no newline came
    stats = json.loads(result.stderr)
    assert stats["exits"] == {"io": 2}
    assert stats["io_ports"] == {str(0x3F8): 1, str(0x64): 1}


@pytest.mark.kvm
@needs_kvm
@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--kernel", "/nonexistent/bzImage"], "kernel not found: /nonexistent/bzImage"),
        (["--memory", "4"], "memory must be at least 32 MiB"),
        (["--vcpus", "4096"], "vcpus must be between 1 and"),
        (["--initrd", "/nonexistent/initrd"], "initrd not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_two(make_kernel: KernelFactory, args: list[str], text: str) -> None:
    base = ["--kernel", str(make_kernel(tk.HALT_FOREVER)), "--memory", "32"]
    result = kata_vmm("run", *base, *args)
    assert_one_line_error(result, 2, text)


@pytest.mark.kvm
@needs_kvm
def test_corrupt_kernel_is_one_line_and_exit_two(tmp_path: Path) -> None:
    bad = tmp_path / "bzImage"
    bad.write_bytes(b"\x00" * 100)
    result = kata_vmm("run", "--kernel", bad, "--memory", "32")
    assert_one_line_error(result, 2, "not a Linux kernel image")


def test_missing_arguments_are_a_usage_error() -> None:
    result = kata_vmm("run")
    assert result.returncode == 2
    assert b"--kernel" in result.stderr
    assert b"Traceback" not in result.stderr


def test_extract_vmlinux_of_a_non_kernel_is_one_line_and_exit_two(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(bytes(8192))
    result = kata_vmm("extract-vmlinux", junk, tmp_path / "vmlinux")
    assert_one_line_error(result, 2, "not a bzImage")
    assert not (tmp_path / "vmlinux").exists()


def _waits_then_prints_done() -> bytes:
    """Prints SNAP, makes 30,000 port-I/O exits (long enough for the host to snapshot it meanwhile),
    prints DONE and powers off."""
    loop = bytes.fromhex("b930750000") + bytes.fromhex("e680ffc975fa")  # mov ecx, 30000; out; dec; jnz
    return (
        tk.print_serial(b"SNAP\n") + loop + tk.print_serial(b"DONE\n") + tk.ACPI_POWER_OFF + tk.HALT_FOREVER
    )


@pytest.mark.kvm
@needs_kvm
def test_snapshot_on_marker_then_restore_twice_continues_the_guest(
    make_kernel: KernelFactory, tmp_path: Path
) -> None:
    kernel = make_kernel(_waits_then_prints_done())
    snap = tmp_path / "snap"
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    run = ["run", "--kernel", kernel, "--memory", "32", "--block", disk]
    result = kata_vmm(*run, "--snapshot-on", "SNAP", "--snapshot-dir", snap)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"SNAP\n"  # stopped before DONE
    assert result.stderr.decode() == f"kata-vmm: snapshot written to {snap}\n"
    copy = tmp_path / "copy.img"
    copy.write_bytes(disk.read_bytes())
    for devices in ([], ["--block", copy]):  # the saved disk, then a clone's own copy in its place
        restored = kata_vmm("restore", snap, "--timeout", "120", *devices, timeout=180)
        assert restored.returncode == 0, restored.stderr
        assert restored.stdout == b"DONE\n"
    wrong = kata_vmm("restore", snap, "--rng")
    assert_one_line_error(wrong, 2, "the snapshot has devices ['block'], the config ['rng']")


def test_restore_of_something_else_is_one_line_and_exit_two(tmp_path: Path) -> None:
    result = kata_vmm("restore", tmp_path)
    assert_one_line_error(result, 2, "is not a kata-vmm snapshot")


@pytest.mark.kvm
@needs_kvm
def test_snapshot_on_without_a_directory_is_bad_input(make_kernel: KernelFactory) -> None:
    result = kata_vmm("run", "--kernel", make_kernel(tk.HALT_FOREVER), "--snapshot-on", "X")
    assert_one_line_error(result, 2, "--snapshot-on and --snapshot-dir go together")
