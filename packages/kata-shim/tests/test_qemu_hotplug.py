"""Hot-plug on the qemu back-end against the fake QEMU (fixtures/fake_qemu.py), which checks what QEMU 7.2
checks (buses, ids, node names in use, named fds) and logs every QMP command: the exact sequences and
arguments for block, net and vCPUs, the fds that reach QEMU over SCM_RIGHTS, and the failure paths (a failed
device_add or netdev_add undone, a guest that never lets a device go)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from test_qemu import config, fake_vsock, run_vm, share  # type: ignore[import-not-found]

from kata_shim.hypervisor import BlockDevice, HypervisorConfig, HypervisorError, NetworkDevice, _qemu
from kata_shim.hypervisor._qemu import Qemu, UnplugTimeout
from kata_shim.hypervisor._qmp import QmpCommandError, QmpTimeout

__all__ = ["config", "share"]  # fixtures from test_qemu
pytestmark = pytest.mark.usefixtures("reap_fakes")
STARTUP = ("query-cpus-fast", "cont", "x-query-machine", "quit")
"""Commands of the start, the stop and the tests themselves, left out of the sequences asserted."""


@pytest.fixture
def qmp_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "qmp.jsonl"
    monkeypatch.setenv("FAKE_QEMU_QMP_LOG", str(path))
    return path


@pytest.fixture
def disks(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / f"disk{i}.img" for i in range(3)]
    for path in paths:
        path.write_bytes(b"\0" * 4096)
    return paths


def commands(log: Path, *, skip: tuple[str, ...] = STARTUP) -> list[tuple[str, dict[str, Any]]]:
    """(command, arguments) QEMU got, in order (the start and the tests' own queries left out)."""
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    return [(e["execute"], e["arguments"]) for e in entries if e["execute"] not in skip]


async def machine(hv: Qemu) -> dict[str, list[Any]]:
    """The fake's hot-plug state: device ids, block nodes, netdevs, named fds, CPU sockets."""
    return dict(await hv.execute("x-query-machine"))


def block_add(node: str, path: Path, read_only: bool) -> tuple[str, dict[str, Any]]:
    return (
        "blockdev-add",
        {
            "driver": "raw",
            "node-name": node,
            "read-only": read_only,
            "cache": {"direct": True, "no-flush": False},
            "file": {"driver": "file", "filename": str(path), "aio": "threads", "read-only": read_only},
        },
    )


def blk(ident: str, node: str, bus: str) -> dict[str, Any]:
    return {"driver": "virtio-blk-pci", "id": ident, "drive": node, "bus": bus, "addr": "0x0"}


def test_block_hot_add_and_remove_send_the_exact_qmp_sequence_on_free_root_ports(
    config: HypervisorConfig, root: Path, share: Path, qmp_log: Path, disks: list[Path]
) -> None:
    async def body(hv: Qemu) -> dict[str, Any]:
        facts: dict[str, Any] = {}
        first = BlockDevice(disks[0], read_only=True, device_id="c1:/dev/xvda-with-a-long-name")
        second = BlockDevice(disks[1])
        facts["infos"] = [await hv.add_device(first), await hv.add_device(second)]
        facts["plugged"] = await machine(hv)
        await hv.remove_device(first)
        facts["after_remove"] = await machine(hv)
        facts["reused"] = await hv.add_device(BlockDevice(disks[2]))  # rp0 is free again
        with pytest.raises(HypervisorError, match="already attached"):
            await hv.add_device(second)
        with pytest.raises(HypervisorError, match="not attached"):
            await hv.remove_device(first)
        return facts

    facts, _ = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    # root ports rp0..rp3 are at 0x1b..0x1e; each device at address 0 behind its port
    assert [i.pci_path for i in facts["infos"]] == ["1b/00", "1c/00"]
    assert all(i.guest_path == "" and i.mmio_address == 0 for i in facts["infos"])
    assert facts["reused"].pci_path == "1b/00"
    assert facts["plugged"]["devices"] == ["blk-hp0", "blk-hp1"]
    assert facts["plugged"]["nodes"] == ["drive-hp0", "drive-hp1"]
    assert facts["after_remove"]["devices"] == ["blk-hp1"] and facts["after_remove"]["nodes"] == ["drive-hp1"]
    assert commands(qmp_log) == [
        block_add("drive-hp0", disks[0], True),
        (
            "device_add",
            {
                "driver": "virtio-blk-pci",
                "id": "blk-hp0",
                "drive": "drive-hp0",
                "serial": "c1:/dev/xvda-with-a-",  # device_id, cut to virtio-blk's 20 bytes
                "bus": "rp0",
                "addr": "0x0",
            },
        ),
        block_add("drive-hp1", disks[1], False),
        ("device_add", blk("blk-hp1", "drive-hp1", "rp1")),
        ("device_del", {"id": "blk-hp0"}),
        ("blockdev-del", {"node-name": "drive-hp0"}),
        block_add("drive-hp2", disks[2], False),
        ("device_add", blk("blk-hp2", "drive-hp2", "rp0")),
    ]  # fmt: skip


def test_all_root_ports_in_use_refuses_before_any_qmp_command(
    config: HypervisorConfig, root: Path, share: Path, qmp_log: Path, disks: list[Path]
) -> None:
    config.pcie_root_port = 1

    async def body(hv: Qemu) -> None:
        assert (await hv.add_device(BlockDevice(disks[0]))).pci_path == "1e/00"
        with pytest.raises(HypervisorError, match="no free hot-plug root port"):
            await hv.add_device(BlockDevice(disks[1]))

    run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert [c for c, _ in commands(qmp_log)] == ["blockdev-add", "device_add"]


def test_failed_device_add_takes_the_block_node_out_and_records_nothing(
    config: HypervisorConfig,
    root: Path,
    share: Path,
    *,
    qmp_log: Path,
    disks: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_QEMU_FAIL", "device_add")

    async def body(hv: Qemu) -> dict[str, Any]:
        with pytest.raises(QmpCommandError, match="device_add failed"):
            await hv.add_device(BlockDevice(disks[0]))
        with pytest.raises(HypervisorError, match="not attached"):
            await hv.remove_device(BlockDevice(disks[0]))
        return await machine(hv)

    state, _ = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert state["nodes"] == [] and state["devices"] == []
    assert [c for c, _ in commands(qmp_log)] == ["blockdev-add", "device_add", "blockdev-del"]
    assert commands(qmp_log)[-1] == ("blockdev-del", {"node-name": "drive-hp0"})


def test_a_cold_plugged_device_cannot_be_hot_removed(
    config: HypervisorConfig, root: Path, share: Path, disks: list[Path]
) -> None:
    hv = Qemu(config, state_root=root, open_vsock=fake_vsock)
    cold = BlockDevice(disks[0])

    async def body(hv: Qemu) -> None:
        await hv.start_vm(30)
        with pytest.raises(HypervisorError, match="cold-plugged on the root bus"):
            await hv.remove_device(cold)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.add_device(cold)
        try:
            await body(hv)
        finally:
            with trio.CancelScope(shield=True):
                await hv.cleanup()

    trio.run(main)


# --- network: the tap and vhost-net fds go to QEMU with getfd (SCM_RIGHTS) ----------------------------
@pytest.fixture
def fake_taps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int | None]]:
    """`_open_tap` opens two files of the test instead of a tap and /dev/vhost-net (no host tap is made);
    the fds it returned are listed, to check they reached QEMU and that the shim closed its copies."""
    opened: list[tuple[int, int | None]] = []

    async def open_tap(self: Qemu, device: NetworkDevice, fds: list[int]) -> tuple[int, int | None]:
        tap = os.open(tmp_path / f"{device.tap}.tap", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        fds.append(tap)
        vhost = os.open(tmp_path / f"{device.tap}.vhost", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        fds.append(vhost)
        opened.append((tap, vhost))
        return tap, vhost

    monkeypatch.setattr(Qemu, "_open_tap", open_tap)
    return opened


def test_net_hot_add_passes_tap_and_vhost_fds_by_getfd_then_netdev_add_and_device_add(
    config: HypervisorConfig,
    root: Path,
    share: Path,
    *,
    qmp_log: Path,
    tmp_path: Path,
    fake_taps: list[tuple[int, int | None]],
) -> None:
    nic = NetworkDevice("tap0_kata", "02:00:00:00:00:07")

    async def body(hv: Qemu) -> dict[str, Any]:
        facts: dict[str, Any] = {"info": await hv.add_device(nic)}
        facts["plugged"] = await machine(hv)
        facts["ours"] = our_fd_links()
        await hv.remove_device(nic)
        facts["removed"] = await machine(hv)
        return facts

    facts, _ = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert facts["info"].pci_path == "1b/00"
    assert facts["plugged"]["devices"] == ["net-hp0"] and facts["plugged"]["netdevs"] == ["netdev-hp0"]
    assert facts["plugged"]["fds"] == []  # netdev_add took both named fds
    assert facts["removed"]["devices"] == [] and facts["removed"]["netdevs"] == []
    # the shim closed its copies once QEMU had them
    assert not {str(tmp_path / "tap0_kata.tap"), str(tmp_path / "tap0_kata.vhost")} & facts["ours"]
    sent = [json.loads(line) for line in qmp_log.read_text().splitlines()]
    getfds = [e for e in sent if e["execute"] == "getfd"]
    assert [(e["arguments"]["fdname"], e["fd"]["link"]) for e in getfds] == [
        ("fd-hp0", str(tmp_path / "tap0_kata.tap")),  # the very files the shim opened arrived
        ("vhostfd-hp0", str(tmp_path / "tap0_kata.vhost")),
    ]
    assert commands(qmp_log, skip=(*STARTUP, "getfd")) == [
        ("netdev_add", {"type": "tap", "id": "netdev-hp0", "fd": "fd-hp0",
                        "vhost": True, "vhostfd": "vhostfd-hp0"}),
        ("device_add", {"driver": "virtio-net-pci", "id": "net-hp0", "netdev": "netdev-hp0",
                        "mac": "02:00:00:00:00:07", "bus": "rp0", "addr": "0x0"}),
        ("device_del", {"id": "net-hp0"}),
        ("netdev_del", {"id": "netdev-hp0"}),
    ]  # fmt: skip


@pytest.mark.parametrize("failing", ["netdev_add", "device_add"])
def test_failed_net_hot_add_leaves_no_fd_netdev_or_device_in_qemu(
    config: HypervisorConfig,
    root: Path,
    share: Path,
    *,
    qmp_log: Path,
    fake_taps: list[tuple[int, int | None]],
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    monkeypatch.setenv("FAKE_QEMU_FAIL", failing)
    nic = NetworkDevice("tap0_kata", "")

    async def body(hv: Qemu) -> dict[str, Any]:
        with pytest.raises(QmpCommandError, match=failing):
            await hv.add_device(nic)
        with pytest.raises(HypervisorError, match="not attached"):
            await hv.remove_device(nic)
        return await machine(hv)

    state, _ = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert state["fds"] == [] and state["netdevs"] == [] and state["devices"] == []
    undo = {
        "netdev_add": [("closefd", {"fdname": "fd-hp0"}), ("closefd", {"fdname": "vhostfd-hp0"})],
        "device_add": [("netdev_del", {"id": "netdev-hp0"})],
    }
    assert commands(qmp_log, skip=(*STARTUP, "getfd"))[-len(undo[failing]) :] == undo[failing]
    assert len(fake_taps) == 1 and not any("tap0_kata" in link for link in our_fd_links())


def our_fd_links() -> set[str]:
    """What this process's fds are open on."""
    links = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return links


# --- a guest that never lets a device go ----------------------------------------------------------
def test_device_deleted_never_coming_is_a_typed_timeout_and_the_device_stays_recorded(
    config: HypervisorConfig,
    root: Path,
    share: Path,
    *,
    qmp_log: Path,
    disks: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "no-eject")
    monkeypatch.setattr(_qemu, "UNPLUG_TIMEOUT", 0.5)
    disk = BlockDevice(disks[0])

    async def body(hv: Qemu) -> dict[str, Any]:
        await hv.add_device(disk)
        with pytest.raises(UnplugTimeout, match=r"did not release blk-hp0 within 0\.5 s"):
            await hv.remove_device(disk)
        # still recorded: a second try waits again for the unplug QEMU has pending, no second port is used
        with pytest.raises(UnplugTimeout):
            await hv.remove_device(disk)
        assert (await hv.add_device(BlockDevice(disks[1]))).pci_path == "1c/00"
        return await machine(hv)

    state, _ = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert state["devices"] == ["blk-hp0", "blk-hp1"] and state["nodes"] == ["drive-hp0", "drive-hp1"]
    assert [c for c, _ in commands(qmp_log)].count("blockdev-del") == 0  # never under a live device


def test_qemu_gone_while_an_unplug_waits_ends_the_wait_with_its_own_error(
    config: HypervisorConfig, root: Path, share: Path, *, disks: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 15-hp-d: QEMU dies while the shim waits for the guest's eject: the wait ends on QMP's close
    with an error that says so, not as an UnplugTimeout after the whole UNPLUG_TIMEOUT."""
    monkeypatch.setenv("FAKE_QEMU_MODE", "no-eject")
    monkeypatch.setattr(_qemu, "UNPLUG_TIMEOUT", 600.0)
    disk = BlockDevice(disks[0])

    async def body(hv: Qemu) -> str:
        await hv.add_device(disk)
        qemu_pid = hv.pids()[0]

        async def kill_soon() -> None:
            await trio.sleep(0.3)
            os.kill(qemu_pid, signal.SIGKILL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_soon)
            with pytest.raises(HypervisorError) as info:
                await hv.remove_device(disk)
        return str(info.value) if not isinstance(info.value, UnplugTimeout) else "UnplugTimeout"

    message, _ = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert "QMP closed" in message, message


# --- vCPUs ------------------------------------------------------------------------------------------
def test_resize_vcpu_adds_the_cpu_slots_qemu_reports_and_removes_its_own_newest_first(
    config: HypervisorConfig, root: Path, share: Path, qmp_log: Path
) -> None:
    config.default_vcpus, config.default_maxvcpus = 1, 4

    async def body(hv: Qemu) -> dict[str, Any]:
        facts: dict[str, Any] = {"grow": await hv.resize_vcpu(1, 3)}
        facts["threads"] = len(hv.vcpu_thread_ids())
        facts["capped"] = await hv.resize_vcpu(3, 9)
        facts["same"] = await hv.resize_vcpu(4, 4)
        facts["shrink"] = await hv.resize_vcpu(4, 1)
        facts["threads_after"] = len(hv.vcpu_thread_ids())
        facts["cpus"] = (await machine(hv))["cpus"]
        with pytest.raises(HypervisorError, match="cannot resize to 0"):
            await hv.resize_vcpu(1, 0)
        return facts

    facts, _ = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert facts["grow"] == (1, 3) and facts["threads"] == 3
    assert facts["capped"] == (3, 4) and facts["same"] == (4, 4)
    assert facts["shrink"] == (4, 1) and facts["threads_after"] == 1 and facts["cpus"] == [0]

    def cpu(n: int, socket: int) -> tuple[str, dict[str, Any]]:
        props = {"socket-id": socket, "core-id": 0, "thread-id": 0}
        return ("device_add", {"driver": "qemu64-x86_64-cpu", **props, "id": f"cpu-hp{n}"})

    assert commands(qmp_log, skip=("cont", "x-query-machine", "quit")) == [
        ("query-cpus-fast", {}),  # at start
        ("query-hotpluggable-cpus", {}),
        cpu(0, 1),
        cpu(1, 2),
        ("query-cpus-fast", {}),
        ("query-hotpluggable-cpus", {}),
        cpu(2, 3),
        ("query-cpus-fast", {}),
        ("query-hotpluggable-cpus", {}),
        ("query-cpus-fast", {}),
        ("query-hotpluggable-cpus", {}),
        # QEMU 7.2 sends DEVICE_DELETED for a vCPU's lapic only: it wakes the wait, query-cpus-fast confirms
        ("device_del", {"id": "cpu-hp2"}),
        ("query-cpus-fast", {}),
        ("device_del", {"id": "cpu-hp1"}),
        ("query-cpus-fast", {}),
        ("device_del", {"id": "cpu-hp0"}),
        ("query-cpus-fast", {}),
        ("query-cpus-fast", {}),  # the thread ids
    ]


def test_vcpu_removal_the_guest_never_acks_is_a_typed_timeout(
    config: HypervisorConfig, root: Path, share: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config.default_vcpus, config.default_maxvcpus = 1, 2
    monkeypatch.setenv("FAKE_QEMU_MODE", "no-eject")
    monkeypatch.setattr(_qemu, "UNPLUG_TIMEOUT", 0.5)

    async def body(hv: Qemu) -> tuple[tuple[int, int], list[int]]:
        grown = await hv.resize_vcpu(1, 2)
        with pytest.raises(UnplugTimeout, match="cpu-hp0"):
            await hv.resize_vcpu(2, 1)
        return grown, (await machine(hv))["cpus"]

    (grown, cpus), _ = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert grown == (1, 2) and cpus == [0, 1]


# --- QEMU that does not answer in time ----------------------------------------------------------------
@pytest.mark.parametrize("late", ["FAKE_QEMU_LATE", "FAKE_QEMU_DROP"])
def test_device_add_without_an_answer_records_what_qemu_has(
    config: HypervisorConfig,
    root: Path,
    share: Path,
    *,
    qmp_log: Path,
    disks: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    late: str,
) -> None:
    """device_add times out: QEMU is asked what it has (qom-list /machine/peripheral). A device it has is
    recorded (and can be removed); one it lacks is an error with the block node taken out again."""
    monkeypatch.setenv(late, "device_add")

    async def body(hv: Qemu) -> dict[str, Any]:
        monkeypatch.setattr(_qemu, "QMP_TIMEOUT", 2.0)  # the fake answers a late device_add after 6 s
        disk = BlockDevice(disks[0])
        if late == "FAKE_QEMU_LATE":
            assert (await hv.add_device(disk)).pci_path == "1b/00"
            monkeypatch.setattr(_qemu, "QMP_TIMEOUT", 10.0)
            await hv.remove_device(disk)
        else:
            with pytest.raises(QmpTimeout, match="device_add"):
                await hv.add_device(disk)
            monkeypatch.setattr(_qemu, "QMP_TIMEOUT", 10.0)
            with pytest.raises(HypervisorError, match="not attached"):
                await hv.remove_device(disk)
        return await machine(hv)

    state, _ = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert state["devices"] == [] and state["nodes"] == []
    sent = [c for c, _ in commands(qmp_log)]
    if late == "FAKE_QEMU_LATE":
        assert sent == ["blockdev-add", "device_add", "qom-list", "device_del", "blockdev-del"]
    else:
        assert sent == ["blockdev-add", "device_add", "qom-list", "blockdev-del"]


def test_a_disk_not_to_be_reached_through_a_symlink_goes_to_qemu_as_an_fd_and_its_set_goes_with_it(
    config: HypervisorConfig, root: Path, share: Path, qmp_log: Path, disks: list[Path]
) -> None:
    """A blockfile snapshot (`BlockDevice.follow_symlinks` False): the shim opens it (O_NOFOLLOW, as read
    or write as asked), ``add-fd`` hands QEMU the fd, the node's file is ``/dev/fdset/<id>``; the set goes
    after the node. A symlink there is refused before any command; the cold path refuses such a disk."""
    link = disks[2].with_name("link.img")
    link.symlink_to(disks[2])

    async def body(hv: Qemu) -> dict[str, Any]:
        facts: dict[str, Any] = {}
        snapshot = BlockDevice(disks[0], device_id="c1:rootfs", follow_symlinks=False)
        view = BlockDevice(disks[1], read_only=True, follow_symlinks=False)
        facts["info"] = await hv.add_device(snapshot)
        await hv.add_device(view)
        facts["plugged"] = await machine(hv)
        await hv.remove_device(snapshot)
        facts["after_remove"] = await machine(hv)
        with pytest.raises(HypervisorError, match="symlinks not followed"):
            await hv.add_device(BlockDevice(link, follow_symlinks=False))
        facts["after_link"] = await machine(hv)
        return facts

    facts, _ = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert facts["info"].pci_path == "1b/00"
    sets = facts["plugged"]["fdsets"]
    assert [s["link"] for s in sets.values()] == [str(disks[0]), str(disks[1])]
    assert [s["flags"] & os.O_ACCMODE for s in sets.values()] == [os.O_RDWR, os.O_RDONLY]
    assert list(facts["after_remove"]["fdsets"].values()) == [sets["1"]]  # the removed disk's set is gone
    assert facts["after_link"] == facts["after_remove"]
    file = {"aio": "threads", "driver": "file"}
    assert commands(qmp_log) == [
        ("add-fd", {"opaque": "drive-hp0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "drive-hp0", "read-only": False,
                          "cache": {"direct": True, "no-flush": False},
                          "file": {**file, "filename": "/dev/fdset/0", "read-only": False}}),
        ("device_add", {**blk("blk-hp0", "drive-hp0", "rp0"), "serial": "c1:rootfs"}),
        ("add-fd", {"opaque": "drive-hp1"}),
        ("blockdev-add", {"driver": "raw", "node-name": "drive-hp1", "read-only": True,
                          "cache": {"direct": True, "no-flush": False},
                          "file": {**file, "filename": "/dev/fdset/1", "read-only": True}}),
        ("device_add", blk("blk-hp1", "drive-hp1", "rp1")),
        ("device_del", {"id": "blk-hp0"}),
        ("blockdev-del", {"node-name": "drive-hp0"}),
        ("remove-fd", {"fdset-id": 0}),
    ]  # fmt: skip


def test_a_failed_blockdev_add_gives_the_disks_fd_set_back(
    config: HypervisorConfig,
    root: Path,
    share: Path,
    *,
    qmp_log: Path,
    disks: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_QEMU_FAIL", "blockdev-add")

    async def body(hv: Qemu) -> dict[str, Any]:
        with pytest.raises(QmpCommandError, match="blockdev-add failed"):
            await hv.add_device(BlockDevice(disks[0], follow_symlinks=False))
        return await machine(hv)

    state, _ = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert state["fdsets"] == {} and state["nodes"] == []
    assert [c for c, _ in commands(qmp_log)] == ["add-fd", "blockdev-add", "remove-fd"]


def test_the_cold_path_refuses_a_disk_that_must_not_be_reached_through_a_symlink(
    config: HypervisorConfig, root: Path, disks: list[Path]
) -> None:
    """QEMU's ``-drive file=`` opens by path, following symlinks: such a disk is hot-plug only."""
    hv = Qemu(config, state_root=root, open_vsock=fake_vsock)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        try:
            with pytest.raises(HypervisorError, match="following symlinks"):
                await hv.add_device(BlockDevice(disks[0], follow_symlinks=False))
            assert hv.devices == []
        finally:
            await hv.cleanup()

    trio.run(main)
