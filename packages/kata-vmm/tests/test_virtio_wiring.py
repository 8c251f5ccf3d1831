"""kata-virtio devices on the VMM: specs, CLI flags and (on /dev/kvm) doorbells served on the event thread."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kata_vmm import (
    BlockSpec,
    FsSpec,
    NetSpec,
    RngSpec,
    VmConfig,
    Vmm,
    VsockSpec,
)
from kata_vmm import testing as tk
from kata_vmm._cli import main, parse_block, parse_fs, parse_net
from kata_vmm._errors import ConfigError
from kata_vmm._layout import VIRTIO_MMIO_START
from kata_vmm._memory import GuestAddress

KernelFactory = Callable[[bytes], Path]
needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")


def test_block_spec_parses_path_and_read_only() -> None:
    assert parse_block("/img/a.raw") == BlockSpec(Path("/img/a.raw"), False)
    assert parse_block("/img/a.raw,ro") == BlockSpec(Path("/img/a.raw"), True)
    with pytest.raises(ConfigError, match="unknown option 'sync'"):
        parse_block("/img/a.raw,sync")


def test_net_spec_parses_tap_and_mac() -> None:
    assert parse_net("tap0") == NetSpec("tap0")
    assert parse_net("tap0,mac=52:54:00:12:34:56") == NetSpec("tap0", "52:54:00:12:34:56")
    for bad in ("tap0,mac=52:54:00:12:34", "tap0,mac=zz:54:00:12:34:56", "tap0,queues=2", ",mac=1"):
        with pytest.raises(ConfigError):
            parse_net(bad)


def test_net_spec_with_an_open_fd_wraps_it_and_opens_no_tap() -> None:
    # A tap opened in another netns arrives as an fd; build() must not open /dev/net/tun here.
    left, right = os.pipe()
    device = NetSpec("tap0_kata", "52:54:00:12:34:56", fd=left).build()
    try:
        assert device.fd == left  # type: ignore[attr-defined]
        assert device.mac == bytes.fromhex("525400123456")  # type: ignore[attr-defined]
    finally:
        device.close()  # type: ignore[attr-defined]
        os.close(right)
    with pytest.raises(OSError):
        os.fstat(left)  # the device owned the fd


def test_fs_spec_needs_tag_and_directory() -> None:
    assert parse_fs("shared=/srv/x") == FsSpec("shared", Path("/srv/x"))
    for bad in ("shared", "=/srv/x", "shared="):
        with pytest.raises(ConfigError, match="TAG=DIR"):
            parse_fs(bad)


def test_cli_rejects_bad_device_flags_with_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    assert main(["run", "--kernel", str(kernel), "--block", "x.img,bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown option 'bogus'" in err


@pytest.mark.parametrize("flag", [["--block", "/nonexistent/disk.img"], ["--fs", "t=/nonexistent/dir"]])
@pytest.mark.kvm
@needs_kvm
def test_cli_reports_missing_device_backing_as_bad_input(
    make_kernel: KernelFactory,
    flag: list[str],
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sys.stdin", None)
    kernel = make_kernel(tk.HALT_FOREVER)
    assert main(["run", "--kernel", str(kernel), "--memory", "32", *flag]) == 2
    assert "/nonexistent/" in capfd.readouterr().err


# --- on /dev/kvm: a hand-written driver in guest RAM, the guest itself just spins -----------------------
RING = 0x400_0000  # 64 MiB: far from the tiny kernel, its page tables and the ACPI tables
QSIZE = 8
VIRTQ_DESC_F_WRITE = 2


class HostDriver:
    """Drives one virtio-mmio slot of a running Vmm from the test thread, as a guest driver would."""

    def __init__(self, vmm: Vmm, slot: int, ring: int) -> None:
        assert vmm.memory is not None
        self.vmm, self.mem = vmm, vmm.memory
        self.base = VIRTIO_MMIO_START + 0x1000 * slot
        self.desc, self.avail, self.used = ring, ring + 0x1000, ring + 0x2000
        self.buffers = ring + 0x3000
        self.avail_idx = 0

    def reg(self, offset: int, value: int | None = None) -> int:
        if value is None:
            return int(struct.unpack("<I", self.vmm.mmio_bus.read(self.base + offset, 4))[0])
        self.vmm.mmio_bus.write(self.base + offset, struct.pack("<I", value))
        return value

    def bring_up(self, queues: int) -> None:
        assert self.reg(0x000) == 0x74726976 and self.reg(0x004) == 2
        for status in (0, 1, 3):
            self.reg(0x070, status)
        self.reg(0x024, 1)
        self.reg(0x020, 1)  # VIRTIO_F_VERSION_1 only
        self.reg(0x070, 0xB)
        assert self.reg(0x070) & 8
        for q in range(queues):
            self.reg(0x030, q)
            self.reg(0x038, QSIZE)
            off = 0x10000 * q
            for reg, addr in ((0x080, self.desc), (0x090, self.avail), (0x0A0, self.used)):
                self.reg(reg, addr + off)
                self.reg(reg + 4, 0)
            self.reg(0x044, 1)
        self.reg(0x070, 0xF)
        assert self.reg(0x070) == 0xF

    def post_writable(self, length: int) -> int:
        """Publish one device-writable buffer on queue 0; returns its guest address."""
        head = self.avail_idx % QSIZE
        addr = self.buffers + 0x1000 * head
        self.mem.write(GuestAddress(self.desc + 16 * head), struct.pack("<QIHH", addr, length, 2, 0))
        self.mem.write(GuestAddress(self.avail + 4 + 2 * head), struct.pack("<H", head))
        self.avail_idx += 1
        self.mem.write(GuestAddress(self.avail + 2), struct.pack("<H", self.avail_idx))
        return addr

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.mem.read(GuestAddress(self.used + 2), 2))[0])

    def wait_used(self, idx: int, timeout: float = 5) -> None:
        deadline = time.monotonic() + timeout
        while self.used_idx() < idx:
            assert time.monotonic() < deadline, f"used idx stuck at {self.used_idx()} < {idx}"
            time.sleep(0.005)


@pytest.mark.kvm
@needs_kvm
@pytest.mark.usefixtures("no_leaks")
def test_virtio_devices_get_slots_and_are_served_on_the_event_thread(
    make_kernel: KernelFactory, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 16)
    shared = tmp_path / "shared"
    shared.mkdir()
    vmm = Vmm()
    try:
        vmm.configure(
            VmConfig(
                kernel=make_kernel(tk.spin_forever()),
                memory_mib=128,
                devices=[
                    RngSpec(),
                    BlockSpec(image, read_only=True),
                    VsockSpec(tmp_path / "v.sock"),
                    FsSpec("shared", shared),
                ],
            )
        )
        assert [r.base for r in vmm.mmio_bus.devices()] == [VIRTIO_MMIO_START + 0x1000 * i for i in range(4)]
        vmm.start()
        assert len(vmm.threads()) == 2  # one vCPU, one event thread: devices add no thread
        assert (tmp_path / "v.sock").exists()
        rng = HostDriver(vmm, 0, RING)
        assert rng.reg(0x008) == 4  # device id: entropy
        rng.bring_up(1)
        virtio = vmm._virtio[0]
        # the ioeventfd path: KVM would signal the queue-0 doorbell; do what it does
        addr = rng.post_writable(64)
        os.eventfd_write(virtio.doorbells[0].fd, 1)
        rng.wait_used(1)
        assert rng.mem.read(GuestAddress(addr), 64) != bytes(64)
        assert rng.reg(0x060) & 1  # used-buffer interrupt pending
        rng.reg(0x064, 1)
        # a QueueNotify write no ioeventfd caught (vCPU exit path) is forwarded to the event thread
        rng.post_writable(32)
        rng.reg(0x050, 0)
        rng.wait_used(2)
        blk = HostDriver(vmm, 1, RING + 0x100000)
        assert blk.reg(0x008) == 2
        assert struct.unpack("<Q", vmm.mmio_bus.read(blk.base + 0x100, 8))[0] == 8  # 4 KiB = 8 sectors
        assert vmm.event_loop is not None and vmm.event_loop.errors == []
    finally:
        vmm.close()
    assert not (tmp_path / "v.sock").exists()


@pytest.mark.kvm
@needs_kvm
def test_a_device_that_cannot_open_releases_the_ones_before_it(tmp_path: Path) -> None:
    kernel = tmp_path / "k.bzImage"
    kernel.write_bytes(tk.tiny_bzimage(tk.HALT_FOREVER))
    vmm = Vmm()
    with pytest.raises(ConfigError, match="cannot open block image"):
        vmm.configure(
            VmConfig(
                kernel=kernel,
                memory_mib=32,
                devices=[VsockSpec(tmp_path / "v.sock"), BlockSpec(tmp_path / "missing.img")],
            )
        )
    vmm.close()
    assert not (tmp_path / "v.sock").exists()
