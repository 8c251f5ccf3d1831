"""The lab VM itself and the guest images: nested KVM, networking, guests booting on it (marked ``lab``)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from framework import GuestAssets, GuestConfig, MicroVMFactory, initrd_with_files

pytestmark = pytest.mark.lab

KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
KVM_API_VERSION = 12
MARKER = "KATA-LAB-GUEST-OK"


def test_lab_vm_offers_nested_kvm_on_amd_svm() -> None:
    assert Path("/dev/kvm").is_char_device()
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    assert "svm" in flags.split()
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert fcntl.ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION
    finally:
        os.close(fd)
    assert Path("/sys/module/kvm_amd").is_dir()


def test_lab_vm_has_cgroup2_controllers_vhost_vsock_and_tmpfs_state() -> None:
    controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    assert {"cpu", "memory", "pids", "cpuset", "io"} <= set(controllers)
    assert Path("/dev/vhost-vsock").is_char_device()
    mounts = {line.split()[1]: line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()}
    assert mounts["/"] == "overlay"
    assert mounts["/tmp"] == mounts["/run"] == "tmpfs"


def test_network_namespace_veth_tap_and_tc_mirred_work_in_lab_vm() -> None:
    tag = uuid.uuid4().hex[:6]
    ns, veth, peer, tap = f"lab{tag}", f"lv{tag}", f"lp{tag}", f"lt{tag}"
    script = f"""
        set -e
        ip netns add {ns}
        ip link add {veth} type veth peer name {peer}
        ip link set {peer} netns {ns}
        ip netns exec {ns} ip tuntap add {tap} mode tap
        ip netns exec {ns} ip link set {tap} up
        ip netns exec {ns} ip link set {peer} up
        ip netns exec {ns} tc qdisc add dev {peer} ingress
        ip netns exec {ns} tc filter add dev {peer} parent ffff: protocol all u32 match u8 0 0 \
            action mirred egress redirect dev {tap}
        ip netns exec {ns} tc filter show dev {peer} parent ffff:
    """
    try:
        done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert "mirred" in done.stdout and tap in done.stdout
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def test_guest_boots_test_initrd_to_marker_and_powers_off(microvm_factory: MicroVMFactory) -> None:
    vm = microvm_factory.build().spawn()
    seconds = vm.wait_for_console(MARKER, timeout=180)
    assert vm.wait_exit(timeout=60) == 0, vm.stderr
    print(f"{vm.backend.name}: {MARKER} after {seconds:.1f} s")


def test_test_initrd_runs_lab_run_script_with_virtio_drivers_loaded(
    microvm_factory: MicroVMFactory, guest_assets: GuestAssets, tmp_path: Path
) -> None:
    script = """
        echo "drivers: $(ls /sys/bus/virtio/drivers | tr '\\n' ' ')"
        echo "filesystems: $(grep -E 'virtiofs|overlay' /proc/filesystems | tr -s '\\t\\n' ' ')"
        echo LAB-RUN-DONE
        exit 3
    """
    initrd = initrd_with_files(guest_assets.initrd_test, {"/lab/run.sh": script}, tmp_path / "initrd")
    config = GuestConfig(
        kernel=guest_assets.kernel, initrd=initrd, cmdline="console=ttyS0 quiet panic=-1 lab.run=/lab/run.sh"
    )
    vm = microvm_factory.build(config).spawn()
    vm.wait_for_console("lab-init: /lab/run.sh exited 3", timeout=180)
    assert vm.wait_exit(timeout=60) == 0
    console = vm.console
    drivers = next(line for line in console.splitlines() if line.startswith("drivers:")).split()
    assert {"virtio_blk", "virtio_net", "vmw_vsock_virtio_transport"} <= set(drivers), console
    assert "virtiofs" in console and "overlay" in console
    assert MARKER not in console


def test_sandbox_guest_mounts_ext4_root_and_runs_python_and_crun(
    qemu_factory: MicroVMFactory, guest_assets: GuestAssets
) -> None:
    config = GuestConfig(
        kernel=guest_assets.kernel,
        initrd=guest_assets.initrd_sandbox,
        cmdline="console=ttyS0 quiet panic=-1 lab.selfcheck=1 lab.noagent=1",
        disks=[guest_assets.rootfs_sandbox],
    )
    vm = qemu_factory.build(config).spawn()
    vm.wait_for_console("KATA-SANDBOX-READY", timeout=240)
    assert vm.wait_exit(timeout=60) == 0
    assert "KATA-SANDBOX-PYTHON 3.11" in vm.console, vm.console
    assert "crun version" in vm.console, vm.console


def test_sandbox_guest_also_boots_the_erofs_root(
    qemu_factory: MicroVMFactory, guest_assets: GuestAssets
) -> None:
    # the same tree as the ext4 image; python and crun are checked on ext4 only (each check costs ~20 s)
    config = GuestConfig(
        kernel=guest_assets.kernel,
        initrd=guest_assets.initrd_sandbox,
        cmdline="console=ttyS0 quiet panic=-1 lab.rootfstype=erofs lab.noagent=1",
        disks=[guest_assets.rootfs_sandbox_erofs],
    )
    vm = qemu_factory.build(config).spawn()
    vm.wait_for_console("KATA-SANDBOX-READY", timeout=240)
    assert vm.wait_exit(timeout=60) == 0
    assert "cannot mount" not in vm.console, vm.console
