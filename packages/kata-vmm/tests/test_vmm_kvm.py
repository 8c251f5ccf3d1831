"""The whole Vmm on the host's /dev/kvm with tiny bzImages: boot, devices, exits, threads, teardown."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kata_vmm import (
    ConfigError,
    ExitKind,
    KernelLoadError,
    VcpuState,
    VmConfig,
    Vmm,
    VmmState,
    VmStateError,
)
from kata_vmm import testing as tk
from kata_vmm._layout import VIRTIO_MMIO_START

KernelFactory = Callable[[bytes], Path]

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"),
    pytest.mark.usefixtures("no_leaks"),
]


def boot(kernel: Path, *, vcpus: int = 1, timeout: float = 20, **kwargs: object) -> tuple[Vmm, bytes]:
    out: list[bytes] = []
    vmm = Vmm()
    vmm.configure(VmConfig(kernel=kernel, vcpus=vcpus, memory_mib=32, console_output=out.append, **kwargs))  # type: ignore[arg-type]
    vmm.start()
    vmm.wait(timeout)
    return vmm, b"".join(out)


def test_guest_prints_on_serial_and_resets_cleanly(make_kernel: KernelFactory) -> None:
    vmm, out = boot(make_kernel(tk.print_serial(b"hello\n") + tk.I8042_RESET + tk.HALT_FOREVER))
    try:
        assert out == b"hello\n"
        assert vmm.exit_status is not None
        assert vmm.exit_status.kind is ExitKind.RESET
        assert vmm.exit_status.clean
        assert vmm.state is VmmState.EXITED
        stats = vmm.statistics()
        assert stats.exits["io"] == 7
        assert stats.io_ports[0x3F8] == 6
        assert stats.console_bytes_out == 6
        assert stats.summary().startswith("vCPUs ran ") and "; exits: io 7 (" in stats.summary()
    finally:
        vmm.close()


def test_acpi_s5_write_powers_the_guest_off(make_kernel: KernelFactory) -> None:
    vmm, _ = boot(make_kernel(tk.ACPI_POWER_OFF + tk.HALT_FOREVER))
    try:
        assert vmm.exit_status is not None
        assert vmm.exit_status.kind is ExitKind.POWER_OFF
    finally:
        vmm.close()


def test_triple_fault_is_reported_as_unclean_exit(make_kernel: KernelFactory) -> None:
    vmm, _ = boot(make_kernel(tk.UD2))
    try:
        assert vmm.exit_status is not None
        assert vmm.exit_status.kind is ExitKind.TRIPLE_FAULT
        assert not vmm.exit_status.clean
        assert vmm.exit_status.vcpu == 0
    finally:
        vmm.close()


def test_console_input_reaches_the_guest(make_kernel: KernelFactory) -> None:
    read_fd, write_fd = os.pipe()
    try:
        kernel = make_kernel(tk.echo_one_serial_byte() + tk.I8042_RESET + tk.HALT_FOREVER)
        os.write(write_fd, b"Z")
        vmm, out = boot(kernel, console_input=read_fd)
        try:
            assert vmm.exit_status is not None and vmm.exit_status.kind is ExitKind.RESET
            assert out == b"Z"
            assert vmm.statistics().console_bytes_in == 1
        finally:
            vmm.close()
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_wait_times_out_and_stop_ends_a_spinning_guest(make_kernel: KernelFactory) -> None:
    vmm = Vmm()
    vmm.configure(VmConfig(kernel=make_kernel(tk.spin_forever()), vcpus=2, memory_mib=32))
    vmm.start()
    try:
        assert vmm.wait(0.3) is None
        names = sorted(t.name for t in vmm.threads())
        assert names == ["kata-vcpu-0", "kata-vcpu-1", "kata-vmm-events"]
        status = vmm.stop()
        assert status.kind is ExitKind.STOPPED
        assert vmm.vcpu_states() == [VcpuState.EXITED, VcpuState.EXITED]
    finally:
        vmm.close()
    assert not any(t.is_alive() for t in vmm.threads())


def test_pause_and_resume_a_running_guest(make_kernel: KernelFactory) -> None:
    vmm = Vmm()
    vmm.configure(VmConfig(kernel=make_kernel(tk.spin_forever()), memory_mib=32))
    vmm.start()
    try:
        deadline = time.monotonic() + 5
        while vmm.vcpu_states() != [VcpuState.RUNNING] and time.monotonic() < deadline:
            time.sleep(0.01)
        vmm.pause()
        assert vmm.state is VmmState.PAUSED
        assert vmm.vcpu_states() == [VcpuState.PAUSED]
        with pytest.raises(VmStateError):
            vmm.pause()
        vmm.resume()
        assert vmm.state.value == "running"
        while vmm.vcpu_states() != [VcpuState.RUNNING] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert vmm.vcpu_states() == [VcpuState.RUNNING]
    finally:
        vmm.close()


class ScratchRegister:
    """An MMIO device with one 32-bit register, for the add_device test."""

    def __init__(self) -> None:
        self.value = 0x11223344
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return self.value.to_bytes(4, "little")[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def test_added_mmio_device_gets_a_slot_and_sees_guest_accesses(make_kernel: KernelFactory) -> None:
    base = VIRTIO_MMIO_START
    # mov eax, [base]; mov [base + 4], eax (64-bit absolute moffs forms)
    code = b"\xa1" + base.to_bytes(8, "little") + b"\xa3" + (base + 4).to_bytes(8, "little")
    device = ScratchRegister()
    vmm = Vmm()
    vmm.configure(VmConfig(kernel=make_kernel(code + tk.I8042_RESET + tk.HALT_FOREVER), memory_mib=32))
    try:
        slot = vmm.add_device(lambda mem, irq, slot: device)
        assert (slot.index, slot.base, slot.gsi) == (0, base, 5)
        vmm.start()
        status = vmm.wait(20)
        assert status is not None and status.kind is ExitKind.RESET
        assert device.writes == [(4, (0x11223344).to_bytes(4, "little"))]
        assert vmm.statistics().exits["mmio"] == 2
    finally:
        vmm.close()


def test_smp_guest_boots_on_the_first_vcpu(make_kernel: KernelFactory) -> None:
    vmm, out = boot(make_kernel(tk.print_serial(b"smp\n") + tk.I8042_RESET + tk.HALT_FOREVER), vcpus=4)
    try:
        assert out == b"smp\n"
        assert len(vmm.statistics().per_vcpu) == 4
    finally:
        vmm.close()


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"kernel": Path("/nonexistent/vmlinuz")}, KernelLoadError, "kernel not found"),
        ({"memory_mib": 8}, ConfigError, "at least 32 MiB"),
        ({"vcpus": 100000}, ConfigError, "vcpus must be between 1 and"),
        ({"vcpus": 0}, ConfigError, "vcpus must be between 1 and"),
        ({"initrd": Path("/nonexistent/initrd")}, KernelLoadError, "initrd not found"),
        ({"cmdline": "x" * 5000}, KernelLoadError, "command line"),
    ],
)
def test_bad_input_fails_cleanly_without_leaks(
    make_kernel: KernelFactory, config: dict[str, object], error: type[Exception], message: str
) -> None:
    values: dict[str, object] = {"kernel": make_kernel(tk.HALT_FOREVER), "memory_mib": 32, **config}
    vmm = Vmm()
    try:
        with pytest.raises(error, match=message):
            vmm.configure(VmConfig(**values))  # type: ignore[arg-type]
            vmm.start()
    finally:
        vmm.close()


def test_corrupt_kernel_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "garbage"
    bad.write_bytes(os.urandom(4096))
    vmm = Vmm()
    vmm.configure(VmConfig(kernel=bad, memory_mib=32))
    try:
        with pytest.raises(KernelLoadError, match="not a bzImage or ELF kernel"):
            vmm.start()
    finally:
        vmm.close()


def test_kernel_too_big_for_memory_is_rejected(tmp_path: Path) -> None:
    kernel = tmp_path / "huge"
    kernel.write_bytes(tk.tiny_bzimage(tk.HALT_FOREVER, init_size=64 << 20))
    vmm = Vmm()
    vmm.configure(VmConfig(kernel=kernel, memory_mib=32))
    try:
        with pytest.raises(KernelLoadError, match="MiB of guest memory"):
            vmm.start()
    finally:
        vmm.close()


def test_operations_out_of_order_raise_state_errors(make_kernel: KernelFactory) -> None:
    vmm = Vmm()
    with pytest.raises(VmStateError):
        vmm.start()
    with pytest.raises(VmStateError):
        vmm.wait(0)
    vmm.configure(VmConfig(kernel=make_kernel(tk.HALT_FOREVER), memory_mib=32))
    with pytest.raises(VmStateError):
        vmm.configure(VmConfig(kernel=make_kernel(tk.HALT_FOREVER), memory_mib=32))
    vmm.close()
    vmm.close()  # idempotent


def test_vmm_can_be_driven_from_a_non_main_thread(make_kernel: KernelFactory) -> None:
    kernel = make_kernel(tk.print_serial(b"t\n") + tk.I8042_RESET)
    result: list[object] = []

    def run() -> None:
        vmm, out = boot(kernel)
        result.append((vmm.exit_status, out))
        vmm.close()

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert result[0] == (result[0][0], b"t\n")  # type: ignore[index]


def test_pvh_elf_kernel_starts_in_protected_mode_with_start_info_in_ebx(tmp_path: Path) -> None:
    # mov dx, 0x3f8; mov al, [ebx] (first byte of the hvm_start_info magic); out dx, al; reset
    code = tk.MOV_DX_COM1 + bytes.fromhex("8a03") + tk.OUT_DX_AL + tk.I8042_RESET + tk.HALT_FOREVER
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(tk.tiny_pvh_elf(code))
    vmm, out = boot(kernel)
    try:
        assert vmm.exit_status is not None and vmm.exit_status.kind is ExitKind.RESET
        assert out == bytes([0x336EC578 & 0xFF])
    finally:
        vmm.close()


def _readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_exit_fd_becomes_readable_when_the_guest_resets(make_kernel: KernelFactory) -> None:
    vmm = Vmm()
    vmm.configure(VmConfig(kernel=make_kernel(tk.I8042_RESET + tk.HALT_FOREVER), memory_mib=32))
    fd = vmm.exit_fd()
    assert not _readable(fd)
    vmm.start()
    try:
        assert _readable(fd, 20)
        # level-triggered and not consumed: a second poll sees it too, and wait() returns at once
        assert _readable(fd)
        status = vmm.wait(0)
        assert status is not None and status.kind is ExitKind.RESET
    finally:
        vmm.close()
    with pytest.raises(VmStateError, match="after close"):
        vmm.exit_fd()


def test_exit_fd_stays_quiet_while_the_guest_runs_and_fires_on_stop(make_kernel: KernelFactory) -> None:
    vmm = Vmm()
    vmm.configure(VmConfig(kernel=make_kernel(tk.spin_forever()), memory_mib=32))
    vmm.start()
    try:
        assert not _readable(vmm.exit_fd(), 0.3)
        vmm.pause()
        vmm.resume()
        assert not _readable(vmm.exit_fd())
        vmm.stop_nowait()
        assert _readable(vmm.exit_fd(), 10)
    finally:
        vmm.close()


def test_vmm_threads_carry_their_names_at_the_os_level(make_kernel: KernelFactory) -> None:
    vmm = Vmm()
    vmm.configure(VmConfig(kernel=make_kernel(tk.spin_forever()), vcpus=2, memory_mib=32))
    # started from a thread with another OS name: the VMM's threads must not inherit it
    starter = threading.Thread(target=vmm.start, name="some-worker")
    starter.start()
    starter.join()
    try:
        comms = sorted(Path(f"/proc/self/task/{t.native_id}/comm").read_text().strip() for t in vmm.threads())
        assert comms == ["kata-vcpu-0", "kata-vcpu-1", "kata-vmm-events"]
    finally:
        vmm.close()
