"""Hot-plug through the dragonball back-end after start_vm (issue 17): block and network devices and vCPUs,
on /dev/kvm with a tiny guest that spins, the guest's upcall server played by a scripted toy (the back-end's
`upcall=` opener hands the client a memory stream to it). What the guest refuses or leaves unanswered is a
`HypervisorError` and the host side is undone."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from kata_shim.hypervisor import BlockDevice, HypervisorConfig, HypervisorError, NetworkDevice
from kata_shim.hypervisor._dragonball import Dragonball
from kata_upcall import AddCpu, AddMmio, DelCpu, DelMmio, Handshake, StreamConnector
from kata_upcall.testing import Answer, FakeGuest
from kata_vmm import Vmm
from kata_vmm import testing as tk

KVM = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")
pytestmark = [pytest.mark.kvm, KVM]

ENODEV = 19


def scripted_guest(answer: Answer) -> FakeGuest:
    """The guest module's device-manager service (no handshake: the in-process vsock connector does it),
    answering as ``answer`` says ("silent": never); records every request."""
    return FakeGuest(handshake=Handshake.NONE, answer=answer)


@pytest.fixture
def config(tmp_path: Path) -> HypervisorConfig:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(tk.tiny_bzimage(tk.spin_forever()))
    image = tmp_path / "rootfs.img"
    image.write_bytes(bytes(4096))
    return HypervisorConfig(kernel=kernel, image=image, default_memory=64, default_maxvcpus=2)


def run(
    config: HypervisorConfig,
    root: Path,
    guest: FakeGuest,
    body: Callable[[Dragonball], Awaitable[None]],
    *,
    upcall_timeout: float = 60.0,
    netns: str | None = None,
    template: Path | None = None,
) -> Dragonball:
    """Start a Dragonball VM (restored from ``template`` when given) whose upcall connections reach
    ``guest``, run ``body(hv)``, clean up."""

    async def main() -> Dragonball:
        async with trio.open_nursery() as nursery:
            guest.nursery = nursery

            def opener(vmm: Vmm) -> tuple[StreamConnector, Handshake]:
                assert isinstance(vmm, Vmm)
                return guest.connect, Handshake.NONE

            hv = Dragonball(config, state_root=root, upcall=opener, upcall_timeout=upcall_timeout)
            try:
                with trio.fail_after(120):
                    await hv.prepare_vm("sb1", netns)
                    hv.restore_from(template)
                    await hv.start_vm(10)
                    await body(hv)
            finally:
                await hv.cleanup()
            nursery.cancel_scope.cancel()
        return hv

    return trio.run(main)


def served(hv: Dragonball) -> dict[int, str]:
    """What the running VM's MMIO bus serves: window base -> device class."""
    assert hv._vmm is not None
    return {r.base: type(r.device.device).__name__ for r in hv._vmm.mmio_bus.devices()}  # type: ignore[attr-defined]


def open_fds_to(path: Path) -> int:
    return sum(os.path.realpath(f"/proc/self/fd/{fd}") == str(path) for fd in os.listdir("/proc/self/fd"))


def test_capabilities_name_block_net_and_vcpu_hotplug_and_the_vm_has_room_for_max_vcpus(
    config: HypervisorConfig,
) -> None:
    hv = Dragonball(config)
    caps = hv.capabilities()
    assert caps.hotplug == {"block", "net", "vcpu"} and caps.block_device_hotplug
    assert hv._vm_config().max_vcpus == 2  # default_maxvcpus
    config.default_maxvcpus = 0  # upstream: the host's CPUs
    assert Dragonball(config)._vm_config().max_vcpus == max(os.cpu_count() or 1, 1)
    config.default_vcpus, config.default_maxvcpus = 3, 2  # never below default_vcpus
    assert Dragonball(config).max_vcpus() == 3


