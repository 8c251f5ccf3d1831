"""Snapshot and restore of a whole Vmm on the host's /dev/kvm with a tiny guest that counts.

The guest counts in %rbx, stores the count in memory and makes a port-I/O exit on every round, so a
pause lands after an exit KVM completes only on the next KVM_RUN as often as not.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kata_virtio import MmioTransport, VirtioBlock, VirtioRng
from kata_vmm import (
    SNAPSHOT_VERSION,
    BlockSpec,
    FsSpec,
    NetSpec,
    RngSpec,
    SnapshotError,
    VmConfig,
    Vmm,
    VmmBuilder,
    VmmState,
    VmStateError,
    VsockSpec,
    snapshot_config,
)
from kata_vmm._bindings import kvm as kvm_structs
from kata_vmm._errors import KvmError
from kata_vmm._kvm import Vcpu

KernelFactory = Callable[[bytes], Path]

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm"),
]

COUNTER = 0x200000
PORT = 0x80
# loop: inc rbx; mov [COUNTER], rbx; mov al, bl; out PORT, al; jmp loop
COUNTING_GUEST = (
    bytes.fromhex("48ffc3")
    + bytes.fromhex("48891c25")
    + struct.pack("<I", COUNTER)
    + bytes.fromhex("88d8")
    + bytes([0xE6, PORT])
    + bytes.fromhex("ebef")
)


def _config(kernel: Path, tmp_path: Path, name: str) -> VmConfig:
    return VmConfig(
        kernel=kernel,
        vcpus=1,
        memory_mib=32,
        devices=[RngSpec(), VsockSpec(tmp_path / f"{name}.sock")],
    )


def _count(vmm: Vmm) -> int:
    assert vmm.memory is not None
    return int.from_bytes(vmm.memory.read(COUNTER, 8), "little")


def _run_until(vmm: Vmm, above: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _count(vmm) <= above:
        assert vmm.exit_status is None, vmm.exit_status
        assert time.monotonic() < deadline, f"the guest did not count past {above} within {timeout} s"
        time.sleep(0.01)


def _rbx_rip(vmm: Vmm) -> tuple[int, int]:
    regs = vmm.machine.vcpus[0].get_regs()
    return int(regs.rbx), int(regs.rip)


@pytest.fixture
def snapshot(make_kernel: KernelFactory, tmp_path: Path) -> tuple[Path, Path, int, int, int]:
    """A counting guest snapshotted after it counted past 20: (directory, kernel, rbx, rip, count)."""
    kernel = make_kernel(COUNTING_GUEST)
    vmm = Vmm()
    try:
        vmm.configure(_config(kernel, tmp_path, "origin"))
        vmm.start()
        _run_until(vmm, 20)
        vmm.pause()
        rbx, rip = _rbx_rip(vmm)
        count = _count(vmm)
        vmm.snapshot(tmp_path / "snap")
        assert vmm.state is VmmState.PAUSED
        vmm.resume()  # the original goes on as if nothing happened
        _run_until(vmm, count + 5)
    finally:
        vmm.close()
    return tmp_path / "snap", kernel, rbx, rip, count


# loop: xor eax, eax; in al, PORT; inc rbx; mov [COUNTER], rbx; jmp loop
READING_GUEST = (
    bytes.fromhex("31c0")
    + bytes([0xE4, PORT])
    + bytes.fromhex("48ffc3")
    + bytes.fromhex("48891c25")
    + struct.pack("<I", COUNTER)
    + bytes.fromhex("ebef")
)
AFTER_IN = 4  # offset of the instruction after `in al, PORT`


class SlowPort:
    """A port that reads as 0x5a, counts its reads and takes a while to answer, so a pause nearly always
    finds the vCPU handling the IN exit rather than inside KVM_RUN."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, offset: int, size: int) -> bytes:
        self.reads += 1
        time.sleep(0.002)
        return b"\x5a" * size

    def write(self, offset: int, data: bytes) -> None:
        pass


