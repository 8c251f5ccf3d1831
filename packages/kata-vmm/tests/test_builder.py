"""VmmBuilder: slots are handed out when a device is added, and the built VM uses exactly those slots."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from kata_vmm import (
    VIRTIO_MMIO_SLOTS,
    BlockSpec,
    ConfigError,
    FsSpec,
    MmioSlot,
    NetSpec,
    RngSpec,
    VmConfig,
    VmmBuilder,
    VmmState,
    VmStateError,
    VsockSpec,
    virtio_mmio_slot,
)
from kata_vmm import testing as tk

KernelFactory = Callable[[bytes], Path]
needs_kvm = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_add_device_returns_the_slot_with_its_window_and_gsi(tmp_path: Path) -> None:
    builder = VmmBuilder(VmConfig(kernel=tmp_path / "k", devices=[RngSpec()]))
    slot = builder.add_device(BlockSpec(tmp_path / "disk.img"))
    base, gsi = virtio_mmio_slot(1)
    assert slot == MmioSlot(1, base, 0x1000, gsi)
    assert [s.index for s, _spec in builder.devices] == [0, 1]
    assert builder.devices[1][1] == BlockSpec(tmp_path / "disk.img")


def test_add_device_refuses_past_the_last_slot(tmp_path: Path) -> None:
    builder = VmmBuilder(VmConfig(kernel=tmp_path / "k"))
    for _ in range(VIRTIO_MMIO_SLOTS):
        builder.add_device(RngSpec())
    with pytest.raises(ConfigError, match=f"all {VIRTIO_MMIO_SLOTS} virtio-mmio slots are taken"):
        builder.add_device(RngSpec())


def test_add_device_refuses_a_second_vsock_and_a_reused_fs_tag(tmp_path: Path) -> None:
    builder = VmmBuilder(VmConfig(kernel=tmp_path / "k", devices=[VsockSpec(tmp_path / "a.sock")]))
    with pytest.raises(ConfigError, match="one vsock device"):
        builder.add_device(VsockSpec(tmp_path / "b.sock"))
    builder.add_device(FsSpec("shared", tmp_path))
    with pytest.raises(ConfigError, match="tag 'shared' is already in use"):
        builder.add_device(FsSpec("shared", tmp_path / "other"))
    builder.add_device(FsSpec("other", tmp_path))
    assert len(builder.devices) == 3


def test_replace_device_keeps_the_slot_and_the_kind(tmp_path: Path) -> None:
    builder = VmmBuilder(VmConfig(kernel=tmp_path / "k"))
    slot = builder.add_device(NetSpec("tap0", "02:00:00:00:00:01"))
    builder.replace_device(slot, NetSpec("tap0", "02:00:00:00:00:01", fd=-1))
    assert builder.devices == [(slot, NetSpec("tap0", "02:00:00:00:00:01", fd=-1))]
    with pytest.raises(ConfigError, match="holds a NetSpec; it cannot become a RngSpec"):
        builder.replace_device(slot, RngSpec())
    with pytest.raises(ConfigError, match="slot 3 has no device"):
        builder.replace_device(MmioSlot.at(3), RngSpec())


def test_close_releases_the_fds_unbuilt_specs_hold(tmp_path: Path) -> None:
    r, w = os.pipe()
    builder = VmmBuilder(VmConfig(kernel=tmp_path / "k"))
    builder.add_device(NetSpec("tap0", fd=r))
    builder.close()
    builder.close()
    assert not fd_is_open(r)
    os.close(w)
    with pytest.raises(VmStateError):
        builder.add_device(RngSpec())


@pytest.mark.kvm
@needs_kvm
@pytest.mark.usefixtures("no_leaks")
def test_the_built_vm_puts_each_device_on_the_slot_add_device_returned(
    make_kernel: KernelFactory, tmp_path: Path
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    builder = VmmBuilder(VmConfig(kernel=make_kernel(tk.spin_forever()), memory_mib=32))
    slots = [builder.add_device(RngSpec()), builder.add_device(BlockSpec(image, read_only=True))]
    vmm = builder.build()
    try:
        assert vmm.state is VmmState.CONFIGURED
        assert [(r.base, r.length) for r in vmm.mmio_bus.devices()] == [(s.base, s.size) for s in slots]
        assert [type(d.device).__name__ for d in vmm._virtio] == ["VirtioRng", "VirtioBlock"]
        with pytest.raises(VmStateError):
            builder.build()
    finally:
        vmm.close()


@pytest.mark.kvm
@needs_kvm
@pytest.mark.usefixtures("no_leaks")
def test_a_failing_device_closes_the_vm_and_releases_the_specs_after_it(
    make_kernel: KernelFactory, tmp_path: Path
) -> None:
    r, w = os.pipe()
    builder = VmmBuilder(VmConfig(kernel=make_kernel(tk.spin_forever()), memory_mib=32))
    builder.add_device(VsockSpec(tmp_path / "v.sock"))
    builder.add_device(BlockSpec(tmp_path / "absent.img"))
    builder.add_device(NetSpec("tap0", fd=r))
    with pytest.raises(ConfigError, match=r"absent\.img"):
        builder.build()
    assert not fd_is_open(r)
    assert not (tmp_path / "v.sock").exists()
    os.close(w)


def test_a_block_spec_that_does_not_follow_symlinks_refuses_one_and_keeps_that_in_a_snapshot(
    tmp_path: Path,
) -> None:
    from kata_virtio import DeviceError
    from kata_vmm._snapshot import spec_from_json, spec_to_json

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4096))
    link = tmp_path / "link.img"
    link.symlink_to(image)
    with pytest.raises(DeviceError):
        BlockSpec(link, follow_symlinks=False).build()
    BlockSpec(link).build().close()
    for spec in (BlockSpec(link, follow_symlinks=False), BlockSpec(image, read_only=True)):
        assert spec_from_json(spec_to_json(spec)) == spec
    assert "follow_symlinks" not in spec_to_json(BlockSpec(image))  # what older snapshots hold