def test_hot_added_disk_is_served_announced_and_removed(
    config: HypervisorConfig, root: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "hot.img"
    disk.write_bytes(bytes(range(256)) * 16)
    guest = scripted_guest(lambda request: 0)
    seen: dict[str, object] = {}

    async def body(hv: Dragonball) -> None:
        info = await hv.add_device(BlockDevice(disk))
        seen["info"] = info
        seen["served"] = served(hv).get(info.mmio_address)
        seen["fds"] = open_fds_to(disk)
        await hv.remove_device(BlockDevice(disk))
        seen["after"] = served(hv).get(info.mmio_address)
        seen["fds_after"] = open_fds_to(disk)
        again = await hv.add_device(BlockDevice(disk, read_only=True))
        seen["again"] = again
        with pytest.raises(HypervisorError, match="is not attached"):
            await hv.remove_device(BlockDevice(disk))  # the read-write one is gone

    run(config, root, guest, body)
    info = seen["info"]
    assert info.guest_path == "/dev/vdb"  # type: ignore[attr-defined]  # the image is vda
    assert seen["served"] == "VirtioBlock" and seen["fds"] == 1
    base = info.mmio_address  # type: ignore[attr-defined]
    added = guest.requests[0]
    assert isinstance(added, AddMmio)
    assert guest.requests[:2] == [
        AddMmio(base, 0x1000, added.mmio_irq),
        DelMmio(base, 0x1000, added.mmio_irq),
    ]
    assert seen["after"] is None and seen["fds_after"] == 0
    assert seen["again"] == info  # the slot and the disk name are free again


def test_a_disk_the_guest_refuses_is_a_hypervisor_error_and_leaves_nothing_plugged(
    config: HypervisorConfig, root: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "hot.img"
    disk.write_bytes(bytes(4096))
    guest = scripted_guest(lambda request: -ENODEV)
    seen: dict[str, object] = {}

    async def body(hv: Dragonball) -> None:
        before = served(hv)
        with pytest.raises(HypervisorError, match=r"guest refused it \(ENODEV") as err:
            await hv.add_device(BlockDevice(disk))
        seen["message"] = str(err.value)
        seen["same"] = served(hv) == before
        seen["fds"] = open_fds_to(disk)
        seen["devices"] = list(hv._devices)

    run(config, root, guest, body)
    assert "hot-adding BlockDevice" in seen["message"]  # type: ignore[operator]
    assert seen["same"] and seen["fds"] == 0 and seen["devices"] == []
    assert [type(r) for r in guest.requests] == [AddMmio]


def test_a_guest_that_never_answers_times_out_and_the_device_is_taken_back(
    config: HypervisorConfig, root: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "hot.img"
    disk.write_bytes(bytes(4096))
    # AddMmio is never answered; the clean-up DelMmio after the timeout is (nothing there)
    guest = scripted_guest(lambda request: "silent" if isinstance(request, AddMmio) else -ENODEV)
    seen: dict[str, object] = {}

    async def body(hv: Dragonball) -> None:
        before = served(hv)
        with pytest.raises(HypervisorError, match="no answer from the guest's upcall server within 1 s"):
            await hv.add_device(BlockDevice(disk))
        seen["same"] = served(hv) == before
        seen["fds"] = open_fds_to(disk)

    run(config, root, guest, body, upcall_timeout=1.0)
    assert seen["same"] and seen["fds"] == 0
    assert [type(r) for r in guest.requests] == [AddMmio, DelMmio]


def test_resize_vcpu_adds_and_removes_vcpus_within_default_maxvcpus(
    config: HypervisorConfig, root: Path
) -> None:
    guest = scripted_guest(lambda request: 0)
    seen: dict[str, object] = {}

    async def body(hv: Dragonball) -> None:
        seen["grow"] = await hv.resize_vcpu(1, 4)  # capped at default_maxvcpus = 2
        seen["vcpus"] = sorted(t.name for t in threading.enumerate() if t.name.startswith("kata-vcpu"))
        seen["same"] = await hv.resize_vcpu(2, 2)
        seen["shrink"] = await hv.resize_vcpu(2, 1)
        with pytest.raises(HypervisorError, match="cannot resize to 0"):
            await hv.resize_vcpu(1, 0)

    run(config, root, guest, body)
    assert seen["grow"] == (1, 2) and seen["same"] == (2, 2) and seen["shrink"] == (2, 1)
    assert seen["vcpus"] == ["kata-vcpu-0", "kata-vcpu-1"]
    assert guest.requests == [AddCpu((1,)), DelCpu((1,))]


def test_resize_vcpu_the_guest_refuses_is_a_hypervisor_error(config: HypervisorConfig, root: Path) -> None:
    guest = scripted_guest(lambda request: -ENODEV)
    seen: dict[str, object] = {}

    async def body(hv: Dragonball) -> None:
        with pytest.raises(HypervisorError, match=r"resizing vCPUs 1 -> 2: the guest refused it"):
            await hv.resize_vcpu(1, 2)
        assert hv._vmm is not None
        seen["guest_vcpus"] = set(hv._vmm.guest_vcpus)

    run(config, root, guest, body)
    assert seen["guest_vcpus"] == {0}


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")
def test_hot_added_nic_opens_its_tap_in_the_pod_netns(config: HypervisorConfig, root: Path) -> None:
    name = f"kata-dbhp-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    guest = scripted_guest(lambda request: 0)
    seen: dict[str, object] = {}

    def tap_exists() -> bool:
        shown = subprocess.run(
            ["ip", "-n", name, "-o", "link", "show", "tap1_kata"], check=False, capture_output=True
        )
        return shown.returncode == 0

    async def body(hv: Dragonball) -> None:
        nic = NetworkDevice("tap1_kata", "02:00:00:00:00:07")
        info = await hv.add_device(nic)
        seen["served"] = served(hv).get(info.mmio_address)
        seen["tap"] = tap_exists()
        await hv.remove_device(nic)
        seen["after"] = served(hv).get(info.mmio_address)

    try:
        run(config, root, guest, body, netns=name)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)
    assert seen["served"] == "VirtioNet" and seen["tap"] and seen["after"] is None
    assert [type(r) for r in guest.requests] == [AddMmio, DelMmio]


def test_a_vm_restored_from_a_template_hot_plugs_vcpus_and_disks(
    config: HypervisorConfig, root: Path, tmp_path: Path
) -> None:
    """A sandbox restored from a VM template (save_vm of a VM with nothing plugged) hot-plugs as a booted
    one: its upcall connection is opened on the restored VM, vCPUs grow to default_maxvcpus (the restored
    kata_vmm allows the config's max_vcpus) and shrink back, and a hot-added disk is the next /dev/vdX
    after the template's (cold-plugged) image."""
    snap = tmp_path / "snap"

    async def save() -> None:
        template = Dragonball(config, state_root=root)
        await template.prepare_vm("tpl", None)
        await template.start_vm(10)
        await template.save_vm(snap)
        await template.stop_vm()
        await template.cleanup()

    trio.run(save)
    disk = tmp_path / "hot.img"
    disk.write_bytes(bytes(4096))
    guest = scripted_guest(lambda request: 0)
    seen: dict[str, object] = {}

    async def body(hv: Dragonball) -> None:
        seen["grow"] = await hv.resize_vcpu(1, 2)
        seen["threads"] = len(hv.vcpu_thread_ids())
        info = await hv.add_device(BlockDevice(disk))
        seen["info"] = info
        seen["served"] = served(hv).get(info.mmio_address)
        await hv.remove_device(BlockDevice(disk))
        seen["shrink"] = await hv.resize_vcpu(2, 1)

    run(config, root, guest, body, template=snap)
    assert seen["grow"] == (1, 2) and seen["threads"] == 2 and seen["shrink"] == (2, 1)
    assert seen["info"].guest_path == "/dev/vdb"  # type: ignore[attr-defined]  # the image is vda
    assert seen["served"] == "VirtioBlock"
    assert [type(r) for r in guest.requests] == [AddCpu, AddMmio, DelMmio, DelCpu]


# --- memory hot-plug (virtio-mem): no upcall, the guest's driver answers the device ----------------------


def test_virtio_mem_adds_memory_hotplug_a_region_and_the_online_cmdline(config: HypervisorConfig) -> None:
    assert "memory" not in Dragonball(config).capabilities().hotplug
    assert Dragonball(config)._vm_config().memory_hotplug_mib == 0
    config.enable_virtio_mem, config.default_maxmemory = True, 300
    hv = Dragonball(config)
    caps = hv.capabilities()
    assert "memory" in caps.hotplug and not caps.snapshot  # kata_vmm cannot save a virtio-mem VM yet
    assert hv._vm_config().memory_hotplug_mib == 256  # 300 - 64, in 128 MiB units
    assert "memhp_default_state=online" in hv.cmdline().split()
    config.default_maxmemory = 0  # upstream: the host's memory
    host_mib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    assert Dragonball(config).hotplug_region_mib() >= host_mib - 64


def plugging_driver(hv: Dragonball, nursery: trio.Nursery, *, stop_at: int | None = None) -> None:
    """Play the guest's virtio_mem driver: plug or unplug 2 MiB blocks until the device's plugged size
    matches what it requests (or ``stop_at`` MiB: a guest that stops short)."""
    from kata_virtio import VirtioMem
    from kata_virtio._mem import VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG

    assert hv._vmm is not None
    device = next(m.device for m in hv._vmm._virtio if isinstance(m.device, VirtioMem))  # type: ignore[attr-defined]
    device.memory = hv._vmm.memory  # what the driver's activation would hand it (unplug discards there)

    async def drive() -> None:
        while True:
            await trio.sleep(0.01)
            plugged, requested = device.plugged_size, device.requested_size
            if stop_at is not None and plugged >= stop_at << 20:
                continue
            if plugged < requested:
                device._handle(VIRTIO_MEM_REQ_PLUG, device.addr + plugged, 1)
            elif plugged > requested:
                device._handle(VIRTIO_MEM_REQ_UNPLUG, device.addr + plugged - device.block_size, 1)

    nursery.start_soon(drive)


def test_resize_memory_plugs_through_virtio_mem_and_caps_at_the_region(
    config: HypervisorConfig, root: Path
) -> None:
    config.enable_virtio_mem, config.default_maxmemory = True, 192  # a 128 MiB region above 64 MiB
    seen: dict[str, object] = {}

    async def body(hv: Dragonball) -> None:
        async with trio.open_nursery() as nursery:
            plugging_driver(hv, nursery)
            seen["grow"] = await hv.resize_memory(64 + 32)
            seen["capped"] = await hv.resize_memory(1024)
            seen["shrink"] = await hv.resize_memory(64)
            nursery.cancel_scope.cancel()
        with pytest.raises(HypervisorError, match="cannot resize memory to -1"):
            await hv.resize_memory(-1)

    run(config, root, scripted_guest(lambda request: 0), body)
    grow, capped, shrink = seen["grow"], seen["capped"], seen["shrink"]
    assert isinstance(grow, tuple) and isinstance(capped, tuple) and isinstance(shrink, tuple)
    assert grow[0] == 96 and grow[1].size_mib == 32 and grow[1].addr == 1 << 32 and not grow[1].probe
    assert capped[0] == 192 and shrink[0] == 64 and shrink[1].size_mib == 0


def test_resize_memory_returns_what_a_slow_guest_plugged(config: HypervisorConfig, root: Path) -> None:
    config.enable_virtio_mem, config.default_maxmemory = True, 192
    seen: dict[str, object] = {}

    async def body(hv: Dragonball) -> None:
        hv.memory_resize_timeout = 0.5
        async with trio.open_nursery() as nursery:
            plugging_driver(hv, nursery, stop_at=8)
            seen["grow"] = await hv.resize_memory(128)
            nursery.cancel_scope.cancel()

    run(config, root, scripted_guest(lambda request: 0), body)
    grow = seen["grow"]
    assert isinstance(grow, tuple) and grow[0] == 64 + 8


def test_resize_memory_without_virtio_mem_is_a_hypervisor_error(config: HypervisorConfig, root: Path) -> None:
    async def body(hv: Dragonball) -> None:
        with pytest.raises(HypervisorError, match="enable_virtio_mem"):
            await hv.resize_memory(128)

    run(config, root, scripted_guest(lambda request: 0), body)
