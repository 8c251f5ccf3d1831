"""Storages (ephemeral, local, shm, blk on a loop device), the sandbox, guest rpcs, the log stream."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from agent_harness import mounts_under, running_agent

from kata_agent_client import (
    AgentAlreadyExists,
    AgentError,
    AgentInvalidArgument,
    AgentNotFound,
    ContainerSpec,
    Device,
    Mount,
    Process,
    Storage,
    forward_logs,
)

pytestmark = pytest.mark.root


@pytest.fixture
def loop_ext4(tmp_path: Path) -> Iterator[str]:
    """An ext4 image on a loop device holding hello.txt; the device is detached afterwards."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (8 << 20))
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=False
    )
    if dev.returncode != 0:
        pytest.skip(f"no loop device: {dev.stderr.strip()}")
    device = dev.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def test_storages_are_mounted_for_the_container_and_released(busybox_rootfs: Path, loop_ext4: str) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            base = os.path.dirname(agent.run_dir)
            eph, local, blk = (os.path.join(base, n) for n in ("eph", "local", "blk"))
            storages = [
                Storage("ephemeral", eph, source="tmpfs", fstype="tmpfs", options=["size=1m"]),
                Storage("local", local, options=["mode=0750"]),
                Storage("blk", blk, source=loop_ext4, fstype="ext4"),
            ]
            spec = ContainerSpec(
                root=str(busybox_rootfs),
                process=Process(
                    ["sh", "-c", "echo hi > /eph/f && cat /eph/f && ls /blk && df -k /eph | tail -1"]
                ),
            )
            spec.mounts += [Mount("/eph", "bind", eph, ["rbind"]), Mount("/blk", "bind", blk, ["rbind"])]
            await c.create_container("s", spec, storages=storages)
            assert sorted(mounts_under(base)) == [blk, eph]
            assert oct(os.stat(local).st_mode & 0o777) == "0o750"
            await c.start_container("s")
            out = await c.read_all("s")
            assert await c.wait_process("s") == 0
            lines = out.decode().splitlines()
            assert lines[0] == "hi" and "lost+found" in lines[1] and " 1024 " in lines[-1]
            await c.remove_container("s")
            assert mounts_under(base) == []
            assert not any(os.path.lexists(p) for p in (eph, local, blk))  # noqa: ASYNC240

    trio.run(main)


def test_block_device_appears_in_the_container(busybox_rootfs: Path, loop_ext4: str) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            rdev = os.stat(loop_ext4).st_rdev
            spec = ContainerSpec(
                str(busybox_rootfs),
                Process(["sh", "-c", "ls -l /dev/xvdb; head -c 1082 /dev/xvdb | tail -c 2 | od -An -tx1"]),
            )
            await c.create_container("d", spec, devices=[Device(loop_ext4, "/dev/xvdb")])
            await c.start_container("d")
            out = (await c.read_all("d")).decode()
            assert await c.wait_process("d") == 0, out
            first, magic = out.splitlines()[:2]
            assert first.startswith("b") and f"{os.major(rdev)}, {os.minor(rdev)}" in " ".join(first.split())
            assert magic.split() == ["53", "ef"]  # the ext4 superblock magic, read through the device
            await c.remove_container("d")
            with pytest.raises(AgentNotFound):
                await c.create_container("d2", spec, devices=[Device("/dev/no-such-disk", "/dev/xvdb")])
            with pytest.raises(AgentInvalidArgument):
                await c.create_container("d3", spec, devices=[Device("/dev/null", "/dev/xvdb")])
            assert os.listdir(agent.run_dir) == []

    trio.run(main)


