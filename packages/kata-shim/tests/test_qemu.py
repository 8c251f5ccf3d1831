"""The qemu back-end without a guest: exact QEMU and virtiofsd command lines, PCI paths, config checks, and
the life cycle against a fake "qemu" (a script speaking QMP on the -qmp socket) and a fake virtiofsd: start,
pause/resume, stop, guest power-off, crash, panic, virtiofsd death, a QEMU that ignores quit, a QEMU that
dies at start, the processes recorded for crash cleanup and nothing left afterwards."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from restvmm_harness import FailedStart, start_fails_leaving_nothing  # type: ignore[import-not-found]

from kata_shim.hypervisor import (
    BlockDevice,
    Capabilities,
    HypervisorConfig,
    HypervisorError,
    NetworkDevice,
    ShareFsDevice,
    _external,
    _qemu,
    _vhost,
    hypervisor_factory,
)
from kata_shim.hypervisor._qemu import Qemu
from kata_shim.persist import PROCESSES_KEY, StateStore, cleanup_sandbox, process_start_time

FIXTURES = Path(__file__).parent / "fixtures"
VSOCK_CID = 42
pytestmark = pytest.mark.usefixtures("reap_fakes")  # no fake QEMU or virtiofsd outlives its test


def _script(directory: Path, name: str) -> Path:
    target = directory / name
    target.write_text(f"#!{sys.executable}\n" + (FIXTURES / f"fake_{name}.py").read_text())
    target.chmod(0o755)
    return target


@pytest.fixture
def config(tmp_path: Path) -> HypervisorConfig:
    """Fake qemu and virtiofsd, and a kernel and image that exist."""
    (tmp_path / "vmlinux").write_bytes(b"\0")
    (tmp_path / "rootfs.img").write_bytes(b"\0" * 4096)
    return HypervisorConfig(
        path=str(_script(tmp_path, "qemu")),
        kernel=tmp_path / "vmlinux",
        image=tmp_path / "rootfs.img",
        default_memory=128,
        default_vcpus=1,
        shared_fs="virtio-fs",
        virtio_fs_daemon=str(_script(tmp_path, "virtiofsd")),
        virtio_fs_extra_args=["--thread-pool-size=1", "-o", "announce_submounts"],
        cpu_features="pmu=off",
    )


@pytest.fixture
def share(tmp_path: Path) -> Path:
    path = tmp_path / "shared"
    path.mkdir()
    return path


def fake_vsock() -> tuple[int, int]:
    return VSOCK_CID, os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)


def alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        data = stat.read_bytes()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 : data.rfind(b")") + 3] != b"Z"


def run_vm(
    hv: Qemu, share: Path, body: Callable[[Qemu], Awaitable[Any]], *, start: bool = True
) -> tuple[Any, list[int]]:
    """prepare, share, start, `body`, then cleanup (always); returns body's result and the pids seen."""
    seen: list[int] = []

    async def main() -> Any:
        try:
            await hv.prepare_vm("sb1", None)
            await hv.add_device(ShareFsDevice(share))
            if start:
                await hv.start_vm(30)
                seen.extend(hv.pids())
            return await body(hv)
        finally:
            with trio.CancelScope(shield=True):
                await hv.cleanup()

    return trio.run(main), seen


# --- registry, capabilities, config -----------------------------------------------------------------
def test_registry_resolves_qemu_to_this_class() -> None:
    assert hypervisor_factory("qemu") is Qemu


def test_capabilities_say_pci_vsock_virtio_fs_hotplug_on_q35_only_and_no_passfd(
    config: HypervisorConfig,
) -> None:
    caps = Qemu(config).capabilities()
    assert caps == Capabilities(
        block_device=True,
        hotplug=frozenset({"block", "net", "vcpu"}),
        shared_fs=frozenset({"virtio-fs"}),
        agent_transport="vsock",
        passfd=False,
        device_addressing="pci",
    )
    assert caps.fs_sharing and not caps.hybrid_vsock and caps.block_device_hotplug
    config.machine_type = "microvm"
    assert Qemu(config).capabilities().hotplug == frozenset()