@pytest.mark.usefixtures("no_leaks")
def test_an_io_exit_in_flight_at_the_pause_is_completed_before_the_state_is_read(
    make_kernel: KernelFactory, tmp_path: Path
) -> None:
    # KVM retires an IN (its data into %al, %rip past it) only on the next KVM_RUN: a vCPU parked right
    # after the exit must complete it first, or a snapshot holds an IN the device already answered and a
    # restored guest executes it again (a second read: a console byte or an ISR read consumed twice).
    port = SlowPort()
    vmm = Vmm()
    try:
        vmm.configure(_config(make_kernel(READING_GUEST), tmp_path, "v"))
        vmm.pio_bus.insert(port, PORT, 1)
        vmm.start()
        assert vmm.boot_plan is not None
        for _ in range(5):
            _run_until(vmm, _count(vmm) + 2)
            vmm.pause()
            regs = vmm.machine.vcpus[0].get_regs()
            retired = regs.rip - vmm.boot_plan.entry == AFTER_IN
            # every read the device answered is an IN the saved state has retired
            assert port.reads == regs.rbx + retired, (
                port.reads,
                regs.rbx,
                hex(regs.rip - vmm.boot_plan.entry),
            )
            assert not retired or regs.rax & 0xFF == 0x5A
            vmm.resume()
    finally:
        vmm.close()


@pytest.mark.usefixtures("no_leaks")
def test_paused_guest_restores_twice_from_the_same_state(
    snapshot: tuple[Path, Path, int, int, int], tmp_path: Path
) -> None:
    directory, kernel, rbx, rip, count = snapshot
    assert count in (rbx, rbx - 1)  # paused after the store, or between the inc and the store
    clones = []
    try:
        for name in ("clone-a", "clone-b"):
            clone = Vmm.restore(directory, _config(kernel, tmp_path, name))
            clones.append(clone)
            assert clone.state is VmmState.PAUSED
            assert _rbx_rip(clone) == (rbx, rip)
            assert _count(clone) == count
        for clone in clones:  # both run at once, each on its own copy-on-write memory
            clone.resume()
        for clone in clones:
            _run_until(clone, count + 20)
            clone.pause()
            assert _rbx_rip(clone)[0] > rbx + 20
            assert clone.exit_status is None
        saved = (directory / "memory-0.bin").read_bytes()[COUNTER : COUNTER + 8]
        assert int.from_bytes(saved, "little") == count  # the clones' writes never reach the file
    finally:
        for clone in clones:
            clone.close()


@pytest.mark.usefixtures("no_leaks")
def test_a_clone_snapshots_and_its_clone_continues_from_there(
    snapshot: tuple[Path, Path, int, int, int], tmp_path: Path
) -> None:
    directory, kernel, rbx, _, count = snapshot
    clone = Vmm.restore(directory, _config(kernel, tmp_path, "clone"))
    try:
        clone.resume()
        _run_until(clone, count + 10)
        clone.pause()
        rbx2, rip2 = _rbx_rip(clone)
        count2 = _count(clone)
        clone.snapshot(tmp_path / "snap2")  # RAM is a private mapping of the first snapshot's file here
    finally:
        clone.close()
    grandchild = Vmm.restore(tmp_path / "snap2", _config(kernel, tmp_path, "grandchild"))
    try:
        assert _rbx_rip(grandchild) == (rbx2, rip2) and rbx2 > rbx + 10
        assert _count(grandchild) == count2
    finally:
        grandchild.close()


@pytest.mark.usefixtures("no_leaks")
def test_shared_memory_restore_runs_on_a_copy_of_the_file(
    snapshot: tuple[Path, Path, int, int, int], tmp_path: Path
) -> None:
    directory, kernel, rbx, rip, count = snapshot
    config = _config(kernel, tmp_path, "clone")
    config.shared_memory = True
    clone = Vmm.restore(directory, config)
    try:
        assert clone.memory is not None and clone.memory.regions[0].fd >= 0  # a memfd a daemon could map
        assert _rbx_rip(clone) == (rbx, rip) and _count(clone) == count
        clone.resume()
        _run_until(clone, count + 10)
    finally:
        clone.close()