def test_sandbox_storages_live_until_destroy_sandbox(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            shm = os.path.join(os.path.dirname(agent.run_dir), "sbx-shm")
            # a module that cannot load fails the sandbox and leaves no mount behind
            with pytest.raises(AgentInvalidArgument, match="modprobe"):
                await c.create_sandbox(
                    "sbx",
                    storages=[Storage("shm", shm, source="shm", fstype="tmpfs")],
                    kernel_modules=[("kata_no_such_module", [])],
                )
            assert mounts_under(shm) == []
            await c.create_sandbox("sbx", storages=[Storage("shm", shm, source="shm", fstype="tmpfs")])
            with pytest.raises(AgentAlreadyExists):
                await c.create_sandbox("sbx")
            assert mounts_under(shm) == [shm]
            spec = ContainerSpec(root=str(busybox_rootfs), process=Process(["sleep", "100"]))
            await c.create_container("a", spec)
            await c.start_container("a")
            await c.destroy_sandbox()
            assert mounts_under(shm) == []
            assert agent.service.containers == {}
            with pytest.raises(AgentNotFound):
                await c.wait_process("a")

    trio.run(main)


def test_guest_details_copy_file_metrics() -> None:
    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            details = await c.get_guest_details()
            assert details.agent_version and "virtio-fs" in details.storage_handlers
            target = os.path.join(agent.run_dir, "shared", "etc", "hosts")
            data = os.urandom(5 << 20)  # more than one ttrpc frame: sent in chunks
            await c.copy_file(target, data, file_mode=0o600)
            assert Path(target).read_bytes() == data  # noqa: ASYNC240
            assert oct(os.stat(target).st_mode & 0o777) == "0o600"
            await c.copy_file(target, b"short")
            assert Path(target).read_bytes() == b"short"  # noqa: ASYNC240
            with pytest.raises(AgentInvalidArgument):
                await c.copy_file("/etc/evil", b"x")
            with pytest.raises(AgentInvalidArgument):
                await c.copy_file(os.path.join(agent.run_dir, "../../etc/evil"), b"x")
            metrics = await c.get_metrics()
            assert "kata_agent_process_resident_memory_bytes" in metrics

    trio.run(main)


def test_log_stream_carries_json_lines(busybox_rootfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with running_agent(log=True) as agent, trio.open_nursery() as n:
            await n.start(forward_logs, agent.address, logging.getLogger("test.agentlog"))
            spec = ContainerSpec(root=str(busybox_rootfs), process=Process(["true"]))
            await agent.client.create_container("logged", spec)
            await agent.client.remove_container("logged")
            with trio.fail_after(5):
                while not any(getattr(r, "agent", {}).get("container") == "logged" for r in caplog.records):  # noqa: ASYNC110
                    await trio.sleep(0.02)
            n.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="test.agentlog"):
        trio.run(main)
    forwarded = [r for r in caplog.records if r.name == "test.agentlog"]
    entry = next(r.agent for r in forwarded if r.getMessage() == "container created")  # type: ignore[attr-defined]
    assert entry["level"] == "INFO" and entry["source"] == "agent" and entry["name"] == "kata-agent"
    assert json.dumps(entry)


def _sysfs(base: Path, entries: dict[str, tuple[str, str]]) -> None:
    for name, (attr, value) in entries.items():
        (base / name).mkdir(parents=True)
        (base / name / attr).write_text(value + "\n")


def test_online_cpus_switches_offline_cpus_on_until_the_target_is_online(tmp_path: Path) -> None:
    from kata_agent._guest import online_cpus

    _sysfs(
        tmp_path,
        {
            "cpu1": ("online", "1"),
            "cpu2": ("online", "0"),
            "cpu3": ("online", "0"),
            "cpufreq": ("online", "0"),
        },
    )
    (tmp_path / "cpu0").mkdir()  # the boot CPU has no online switch: it counts as online
    assert online_cpus(2, base=str(tmp_path)) == 2  # already there: nothing switched
    assert (tmp_path / "cpu2" / "online").read_text() == "0\n"
    assert online_cpus(3, base=str(tmp_path)) == 3
    assert [(tmp_path / f"cpu{n}" / "online").read_text().strip() for n in (1, 2, 3)] == ["1", "1", "0"]
    assert online_cpus(0, base=str(tmp_path)) == 4  # 0: every one
    assert (tmp_path / "cpu3" / "online").read_text() == "1"
    assert (tmp_path / "cpufreq" / "online").read_text() == "0\n"  # not a CPU
    assert online_cpus(9, base=str(tmp_path)) == 4  # short of the target: the caller looks again


def test_online_cpu_mem_waits_for_a_cpu_the_guest_registers_late(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU's ACPI vCPU hot-plug: device_add returns before the guest kernel has handled the event, so the
    CPU's sysfs entry may come after OnlineCPUMem does: the agent waits for it (the lab's qemu vCPU test
    once saw `nproc` 1 after growing to 2 when the agent looked once)."""
    from kata_agent import _guest, _service

    (tmp_path / "cpu0").mkdir()
    monkeypatch.setattr(_guest, "CPU_SYSFS", str(tmp_path))
    monkeypatch.setattr(_service, "ONLINE_CPU_TIMEOUT", 30.0)

    async def main() -> None:
        async def acpi_adds_cpu1() -> None:
            await trio.sleep(0.3)
            _sysfs(tmp_path, {"cpu1": ("online", "0")})

        async with running_agent() as agent, trio.open_nursery() as nursery:
            nursery.start_soon(acpi_adds_cpu1)
            await agent.client.online_cpu_mem(2, cpu_only=True)
            assert (tmp_path / "cpu1" / "online").read_text() == "1"

    trio.run(main)


def test_online_cpu_mem_fails_when_the_cpus_never_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kata_agent import _guest, _service

    (tmp_path / "cpu0").mkdir()
    monkeypatch.setattr(_guest, "CPU_SYSFS", str(tmp_path))
    monkeypatch.setattr(_service, "ONLINE_CPU_TIMEOUT", 0.3)

    async def main() -> None:
        async with running_agent() as agent:
            with pytest.raises(AgentError, match=r"online 3 CPU\(s\): 1 online after 0.3 s"):
                await agent.client.online_cpu_mem(3, cpu_only=True)

    trio.run(main)


def test_online_memory_switches_every_offline_block_on(tmp_path: Path) -> None:
    from kata_agent._guest import online_memory

    _sysfs(
        tmp_path,
        {
            "memory0": ("state", "online"),
            "memory8": ("state", "offline"),
            "memory9": ("state", "going-offline"),
        },
    )
    (tmp_path / "block_size_bytes").write_text("8000000\n")
    assert online_memory(base=str(tmp_path)) == 1
    assert (tmp_path / "memory8" / "state").read_text() == "online"
    assert (tmp_path / "memory9" / "state").read_text() == "going-offline\n"
    assert online_memory(base=str(tmp_path / "absent")) == 0  # no memory hotplug in this guest


def test_wait_for_devices_waits_for_a_hot_plugged_node_within_its_budget(tmp_path: Path) -> None:
    """A hot-plugged disk's node may appear a moment after CreateContainer arrives: the agent waits for
    it (bounded), and gives up after the budget, leaving the error to add_devices."""
    from types import SimpleNamespace

    from kata_agent._devices import wait_for_devices

    late = tmp_path / "vdb"

    async def main() -> float:
        async with trio.open_nursery() as nursery:

            async def appear() -> None:
                await trio.sleep(0.2)
                late.touch()

            nursery.start_soon(appear)
            start = trio.current_time()
            with trio.fail_after(30):
                await wait_for_devices([SimpleNamespace(type="mmioblk", vm_path=str(late))])
            return trio.current_time() - start

    assert trio.run(main) >= 0.2  # it waited for the node
    missing = SimpleNamespace(type="blk", vm_path=str(tmp_path / "never"))
    trio.run(wait_for_devices, [missing], 0.1)  # returns after the budget, raises nothing


def fake_pci_sysfs(root: Path) -> Path:
    """A guest's /sys/devices/pci0000:00 with a disk on the root bus (slot 05, vdb) and one behind the root
    port in slot 1b (its bus 0000:01, the disk at 01:00.0, vdc)."""
    bus0 = root / "pci0000:00"
    (bus0 / "0000:00:05.0" / "virtio1" / "block" / "vdb").mkdir(parents=True)
    port = bus0 / "0000:00:1b.0"
    (port / "pci_bus" / "0000:01").mkdir(parents=True)
    (port / "0000:01:00.0" / "virtio4" / "block" / "vdc").mkdir(parents=True)
    (bus0 / "0000:00:1c.0" / "pci_bus" / "0000:02").mkdir(parents=True)  # an empty root port
    return bus0


def test_a_pci_path_resolves_through_sysfs_to_the_disk_behind_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A virtio-blk-pci disk hot-plugged behind a root port (qemu) is named by its PCI path "1b/00"
    (upstream's PciPath), resolved as kata-agent does: root bus slot, the bridge's secondary bus, the slot
    behind it."""
    from kata_agent import _devices
    from kata_proto import ttrpc

    monkeypatch.setattr(_devices, "PCI_ROOT", str(fake_pci_sysfs(tmp_path)))
    assert _devices.guest_block_node("1b/00") == "/dev/vdc"
    assert _devices.guest_block_node("1B/00") == "/dev/vdc"
    assert _devices.guest_block_node("05") == "/dev/vdb"  # a root-bus device (cold-plugged)
    assert _devices.pci_device_sysfs("1b/00") == f"{tmp_path}/pci0000:00/0000:00:1b.0/0000:01:00.0"
    for missing in ("1c/00", "1d/00", "06", "05/00"):  # empty port, no port, no device, not a bridge
        with pytest.raises(ttrpc.NotFound):
            _devices.guest_block_node(missing)
    with pytest.raises(ttrpc.InvalidArgument, match="over 1f"):
        _devices.guest_block_node("20/00")
    with pytest.raises(ttrpc.NotFound):  # not a PCI path: a /dev/disk/by-path name, absent here
        _devices.guest_block_node("1b/../00")


def test_create_waits_for_a_hot_plugged_pci_disk_and_its_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk appears behind its root port a moment after CreateContainer comes: devices and block
    storages named by PCI path are waited for (bounded) before they are used."""
    from types import SimpleNamespace

    from kata_agent import _devices
    from kata_proto import ttrpc

    bus0, dev = tmp_path / "pci0000:00", tmp_path / "dev"
    dev.mkdir()
    monkeypatch.setattr(_devices, "PCI_ROOT", str(bus0))
    monkeypatch.setattr(_devices, "DEV_DIR", str(dev))

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def plug() -> None:
                await trio.sleep(0.2)
                fake_pci_sysfs(tmp_path)
                await trio.sleep(0.2)
                (dev / "vdc").touch()  # devtmpfs makes the node once the driver registered the disk

            nursery.start_soon(plug)
            with trio.fail_after(30):
                await _devices.wait_for_storages([SimpleNamespace(driver="blk", source="1b/00")], 30)
            assert (dev / "vdc").exists()  # it waited for both
            with trio.fail_after(30):
                await _devices.wait_for_devices([SimpleNamespace(type="blk", vm_path="1b/00")], 30)
        # a name that can never be a disk is refused at once, not waited for
        with pytest.raises(ttrpc.InvalidArgument):
            await _devices.wait_for_devices([SimpleNamespace(type="blk", vm_path="ff/00")], 30)

    trio.run(main)