def test_hot_unplug_and_vcpu_resize_need_a_running_vm(config: HypervisorConfig) -> None:
    hv = Qemu(config)
    with pytest.raises(HypervisorError, match="not running"):
        trio.run(hv.resize_vcpu, 1, 2)
    with pytest.raises(HypervisorError, match="not running"):
        trio.run(hv.remove_device, NetworkDevice("tap0_kata", ""))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"path": ""}, "no QEMU binary"),
        ({"path": "/nonexistent/qemu"}, "not found or not executable"),
        ({"valid_hypervisor_paths": ["/usr/bin/qemu-*"]}, "not in valid_hypervisor_paths"),
        ({"kernel": Path("/nonexistent/vmlinux")}, "kernel"),
        ({"image": Path("/nonexistent/img")}, "image"),
        ({"image": None}, "no root filesystem"),
        ({"virtio_fs_daemon": ""}, "virtio_fs_daemon is not set"),
        ({"valid_virtio_fs_daemon_paths": ["/usr/libexec/*"]}, "valid_virtio_fs_daemon_paths"),
        ({"shared_fs": "inline-virtio-fs"}, "not supported by qemu"),
        ({"default_memory": 32}, "default_memory"),
    ],
)
def test_prepare_refuses_a_bad_config(
    config: HypervisorConfig, root: Path, change: dict[str, Any], message: str
) -> None:
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(HypervisorError, match=message):
        trio.run(Qemu(config, state_root=root).prepare_vm, "sb1", None)


def test_prepare_creates_the_state_dir_and_starts_nothing(config: HypervisorConfig, root: Path) -> None:
    hv = Qemu(config, state_root=root)
    trio.run(hv.prepare_vm, "sb1", None)
    assert hv.state_dir == root / "sb1" and hv.state_dir.is_dir()
    # before start: the shim, whose cgroup QEMU and virtiofsd inherit
    assert hv.pids() == [os.getpid()] and hv.thread_ids() == [] and hv.vcpu_thread_ids() == []
    assert hv.passfd_listener() is None