@pytest.mark.usefixtures("no_leaks")
def test_restore_without_a_config_uses_the_saved_one(snapshot: tuple[Path, Path, int, int, int]) -> None:
    directory, kernel, rbx, rip, _ = snapshot
    config = snapshot_config(directory)
    assert (config.kernel, config.vcpus, config.memory_mib) == (kernel, 1, 32)
    assert [type(d) for d in config.devices] == [RngSpec, VsockSpec]
    clone = Vmm.restore(directory)
    try:
        assert _rbx_rip(clone) == (rbx, rip)
    finally:
        clone.close()


@pytest.mark.usefixtures("no_leaks")
def test_restore_refuses_a_config_with_memory_hotplug(snapshot: tuple[Path, Path, int, int, int]) -> None:
    directory, *_ = snapshot
    config = snapshot_config(directory)
    config.memory_hotplug_mib = 128
    with pytest.raises(SnapshotError, match="memory hot-plug"):
        Vmm.restore(directory, config)


def test_snapshot_files_are_versioned_and_say_what_they_hold(
    snapshot: tuple[Path, Path, int, int, int],
) -> None:
    directory = snapshot[0]
    manifest = json.loads((directory / "snapshot.json").read_text())
    assert manifest["format"] == "kata-vmm-snapshot" and manifest["version"] == SNAPSHOT_VERSION
    [vcpu] = manifest["vcpus"]
    assert vcpu["regs"]["struct"] == "kvm_regs" and vcpu["regs"]["size"] == 144
    assert {"xsave", "xcrs", "lapic", "vcpu_events", "cpuid", "debugregs", "fpu", "sregs"} <= set(vcpu)
    assert len(vcpu["msrs"]) > 10
    assert set(manifest["vm"]) == {"pic_master", "pic_slave", "ioapic", "pit2", "clock"}
    assert [d["spec"]["kind"] for d in manifest["devices"]] == ["rng", "vsock"]
    assert sorted(p.name for p in directory.iterdir()) == ["memory-0.bin", "snapshot.json"]
    assert (directory / "memory-0.bin").stat().st_blocks * 512 < 8 << 20  # sparse: 32 MiB, mostly holes
    assert (directory / "memory-0.bin").stat().st_mode & 0o777 == 0o400  # clones map it: never rewritten


