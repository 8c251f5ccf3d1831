"""The built-in back-end: config checks, device mapping, console capture, and (on /dev/kvm) the whole life
cycle with kata_vmm's tiny guests: start, exit noticed through the exit fd, stop, pause, threads, cleanup."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import trio

from kata_shim.hypervisor import (
    BlockDevice,
    Capabilities,
    DeviceInfo,
    HypervisorConfig,
    HypervisorError,
    NetworkDevice,
    ShareFsDevice,
    hypervisor_factory,
)
from kata_shim.hypervisor._common import ConsoleSink
from kata_shim.hypervisor._dragonball import SANDBOX_SHARE_POLICY, Dragonball
from kata_vmm import BlockSpec, FsSpec, MmioSlot, NetSpec, RngSpec, VsockSpec
from kata_vmm import testing as tk

KVM = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs /dev/kvm")


@pytest.fixture
def assets(tmp_path: Path) -> HypervisorConfig:
    """A config whose kernel, initrd and image exist (the kernel is a tiny guest that resets at once)."""
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(tk.tiny_bzimage(tk.print_serial(b"booted\nbye") + tk.I8042_RESET + tk.HALT_FOREVER))
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"\0" * 4096)
    image = tmp_path / "rootfs.img"
    image.write_bytes(b"\0" * (1 << 20))
    return HypervisorConfig(kernel=kernel, initrd=initrd, image=image, default_memory=64)


def with_kernel(config: HypervisorConfig, code: bytes) -> HypervisorConfig:
    config.kernel.write_bytes(tk.tiny_bzimage(code))
    return config


def test_registry_resolves_dragonball_to_this_class() -> None:
    assert hypervisor_factory("dragonball") is Dragonball


def test_dragonball_capabilities_say_what_the_built_in_vmm_can_do(assets: HypervisorConfig) -> None:
    caps = Dragonball(assets).capabilities()
    assert isinstance(caps, Capabilities)
    assert caps.passfd and caps.block_device and caps.hybrid_vsock  # hvsock + passfd stdio, virtio-blk
    assert caps.agent_transport == "hvsock" and caps.device_addressing == "mmio"
    assert {"inline-virtio-fs", "virtio-fs"} <= caps.shared_fs and caps.fs_sharing
    assert caps.hotplug == {"block", "net", "vcpu"} and caps.block_device_hotplug  # upcall hot-plug
    assert not caps.multi_queue and not caps.guest_memory_probe


@pytest.mark.parametrize(
    ("field", "message"),
    [("kernel", "kernel {} not found"), ("initrd", "initrd {} not found"), ("image", "image {} not found")],
)
def test_prepare_vm_names_the_missing_asset(
    assets: HypervisorConfig, root: Path, field: str, message: str
) -> None:
    missing = Path("/nonexistent/kata") / field
    setattr(assets, field, missing)
    hv = Dragonball(assets, state_root=root)
    with pytest.raises(HypervisorError, match=message.format(missing)):
        trio.run(hv.prepare_vm, "sb1", None)
    assert not (root / "sb1").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kernel": Path()}, "no guest kernel configured"),
        ({"image": None, "initrd": None}, "no root filesystem"),
        ({"default_vcpus": 0}, "default_vcpus must be at least 1"),
        ({"default_memory": 16}, "default_memory must be at least 64 MiB"),
        ({"shared_fs": "virtio-9p"}, "shared_fs 'virtio-9p' is not supported"),
        ({"block_device_driver": "nvdimm"}, "block_device_driver 'nvdimm' is not supported"),
    ],
)
def test_prepare_vm_rejects_bad_config(
    assets: HypervisorConfig, root: Path, changes: dict[str, object], message: str
) -> None:
    for key, value in changes.items():
        setattr(assets, key, value)
    with pytest.raises(HypervisorError, match=message):
        trio.run(Dragonball(assets, state_root=root).prepare_vm, "sb1", None)


def test_prepare_vm_rejects_an_unsafe_sandbox_id(assets: HypervisorConfig, root: Path) -> None:
    with pytest.raises(HypervisorError, match="invalid sandbox id"):
        trio.run(Dragonball(assets, state_root=root).prepare_vm, "../x", None)


def test_prepare_vm_creates_the_state_dir_and_names_the_agent_socket(
    assets: HypervisorConfig, root: Path
) -> None:
    hv = Dragonball(assets, state_root=root)
    trio.run(hv.prepare_vm, "sb1", None)
    assert (root / "sb1").is_dir()
    assert hv.agent_address() == f"hvsock:{root}/sb1/kata.hvsock:1024"
    assert hv.pids() == [os.getpid()]
    assert hv.thread_ids() == []


def test_devices_map_to_slots_and_specs_in_order(
    assets: HypervisorConfig, root: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    hv = Dragonball(assets, state_root=root)

    async def main() -> list[object]:
        await hv.prepare_vm("sb1", None)
        return [
            await hv.add_device(ShareFsDevice(shared, "kataShared")),
            await hv.add_device(BlockDevice(disk, read_only=False)),
            await hv.add_device(BlockDevice(disk, read_only=True)),
            await hv.add_device(NetworkDevice("tap0_kata", "02:00:00:00:00:01")),
        ]

    infos = trio.run(main)
    # slots 0-2: image, vsock, rng; then the added devices, where the VMM builder put them
    builder = hv._builder
    assert builder is not None
    slots = [slot for slot, _spec in builder.devices]
    assert slots == [MmioSlot.at(n) for n in range(7)]
    assert infos == [
        DeviceInfo("", int(slots[3].base)),
        DeviceInfo("/dev/vdb", int(slots[4].base)),
        DeviceInfo("/dev/vdc", int(slots[5].base)),
        DeviceInfo("", int(slots[6].base)),
    ]
    assert [i.mmio_address for i in infos] == [0xD000_0000 + n * 0x1000 for n in (3, 4, 5, 6)]  # type: ignore[attr-defined]
    assert all(i.pci_path == "" for i in infos)  # type: ignore[attr-defined]
    assert hv.device_specs() == [
        BlockSpec(assets.image, read_only=True),  # type: ignore[arg-type]
        VsockSpec(root / "sb1" / "kata.hvsock"),
        RngSpec(),
        FsSpec("kataShared", shared, policy=SANDBOX_SHARE_POLICY),
        BlockSpec(disk, read_only=False),
        BlockSpec(disk, read_only=True),
        NetSpec("tap0_kata", "02:00:00:00:00:01"),
    ]


def test_a_block_device_not_to_be_reached_through_a_symlink_is_a_spec_that_opens_it_so(
    assets: HypervisorConfig, root: Path, tmp_path: Path
) -> None:
    # a blockfile snapshot (kata_shim.virt_container._devices): kata_vmm opens it with O_NOFOLLOW
    disk = tmp_path / "snapshot"
    disk.write_bytes(b"\0" * 4096)
    hv = Dragonball(assets, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.add_device(BlockDevice(disk, follow_symlinks=False))

    trio.run(main)
    assert hv.device_specs()[-1] == BlockSpec(disk, follow_symlinks=False)


def test_add_device_reports_the_slots_running_out_as_the_vmm_does(
    assets: HypervisorConfig, root: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    hv = Dragonball(assets, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        while True:
            await hv.add_device(BlockDevice(disk))

    with pytest.raises(HypervisorError, match="virtio-mmio slots are taken"):
        trio.run(main)


def test_add_device_refuses_what_dragonball_cannot_attach(assets: HypervisorConfig, root: Path) -> None:
    hv = Dragonball(assets, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.add_device(object())  # type: ignore[arg-type]

    with pytest.raises(HypervisorError, match="dragonball cannot attach a object"):
        trio.run(main)


def test_without_image_the_first_added_block_device_is_vda(
    assets: HypervisorConfig, root: Path, tmp_path: Path
) -> None:
    assets.image = None
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    hv = Dragonball(assets, state_root=root)

    async def main() -> str:
        await hv.prepare_vm("sb1", None)
        return (await hv.add_device(BlockDevice(disk))).guest_path

    assert trio.run(main) == "/dev/vda"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: ShareFsDevice(p / "absent"), "shared directory .*absent not found"),
        (lambda p: BlockDevice(p / "absent.img"), "block device .*absent.img not found"),
    ],
)
def test_add_device_rejects_missing_host_paths(
    assets: HypervisorConfig, root: Path, tmp_path: Path, make: object, message: str
) -> None:
    hv = Dragonball(assets, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.add_device(make(tmp_path))  # type: ignore[operator]

    with pytest.raises(HypervisorError, match=message):
        trio.run(main)


def test_add_device_refuses_a_duplicate_fs_tag_and_calls_out_of_order(
    assets: HypervisorConfig, root: Path, tmp_path: Path
) -> None:
    hv = Dragonball(assets, state_root=root)
    with pytest.raises(HypervisorError, match="before prepare_vm"):
        trio.run(hv.add_device, ShareFsDevice(tmp_path))

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.add_device(ShareFsDevice(tmp_path, "t"))
        await hv.add_device(ShareFsDevice(tmp_path, "t"))

    with pytest.raises(HypervisorError, match="tag 't' is already in use"):
        trio.run(main)


def test_cmdline_is_quiet_unless_debug_and_appends_kernel_params(assets: HypervisorConfig) -> None:
    assets.kernel_params = " agent.log=debug lab.root=/dev/vda "
    hv = Dragonball(assets)
    assert hv.cmdline() == "console=ttyS0 reboot=k panic=1 quiet agent.log=debug lab.root=/dev/vda"
    assets.enable_debug = True
    assert "quiet" not in hv.cmdline().split()


def test_console_sink_logs_whole_lines_and_keeps_a_bounded_tail(caplog: pytest.LogCaptureFixture) -> None:
    sink = ConsoleSink(logging.getLogger("test.console"), limit=64)
    with caplog.at_level(logging.INFO, logger="test.console"):
        sink(b"first li")
        sink(b"ne\r\nsecond line\npartial")
    assert [r.getMessage() for r in caplog.records] == [
        "guest console: first line",
        "guest console: second line",
    ]
    for n in range(20):
        sink(f"line {n}\n".encode())
    tail = sink.tail()
    assert tail.endswith("line 19")
    assert len(tail) <= 64
    assert sink.tail(max_lines=2) == "line 18\nline 19"


def test_console_sink_flushes_a_line_that_never_ends(caplog: pytest.LogCaptureFixture) -> None:
    sink = ConsoleSink(logging.getLogger("test.console2"), limit=16)
    with caplog.at_level(logging.INFO, logger="test.console2"):
        sink(b"x" * 40)
    assert caplog.records[0].getMessage() == "guest console: " + "x" * 40


def test_a_tap_in_a_missing_netns_fails_with_its_name(assets: HypervisorConfig, root: Path) -> None:
    hv = Dragonball(assets, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", "kata-no-such-netns")
        await hv.add_device(NetworkDevice("tap0_kata", "02:00:00:00:00:01"))
        await hv._open_taps()

    with pytest.raises(Exception, match="kata-no-such-netns"):
        trio.run(main)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")
def test_taps_are_opened_inside_the_pod_netns_and_the_shim_stays_out(
    assets: HypervisorConfig, root: Path
) -> None:
    import subprocess

    name = f"kata-dbtest-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    hv = Dragonball(assets, state_root=root)
    own = os.readlink("/proc/thread-self/ns/net")

    async def main() -> dict[MmioSlot, int]:
        await hv.prepare_vm("sb1", name)
        await hv.add_device(NetworkDevice("tap0_kata", "02:00:00:00:00:01"))
        return await hv._open_taps()

    try:
        fds = trio.run(main)
        try:
            assert list(fds) == [MmioSlot.at(3)]  # image, vsock, rng, then the NIC
            links = subprocess.run(
                ["ip", "-n", name, "-o", "link", "show", "tap0_kata"],
                check=False,
                capture_output=True,
                text=True,
            )
            assert links.returncode == 0, links.stderr  # made in the pod's netns...
            host = subprocess.run(
                ["ip", "-o", "link", "show", "tap0_kata"], check=False, capture_output=True, text=True
            )
            assert host.returncode != 0  # ...not in the shim's
            assert os.readlink("/proc/thread-self/ns/net") == own
            assert hv._builder is not None
            hv._give_taps(hv._builder, fds)
            spec = hv.device_specs()[-1]
            assert spec == NetSpec("tap0_kata", "02:00:00:00:00:01", fd=fds[MmioSlot.at(3)])
        finally:
            trio.run(hv.cleanup)  # the builder owns the fd now: cleanup closes it
            for fd in fds.values():
                with pytest.raises(OSError):
                    os.fstat(fd)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


# --- the life cycle on /dev/kvm with tiny guests -------------------------------------------------------
@pytest.mark.kvm
@KVM
def test_guest_reset_is_noticed_by_wait_vm_without_a_waiting_thread(
    assets: HypervisorConfig, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hv = Dragonball(assets, state_root=root)

    async def main() -> int:
        await hv.prepare_vm("sb1", None)
        # a reset can win the race with start_vm's check; wait_vm must still see it
        with contextlib.suppress(HypervisorError):
            await hv.start_vm(10)
        with trio.fail_after(20):
            code = await hv.wait_vm()
        await hv.cleanup()
        return code

    with caplog.at_level(logging.INFO, logger="kata_shim.hypervisor.dragonball"):
        assert trio.run(main) == 0
    assert "guest console: booted" in caplog.messages
    assert hv.console_tail().endswith("booted\nbye")
    assert hv.exit_reason().startswith("reset")
    assert not (root / "sb1" / "kata.hvsock").exists()


@pytest.mark.kvm
@KVM
def test_device_info_is_where_the_started_vm_put_the_device(
    assets: HypervisorConfig, root: Path, tmp_path: Path
) -> None:
    """DeviceInfo comes from the VMM builder's assignment, and the running VM serves each device there."""
    shared = tmp_path / "shared"
    shared.mkdir()
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    hv = Dragonball(with_kernel(assets, tk.spin_forever()), state_root=root)
    seen: dict[str, object] = {}

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        infos = [await hv.add_device(ShareFsDevice(shared)), await hv.add_device(BlockDevice(disk))]
        await hv.start_vm(10)
        try:
            assert hv._vmm is not None
            served = {r.base: type(r.device.device).__name__ for r in hv._vmm.mmio_bus.devices()}  # type: ignore[attr-defined]
            seen["served"] = [served[i.mmio_address] for i in infos]
        finally:
            await hv.cleanup()

    trio.run(main)
    assert seen["served"] == ["VirtioFs", "VirtioBlock"]