# --- command lines --------------------------------------------------------------------------------
def test_qemu_argv_has_exactly_the_flags_for_each_device(
    config: HypervisorConfig, root: Path, share: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "disk,1.img"
    disk.write_bytes(b"\0" * 512)
    config.kernel_params = "agent.log=debug"
    config.default_maxvcpus = 4
    hv = Qemu(config, state_root=root)

    async def main() -> list[Any]:
        await hv.prepare_vm("sb1", None)
        return [
            await hv.add_device(ShareFsDevice(share, "kataShared")),
            await hv.add_device(NetworkDevice("tap0_kata", "02:00:00:00:00:01")),
            await hv.add_device(BlockDevice(disk, read_only=True, device_id="c1")),
        ]

    infos = trio.run(main)
    assert [i.pci_path for i in infos] == ["05", "06", "07"]
    assert infos[2].guest_path == "/dev/vdb"  # the image is /dev/vda
    state = root / "sb1"
    argv = hv.qemu_argv(vsock=(VSOCK_CID, 33), net_fds={6: (34, 35)})
    assert argv == [
        config.path,
        "-name", "sandbox-sb1,debug-threads=on",
        "-machine", "q35,accel=kvm,memory-backend=mem",
        "-cpu", "host,pmu=off",
        "-smp", "1,maxcpus=4",
        "-m", "128M",
        "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
        "-nodefaults", "-nographic", "-no-user-config", "-no-reboot",
        "-S",
        "-qmp", f"unix:{state}/qmp.sock,server=on,wait=off",
        "-serial", "stdio",
        "-kernel", str(config.kernel),
        "-append", "console=ttyS0 reboot=k panic=1 quiet agent.log=debug",
        "-drive", f"if=none,id=image,file={config.image},format=raw,readonly=on",
        "-device", "virtio-blk-pci,drive=image,bus=pcie.0,addr=0x2",
        "-device", "vhost-vsock-pci,id=vsock,guest-cid=42,vhostfd=33,bus=pcie.0,addr=0x3",
        "-object", "rng-random,id=rng,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=rng,bus=pcie.0,addr=0x4",
        "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,addr=0x1b",
        "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=2,addr=0x1c",
        "-device", "pcie-root-port,id=rp2,bus=pcie.0,chassis=3,addr=0x1d",
        "-device", "pcie-root-port,id=rp3,bus=pcie.0,chassis=4,addr=0x1e",
        "-chardev", f"socket,id=fs0,path={state}/vhost-fs.sock",
        "-device", "vhost-user-fs-pci,chardev=fs0,tag=kataShared,queue-size=1024,bus=pcie.0,addr=0x5",
        "-netdev", "tap,id=net1,fd=34,vhost=on,vhostfd=35",
        "-device", "virtio-net-pci,netdev=net1,mac=02:00:00:00:00:01,bus=pcie.0,addr=0x6",
        "-drive", f"if=none,id=blk2,file={tmp_path}/disk,,1.img,format=raw,readonly=on,{_qemu.BLOCK_OPTS}",
        "-device", "virtio-blk-pci,drive=blk2,serial=c1,bus=pcie.0,addr=0x7",
    ]  # fmt: skip
    # without vhost-net, and with an initrd
    config.initrd = config.image
    argv = hv.qemu_argv(vsock=None, net_fds={6: (34, None)})
    assert "-initrd" in argv and argv[argv.index("-initrd") + 1] == str(config.image)
    assert "tap,id=net1,fd=34,vhost=off" in argv
    assert not any(a.startswith("vhost-vsock-pci") for a in argv)


def test_root_port_count_comes_from_pcie_root_port_and_microvm_has_none(
    config: HypervisorConfig, root: Path, share: Path
) -> None:
    config.pcie_root_port = 2
    config.default_maxvcpus = 3
    hv = Qemu(config, state_root=root)
    trio.run(hv.prepare_vm, "sb1", None)
    argv = hv.qemu_argv()
    ports = [a for a in argv if a.startswith("pcie-root-port")]
    assert ports == [
        "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,addr=0x1d",
        "pcie-root-port,id=rp1,bus=pcie.0,chassis=2,addr=0x1e",
    ]
    # the cold-plug slots end below the root ports: 05..0x1c
    for _ in range(0x1C - 5 + 1):
        trio.run(hv.add_device, NetworkDevice("tap0", ""))
    with pytest.raises(HypervisorError, match="no free PCI slot"):
        trio.run(hv.add_device, NetworkDevice("tap0", ""))
    config.machine_type = "microvm"
    micro = Qemu(config, state_root=root)
    trio.run(micro.prepare_vm, "sb2", None)
    argv = micro.qemu_argv()
    assert not any(a.startswith("pcie-root-port") for a in argv)
    assert argv[argv.index("-smp") + 1] == "1"
    # a host with more CPUs than QEMU's q35 takes without x2APIC: maxcpus is capped as upstream (240)
    config.machine_type, config.default_maxvcpus = "q35", 1000
    big = Qemu(config, state_root=root)
    trio.run(big.prepare_vm, "sb4", None)
    assert big.qemu_argv()[big.qemu_argv().index("-smp") + 1] == "1,maxcpus=240"
    config.default_vcpus = 250  # asked for: never below the boot vCPUs
    assert big.qemu_argv()[big.qemu_argv().index("-smp") + 1] == "250,maxcpus=250"
    config.default_vcpus, config.pcie_root_port = 1, 17
    with pytest.raises(HypervisorError, match="pcie_root_port = 17"):
        trio.run(Qemu(config, state_root=root).prepare_vm, "sb3", None)


def test_machine_accelerators_accel_replaces_kvm_and_the_cpu_becomes_max(
    config: HypervisorConfig, root: Path
) -> None:
    config.machine_accelerators = "accel=tcg,nosmm"
    config.enable_debug = True
    hv = Qemu(config, state_root=root)
    trio.run(hv.prepare_vm, "sb1", None)
    argv = hv.qemu_argv()
    assert argv[argv.index("-machine") + 1] == "q35,accel=tcg,nosmm,memory-backend=mem"
    assert argv[argv.index("-cpu") + 1] == "max,pmu=off"
    assert "quiet" not in argv[argv.index("-append") + 1]


def test_virtiofsd_argv_is_socket_source_cache_and_the_extra_args(
    config: HypervisorConfig, root: Path, share: Path
) -> None:
    hv = Qemu(config, state_root=root)
    trio.run(hv.prepare_vm, "sb1", None)
    assert hv.virtiofsd_argv(ShareFsDevice(share)) == [
        config.virtio_fs_daemon,
        f"--socket-path={root}/sb1/vhost-fs.sock",
        "-o", f"source={share}",
        "-o", "cache=auto",
        "--thread-pool-size=1", "-o", "announce_submounts",
    ]  # fmt: skip


def test_add_device_refuses_before_prepare_a_second_share_and_missing_paths(
    config: HypervisorConfig, root: Path, share: Path
) -> None:
    hv = Qemu(config, state_root=root)

    async def main() -> None:
        with pytest.raises(HypervisorError, match="before prepare_vm"):
            await hv.add_device(ShareFsDevice(share))
        await hv.prepare_vm("sb1", None)
        await hv.add_device(ShareFsDevice(share))
        with pytest.raises(HypervisorError, match="one shared directory"):
            await hv.add_device(ShareFsDevice(share, "other"))
        with pytest.raises(HypervisorError, match="not found"):
            await hv.add_device(BlockDevice(Path("/nonexistent/disk")))

    trio.run(main)


# --- life cycle against the fakes -----------------------------------------------------------------
def test_life_cycle_start_pause_resume_stop_and_nothing_left(
    config: HypervisorConfig, root: Path, share: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "qemu.json"
    fsd_record = tmp_path / "virtiofsd.json"
    monkeypatch.setenv("FAKE_QEMU_RECORD", str(record))
    monkeypatch.setenv("FAKE_VIRTIOFSD_RECORD", str(fsd_record))
    hv = Qemu(config, state_root=root, open_vsock=fake_vsock)

    async def body(hv: Qemu) -> dict[str, Any]:
        qemu_pid, fsd_pid = hv.pids()
        facts: dict[str, Any] = {
            "status": await hv.query_status(),
            "vcpus": hv.vcpu_thread_ids(),
            "threads": hv.thread_ids(),
            "address": hv.agent_address(),
            "state": StateStore(root).load("sb1"),
        }
        await hv.pause_vm()
        facts["paused"] = await hv.query_status()
        await hv.resume_vm()
        facts["resumed"] = await hv.query_status()
        await hv.stop_vm()
        facts["code"] = await hv.wait_vm()
        facts["reason"] = hv.exit_reason()
        facts["events"] = [e["event"] for e in hv.events()]
        facts["alive_after_stop"] = [p for p in (qemu_pid, fsd_pid) if alive(p)]
        await hv.stop_vm()  # idempotent
        return facts

    facts, pids = run_vm(hv, share, body)
    qemu_pid, fsd_pid = pids
    assert facts["status"] == "running"  # started with -S, then cont
    assert facts["vcpus"] == [qemu_pid] and qemu_pid in facts["threads"]
    assert facts["address"] == f"vsock://{VSOCK_CID}:1024"
    state = facts["state"]
    assert state is not None
    assert [(p["name"], p["pid"]) for p in state.extra[PROCESSES_KEY]] == [
        ("qemu", qemu_pid),
        ("virtiofsd", fsd_pid),
    ]
    assert all(
        p["start_time"] == process_start_time(p["pid"]) or not alive(p["pid"])
        for p in state.extra[PROCESSES_KEY]
    )
    assert facts["paused"] == "paused" and facts["resumed"] == "running"
    assert facts["code"] == 0 and "shutdown: host-qmp-quit" in facts["reason"]
    assert facts["events"] == ["RESUME", "STOP", "RESUME", "SHUTDOWN"]
    assert facts["alive_after_stop"] == []
    # the vhost-vsock fd went to QEMU (fd 3 here, as passed) and the command line names it
    seen = json.loads(record.read_text())
    vsock_arg = next(a for a in seen["argv"] if a.startswith("vhost-vsock-pci"))
    fd = int(vsock_arg.split("vhostfd=")[1].split(",")[0])
    assert fd in seen["fds"]
    assert json.loads(fsd_record.read_text())[1] == f"--socket-path={root}/sb1/vhost-fs.sock"
    # cleanup: sockets gone, the processes' record gone, nothing running, our fds closed
    assert not (root / "sb1" / "qmp.sock").exists() and not (root / "sb1" / "vhost-fs.sock").exists()
    after = StateStore(root).load("sb1")
    assert after is not None and PROCESSES_KEY not in after.extra
    assert hv.pids() == []


@pytest.mark.parametrize(
    "case",
    [
        ("x-guest-poweroff", 0, "shutdown: guest-shutdown; qemu exited with code 0"),
        ("x-guest-reset", 0, "shutdown: guest-reset"),
        ("x-guest-panic", 1, "guest panicked"),
    ],
    ids=["poweroff", "reset", "panic"],
)
def test_guest_end_is_seen_through_qmp_events_and_exit(
    config: HypervisorConfig, root: Path, share: Path, case: tuple[str, int, str]
) -> None:
    command, code, reason = case

    async def body(hv: Qemu) -> tuple[int, str]:
        await hv.execute(command)
        with trio.fail_after(60):
            result = await hv.wait_vm()
        return result, hv.exit_reason()

    (result, why), pids = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert result == code and reason in why
    assert not any(alive(p) for p in pids)


def test_qemu_killed_is_a_crash_and_virtiofsd_is_stopped(
    config: HypervisorConfig, root: Path, share: Path
) -> None:
    async def body(hv: Qemu) -> tuple[int, str]:
        os.kill(hv.pids()[0], signal.SIGKILL)
        with trio.fail_after(60):
            result = await hv.wait_vm()
        return result, hv.exit_reason()

    (result, why), pids = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert result == 1 and "qemu killed by SIGKILL" in why
    assert not any(alive(p) for p in pids)


def test_virtiofsd_killed_stops_qemu_and_ends_the_vm(
    config: HypervisorConfig, root: Path, share: Path
) -> None:
    async def body(hv: Qemu) -> tuple[int, str]:
        os.kill(hv.pids()[1], signal.SIGKILL)
        with trio.fail_after(60):
            result = await hv.wait_vm()
        return result, hv.exit_reason()

    (result, why), pids = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert result == 1 and "virtiofsd killed by SIGKILL" in why and "shared directory" in why
    assert not any(alive(p) for p in pids)


def test_qemu_that_ignores_quit_is_killed_after_the_grace(
    config: HypervisorConfig, root: Path, share: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "ignore-quit")
    monkeypatch.setattr(_external, "STOP_GRACE", 0.5)

    async def body(hv: Qemu) -> str:
        await hv.stop_vm()
        return hv.exit_reason()

    why, pids = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert "qemu killed by SIGKILL" in why
    assert not any(alive(p) for p in pids)


def test_qemu_dying_at_start_raises_with_its_output_and_leaves_nothing(
    config: HypervisorConfig, root: Path, share: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_QEMU_MODE", "die")
    hv = Qemu(config, state_root=root, open_vsock=fake_vsock)
    seen: list[int] = []

    async def body(hv: Qemu) -> None:
        with pytest.raises(HypervisorError) as caught:
            await hv.start_vm(30)
        seen.extend(p for p in (hv._qemu, hv._virtiofsd) if p is not None for p in [p.pid])
        assert "qemu exited with code 1" in str(caught.value)
        assert "could not open vhost device" in str(caught.value)  # QEMU's last words
        state = StateStore(root).load("sb1")
        assert state is not None  # both recorded for crash cleanup until the back-end's cleanup
        assert [p["name"] for p in state.extra[PROCESSES_KEY]] == ["qemu", "virtiofsd"]

    run_vm(hv, share, body, start=False)
    assert len(seen) == 2 and not any(alive(p) for p in seen)
    assert hv.pids() == []


@pytest.mark.parametrize("case", [("die", 30, "exited with code 1"), ("hang", 5, "timed out")])
def test_failed_start_kills_and_reaps_qemu_and_virtiofsd_before_raising(
    config: HypervisorConfig, root: Path, share: Path, tmp_path: Path, case: FailedStart
) -> None:
    """QEMU dying or never serving QMP: QEMU and virtiofsd are both killed and reaped, and their sockets
    removed, by the time start_vm raises (not only at cleanup)."""

    async def body(hv: Qemu) -> None:
        await start_fails_leaving_nothing(hv, "FAKE_QEMU_MODE", case, tmp_path, children=2)

    run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body, start=False)


def test_microvm_refuses_hotplug_after_start(config: HypervisorConfig, root: Path, share: Path) -> None:
    config.machine_type = "microvm"

    async def body(hv: Qemu) -> None:
        with pytest.raises(HypervisorError, match="cannot hot-plug a NetworkDevice on machine microvm"):
            await hv.add_device(NetworkDevice("tap1", ""))
        with pytest.raises(HypervisorError, match="cannot hot-plug a vCPU on machine microvm"):
            await hv.resize_vcpu(1, 2)

    run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)


def test_cleanup_is_idempotent_and_works_without_start(
    config: HypervisorConfig, root: Path, share: Path
) -> None:
    hv = Qemu(config, state_root=root, open_vsock=fake_vsock)

    async def body(hv: Qemu) -> None:
        await hv.cleanup()
        await hv.cleanup()

    run_vm(hv, share, body, start=False)


# --- after a shim crash: containerd's delete kills what state.json recorded ----------------------
def test_crash_cleanup_kills_the_recorded_qemu_and_virtiofsd(
    config: HypervisorConfig, root: Path, share: Path
) -> None:
    async def body(hv: Qemu) -> tuple[list[int], list[int]]:
        pids = hv.pids()
        # what `containerd-shim-kata-v2 delete` does once the shim is gone
        report = await trio.to_thread.run_sync(
            lambda: cleanup_sandbox("sb1", StateStore(root, shared_root=root / "none"), kill_shim=False)
        )
        with trio.fail_after(60):
            await hv.wait_vm()
        return pids, report.killed

    (pids, killed), _ = run_vm(Qemu(config, state_root=root, open_vsock=fake_vsock), share, body)
    assert sorted(killed) == sorted(pids) and len(pids) == 2
    assert not any(alive(p) for p in pids)


def test_crash_cleanup_leaves_a_reused_pid_alone(root: Path) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        start = process_start_time(other.pid)
        assert start is not None
        StateStore(root).update(
            "sb1",
            extra={
                PROCESSES_KEY: [
                    {"name": "qemu", "pid": other.pid, "start_time": start + 1},  # not the process recorded
                    {"name": "virtiofsd", "pid": other.pid},  # no start time: could be anyone
                    "garbage",
                ]
            },
        )
        report = cleanup_sandbox("sb1", StateStore(root, shared_root=root / "none"), kill_shim=False)
        assert report.killed == [] and other.poll() is None
    finally:
        other.kill()
        other.wait()


# --- the guest CID ----------------------------------------------------------------------------------
def test_vhost_vsock_set_guest_cid_number_is_linux_s() -> None:
    # <linux/vhost.h>: #define VHOST_VSOCK_SET_GUEST_CID _IOW(VHOST_VIRTIO, 0x60, __u64)
    assert _vhost.VHOST_VSOCK_SET_GUEST_CID == 0x4008AF60


def test_cid_in_use_is_retried_and_other_errors_are_typed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_vhost, "VHOST_VSOCK_DEVICE", "/dev/null")
    tried: list[int] = []

    def ioctl(fd: int, request: int, arg: bytes) -> bytes:
        assert request == _vhost.VHOST_VSOCK_SET_GUEST_CID and len(arg) == 8
        tried.append(int.from_bytes(arg, "little"))
        if len(tried) < 3:
            raise OSError(errno.EADDRINUSE, "in use")
        return arg

    monkeypatch.setattr(_vhost.fcntl, "ioctl", ioctl)
    cid, fd = _vhost.open_vhost_vsock()
    os.close(fd)
    assert len(tried) == 3 and cid == tried[-1] and all(3 <= c < 0xFFFFFFFF for c in tried)

    def always_busy(fd: int, request: int, arg: bytes) -> bytes:
        raise OSError(errno.EADDRINUSE, "in use")

    monkeypatch.setattr(_vhost.fcntl, "ioctl", always_busy)
    with pytest.raises(HypervisorError, match="no free vsock CID after 50 tries"):
        _vhost.open_vhost_vsock()

    def refused(fd: int, request: int, arg: bytes) -> bytes:
        raise OSError(errno.ENOTTY, "not a vhost device")

    monkeypatch.setattr(_vhost.fcntl, "ioctl", refused)
    with pytest.raises(HypervisorError, match="VHOST_VSOCK_SET_GUEST_CID"):
        _vhost.open_vhost_vsock()
    monkeypatch.setattr(_vhost, "VHOST_VSOCK_DEVICE", "/nonexistent/vhost-vsock")
    with pytest.raises(HypervisorError, match="modprobe vhost_vsock"):
        _vhost.open_vhost_vsock()