def _edit(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((directory / "snapshot.json").read_text())
    change(manifest)
    (directory / "snapshot.json").write_text(json.dumps(manifest))


CORRUPTIONS: list[tuple[str, Callable[[Path], None], str]] = [
    ("version", lambda d: _edit(d, lambda m: m.update(version=SNAPSHOT_VERSION + 1)), "version 2"),
    ("format", lambda d: _edit(d, lambda m: m.update(format="firecracker")), "not a kata-vmm snapshot"),
    ("garbage", lambda d: (d / "snapshot.json").write_bytes(b"\x00{garbage"), "corrupt"),
    ("no manifest", lambda d: (d / "snapshot.json").unlink(), "no snapshot.json"),
    ("short memory", lambda d: os.truncate(d / "memory-0.bin", 4096), "holds 4096 bytes"),
    ("no memory", lambda d: (d / "memory-0.bin").unlink(), "cannot open memory file"),
    (
        "memory elsewhere",
        lambda d: _edit(d, lambda m: m["memory"][0].update(file="../../etc/passwd")),
        "names no file",
    ),
    (
        "memory layout",
        lambda d: _edit(d, lambda m: m["memory"].append(dict(m["memory"][0], guest_addr=1 << 32))),
        "not this VM's layout",
    ),
    (
        "regs size",
        lambda d: _edit(d, lambda m: m["vcpus"][0]["regs"].update(size=100)),
        "kvm_regs is 100 bytes",
    ),
    (
        "regs struct",
        lambda d: _edit(d, lambda m: m["vcpus"][0].update(regs=m["vcpus"][0]["sregs"])),
        "expected a kvm_regs",
    ),
    ("msrs", lambda d: _edit(d, lambda m: m["vcpus"][0].update(msrs=[[1, -1]])), "not a u64"),
    ("irqchip", lambda d: _edit(d, lambda m: m["vm"].update(ioapic=m["vm"]["pic_master"])), "irqchip 0"),
    (
        "queue",
        lambda d: _edit(d, lambda m: m["devices"][0]["transport"].update(device_type=2)),
        "device type",
    ),
    ("no devices", lambda d: _edit(d, lambda m: m.pop("devices")), "devices"),
    ("config a list", lambda d: _edit(d, lambda m: m.update(config=[1])), "cannot restore"),
]


@pytest.mark.usefixtures("no_leaks")
@pytest.mark.parametrize(("what", "corrupt", "match"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_or_other_version_snapshot_is_refused_and_leaks_nothing(
    snapshot: tuple[Path, Path, int, int, int],
    tmp_path: Path,
    what: str,
    corrupt: Callable[[Path], None],
    match: str,
) -> None:
    directory, kernel = snapshot[:2]
    corrupt(directory)
    with pytest.raises(SnapshotError, match=match):
        Vmm.restore(directory, _config(kernel, tmp_path, "clone"))
    assert not (tmp_path / "clone.sock").exists()  # the clone's vsock listener was closed and unlinked


@pytest.mark.usefixtures("no_leaks")
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.__setattr__("vcpus", 2), "1 vCPUs and 32 MiB, the config 2 and 32"),
        (lambda c: c.__setattr__("memory_mib", 64), "the config 1 and 64"),
        (lambda c: c.devices.pop(), "devices"),
    ],
)
def test_config_that_does_not_fit_the_snapshot_is_refused(
    snapshot: tuple[Path, Path, int, int, int], tmp_path: Path, change: Callable[[VmConfig], None], match: str
) -> None:
    directory, kernel = snapshot[:2]
    config = _config(kernel, tmp_path, "clone")
    change(config)
    with pytest.raises(SnapshotError, match=match):
        Vmm.restore(directory, config)


@pytest.mark.usefixtures("no_leaks")
def test_snapshot_needs_a_paused_vm_and_a_new_directory(make_kernel: KernelFactory, tmp_path: Path) -> None:
    vmm = Vmm()
    try:
        vmm.configure(_config(make_kernel(COUNTING_GUEST), tmp_path, "v"))
        vmm.start()
        with pytest.raises(VmStateError):
            vmm.snapshot(tmp_path / "s")
        vmm.pause()
        (tmp_path / "exists").mkdir()
        with pytest.raises(SnapshotError, match="cannot create snapshot directory"):
            vmm.snapshot(tmp_path / "exists")
        assert not (tmp_path / "s").exists()
    finally:
        vmm.close()


# A host-side stand-in for the guest's virtio-rng driver: registers through the MMIO bus (as a vCPU's
# accesses arrive), rings in guest RAM well away from the counting guest's code and counter.
DESC, AVAIL, USED, BUFFERS = 0x300000, 0x301000, 0x302000, 0x310000


def _mmio(vmm: Vmm, offset: int, value: int) -> None:
    vmm.mmio_bus.write(vmm.machine.mmio_slots[0].base + offset, struct.pack("<I", value))


def _rng_bring_up(vmm: Vmm) -> None:
    for status in (0, 1, 3):
        _mmio(vmm, 0x70, status)
    _mmio(vmm, 0x24, 1)
    _mmio(vmm, 0x20, 1)  # VIRTIO_F_VERSION_1 (bit 32)
    _mmio(vmm, 0x70, 0xB)
    _mmio(vmm, 0x30, 0)
    _mmio(vmm, 0x38, 8)
    for reg, addr in ((0x80, DESC), (0x90, AVAIL), (0xA0, USED)):
        _mmio(vmm, reg, addr)
        _mmio(vmm, reg + 4, 0)
    _mmio(vmm, 0x44, 1)
    _mmio(vmm, 0x70, 0xF)