@pytest.mark.kvm
@KVM
def test_running_guest_threads_stop_and_idempotent_cleanup(assets: HypervisorConfig, root: Path) -> None:
    config = with_kernel(assets, tk.spin_forever())
    config.default_vcpus = 2
    hv = Dragonball(config, state_root=root)
    seen: dict[str, object] = {}

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.start_vm(10)
        assert (root / "sb1" / "kata.hvsock").exists()
        ids = hv.thread_ids()
        seen["ids"] = ids
        names = {t.native_id: t.name for t in threading.enumerate()}
        seen["names"] = sorted(names[i] for i in ids)
        seen["vcpus"] = sorted(names[i] for i in hv.vcpu_thread_ids())
        # wait_vm parks no thread: the count stays the same while it waits
        before = threading.active_count()
        async with trio.open_nursery() as nursery:
            result: list[int] = []

            async def waiter() -> None:
                result.append(await hv.wait_vm())

            nursery.start_soon(waiter)
            await trio.sleep(0.3)
            seen["during_wait"] = threading.active_count() - before
            assert result == []
            await hv.pause_vm()
            await hv.resume_vm()
            await hv.stop_vm()
        seen["code"] = result[0]
        await hv.stop_vm()
        await hv.cleanup()
        await hv.cleanup()

    trio.run(main)
    assert seen["names"] == ["kata-vcpu-0", "kata-vcpu-1", "kata-vmm-events"]
    assert seen["vcpus"] == ["kata-vcpu-0", "kata-vcpu-1"]  # what goes into the sandbox cgroup
    assert len(seen["ids"]) == 3  # type: ignore[arg-type]
    assert seen["during_wait"] == 0
    assert seen["code"] == 0
    assert hv.thread_ids() == []
    assert not any(p.name.startswith("kata.hvsock") for p in (root / "sb1").iterdir())


@pytest.mark.kvm
@KVM
def test_guest_crash_makes_wait_vm_report_failure_with_the_console(
    assets: HypervisorConfig, root: Path
) -> None:
    config = with_kernel(assets, tk.print_serial(b"oops\n") + tk.UD2)
    hv = Dragonball(config, state_root=root)

    async def main() -> int:
        await hv.prepare_vm("sb1", None)
        try:
            await hv.start_vm(10)
        except HypervisorError as err:
            assert "the guest stopped" in str(err)
        with trio.fail_after(20):
            code = await hv.wait_vm()
        await hv.cleanup()
        return code

    assert trio.run(main) == 1
    assert hv.exit_reason().startswith("triple-fault")
    assert "oops" in hv.console_tail()


@pytest.mark.kvm
@KVM
def test_a_failing_device_fails_start_vm_and_leaves_nothing(assets: HypervisorConfig, root: Path) -> None:
    hv = Dragonball(with_kernel(assets, tk.spin_forever()), state_root=root)
    threads = threading.active_count()

    async def main() -> None:
        await hv.prepare_vm("sb1", "kata-no-such-netns")
        await hv.add_device(NetworkDevice("kata-db-tap-x", "02:00:00:00:00:01"))
        await hv.start_vm(10)

    with pytest.raises(HypervisorError, match="network namespace kata-no-such-netns"):
        trio.run(main)
    assert hv.thread_ids() == []
    assert not (root / "sb1" / "kata.hvsock").exists()
    assert threading.active_count() <= threads + 1  # trio's idle worker thread may linger