def _rng_offer(vmm: Vmm, index: int) -> None:
    """Make buffer ``index`` (16 device-writable bytes) available, without a kick."""
    assert vmm.memory is not None
    vmm.memory.write(DESC + 16 * index, struct.pack("<QIHH", BUFFERS + 16 * index, 16, 2, 0))
    vmm.memory.write(AVAIL + 4 + 2 * (index % 8), struct.pack("<H", index))
    vmm.memory.write(AVAIL + 2, struct.pack("<H", index + 1))


def _rng_used(vmm: Vmm) -> int:
    assert vmm.memory is not None
    return int(struct.unpack("<H", vmm.memory.read(USED + 2, 2))[0])


def _until(check: Callable[[], bool], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.usefixtures("no_leaks")
def test_restored_device_serves_the_driver_queue_where_it_was(
    make_kernel: KernelFactory, tmp_path: Path
) -> None:
    kernel = make_kernel(COUNTING_GUEST)
    vmm = Vmm()
    try:
        vmm.configure(_config(kernel, tmp_path, "origin"))
        vmm.start()
        _rng_bring_up(vmm)
        _rng_offer(vmm, 0)
        _mmio(vmm, 0x50, 0)  # QueueNotify
        assert _until(lambda: _rng_used(vmm) == 1)
        _rng_offer(vmm, 1)  # made available, its kick not yet served when the VM is paused
        vmm.pause()
        vmm.snapshot(tmp_path / "snap")
    finally:
        vmm.close()
    clone = Vmm.restore(tmp_path / "snap", _config(kernel, tmp_path, "clone"))
    try:
        assert clone.machine.virtio[0].transport.read_u32(0x70) == 0xF
        assert _until(lambda: _rng_used(clone) == 2)  # served after the restore, without a new kick
        _rng_offer(clone, 2)
        _mmio(clone, 0x50, 0)
        assert _until(lambda: _rng_used(clone) == 3)
        assert clone.memory is not None and clone.memory.read(BUFFERS + 32, 16) != bytes(16)
    finally:
        clone.close()


@pytest.mark.usefixtures("no_leaks")
def test_every_device_kind_is_recorded_and_rebuilt(make_kernel: KernelFactory, tmp_path: Path) -> None:
    kernel = make_kernel(COUNTING_GUEST)
    (tmp_path / "share").mkdir()
    (tmp_path / "disk.img").write_bytes(bytes(1 << 16))
    devices = [
        VsockSpec(tmp_path / "v.sock", guest_cid=7),
        BlockSpec(tmp_path / "disk.img", read_only=True),
        FsSpec("share", tmp_path / "share"),
        RngSpec(),
    ]
    vmm = Vmm()
    try:
        vmm.configure(VmConfig(kernel=kernel, vcpus=1, memory_mib=32, devices=devices))
        vmm.start()
        _run_until(vmm, 5)
        vmm.pause()
        vmm.snapshot(tmp_path / "snap")
    finally:
        vmm.close()
    config = snapshot_config(tmp_path / "snap")
    assert config.devices == devices
    clone = Vmm.restore(tmp_path / "snap")
    try:
        assert [s.index for s in clone.machine.mmio_slots] == [0, 1, 2, 3]
        assert [d.device.device_type for d in clone.machine.virtio] == [19, 2, 26, 4]
        clone.resume()
        _run_until(clone, _count(clone) + 5)
    finally:
        clone.close()


@pytest.mark.usefixtures("no_leaks")
def test_a_builder_built_vm_snapshots_with_its_specs(make_kernel: KernelFactory, tmp_path: Path) -> None:
    kernel = make_kernel(COUNTING_GUEST)
    builder = VmmBuilder(VmConfig(kernel=kernel, vcpus=1, memory_mib=32))
    builder.add_device(VsockSpec(tmp_path / "v.sock"))
    builder.add_device(RngSpec())
    vmm = builder.start()
    try:
        _run_until(vmm, 5)
        vmm.pause()
        vmm.snapshot(tmp_path / "snap")
    finally:
        vmm.close()
    assert snapshot_config(tmp_path / "snap").devices == [VsockSpec(tmp_path / "v.sock"), RngSpec()]
    Vmm.restore(tmp_path / "snap").close()


@pytest.mark.usefixtures("no_leaks")
def test_devices_without_specs_need_a_config_and_factories_cannot_be_saved(
    make_kernel: KernelFactory, tmp_path: Path
) -> None:
    kernel = make_kernel(COUNTING_GUEST)
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    vmm = Vmm()
    try:
        vmm.configure(VmConfig(kernel=kernel, vcpus=1, memory_mib=32))
        vmm.add_virtio_device(VirtioBlock(disk))  # no spec: the snapshot records its kind only
        vmm.start()
        vmm.pause()
        vmm.snapshot(tmp_path / "snap")
    finally:
        vmm.close()
    with pytest.raises(SnapshotError, match="not one kata-vmm records"):
        Vmm.restore(tmp_path / "snap")
    config = VmConfig(kernel=kernel, vcpus=1, memory_mib=32, devices=[BlockSpec(disk)])
    Vmm.restore(tmp_path / "snap", config).close()

    vmm = Vmm()
    try:
        vmm.configure(VmConfig(kernel=kernel, vcpus=1, memory_mib=32))
        vmm.add_device(lambda memory, irq, slot: MmioTransport(VirtioRng(), memory, irq))
        vmm.start()
        vmm.pause()
        with pytest.raises(SnapshotError, match="cannot be saved"):
            vmm.snapshot(tmp_path / "snap2")
        assert not (tmp_path / "snap2").exists()
    finally:
        vmm.close()


@pytest.mark.usefixtures("no_leaks")
def test_a_failed_restore_gives_back_what_unbuilt_specs_hold(
    snapshot: tuple[Path, Path, int, int, int], tmp_path: Path
) -> None:
    directory, kernel = snapshot[:2]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    config = _config(kernel, tmp_path, "clone")
    config.devices.append(NetSpec("tap0", fd=ours.detach()))  # an open tap, as the shim hands one over
    try:
        with pytest.raises(SnapshotError, match="devices"):
            Vmm.restore(directory, config)
        assert theirs.recv(1, socket.MSG_DONTWAIT) == b""  # the spec's end was closed
    finally:
        theirs.close()


@pytest.mark.usefixtures("no_leaks")
def test_a_snapshot_from_a_host_without_xsave_restores_without_xcrs(
    make_kernel: KernelFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On a host CPU without XSAVE (the lab VM with -cpu max,-xsave) KVM_GET_XCRS reports no XCRs and
    # KVM_SET_XCRS fails with EINVAL: the saved empty list must not be set back.
    monkeypatch.setattr(Vcpu, "get_xcrs", lambda self: kvm_structs.kvm_xcrs())

    def refuse(self: Vcpu, xcrs: kvm_structs.kvm_xcrs) -> None:
        raise KvmError("KVM_SET_XCRS", errno.EINVAL)

    monkeypatch.setattr(Vcpu, "set_xcrs", refuse)
    kernel = make_kernel(COUNTING_GUEST)
    vmm = Vmm()
    try:
        vmm.configure(_config(kernel, tmp_path, "v"))
        vmm.start()
        _run_until(vmm, 5)
        vmm.pause()
        expected = _rbx_rip(vmm)
        vmm.snapshot(tmp_path / "snap")
    finally:
        vmm.close()
    clone = Vmm.restore(tmp_path / "snap", _config(kernel, tmp_path, "clone"))
    try:
        assert _rbx_rip(clone) == expected
        clone.resume()
        _run_until(clone, _count(clone) + 5)
    finally:
        clone.close()