@pytest.mark.kvm
@KVM
def test_a_saved_vm_restores_into_a_new_sandbox_with_its_own_sockets_and_share(
    assets: HypervisorConfig, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 16: save_vm of a running VM, then a second back-end with restore_from starts from it: the
    devices are the sandbox's own (its hybrid vsock socket, its share directory) on the saved slots, the
    vCPUs run on; a sandbox whose devices differ from the save is refused and leaves no thread."""
    config = with_kernel(assets, tk.spin_forever())
    caplog.set_level(logging.INFO, "kata_shim.hypervisor.dragonball")
    for name in ("share-a", "share-b"):
        (root / name).mkdir()
    snap = root / "snap"

    async def main() -> None:
        template = Dragonball(config, state_root=root)
        await template.prepare_vm("tpl", None)
        await template.add_device(ShareFsDevice(root / "share-a"))
        await template.start_vm(10)
        await template.save_vm(snap)
        await template.stop_vm()
        await template.cleanup()
        assert (snap / "snapshot.json").exists()

        clone = Dragonball(config, state_root=root)
        await clone.prepare_vm("sb2", None)
        await clone.add_device(ShareFsDevice(root / "share-b"))
        clone.restore_from(snap)
        await clone.start_vm(10)
        assert (root / "sb2" / "kata.hvsock").exists()
        assert len(clone.vcpu_thread_ids()) == 1 and clone.exit_reason() == ""
        assert [type(s).__name__ for s in clone.device_specs()] == [
            "BlockSpec",
            "VsockSpec",
            "RngSpec",
            "FsSpec",
        ]
        await clone.stop_vm()
        await clone.cleanup()
        assert clone.thread_ids() == []

        before = threading.active_count()
        misfit = Dragonball(config, state_root=root)
        await misfit.prepare_vm("sb3", None)
        await misfit.add_device(BlockDevice(config.image or Path()))
        misfit.restore_from(snap)
        with pytest.raises(HypervisorError, match=r"restoring template .*devices"):
            await misfit.start_vm(10)
        await misfit.cleanup()
        assert threading.active_count() == before

    trio.run(main)
    assert f"VM restored from template {snap}" in caplog.text


def test_external_back_ends_refuse_templates(assets: HypervisorConfig) -> None:
    from kata_shim.hypervisor._firecracker import Firecracker
    from kata_shim.hypervisor._qemu import Qemu

    for cls in (Qemu, Firecracker):
        hv = cls(assets)
        assert not hv.capabilities().snapshot
        hv.restore_from(None)
        with pytest.raises(HypervisorError, match="cannot start a VM from a template"):
            hv.restore_from(Path("/run/tpl"))
        with pytest.raises(HypervisorError, match="cannot save a VM"):
            trio.run(hv.save_vm, Path("/run/tpl"))
