"""The Cloud Hypervisor back-end without cloud-hypervisor: its argv, its VmConfig and every request of a full
life cycle (create, boot, info, pause, resume, hot-plug of disk and net, resize, shutdown) validated against
the upstream OpenAPI spec (fixtures/cloud-hypervisor.yaml, v45.0), run against a fake "cloud-hypervisor"
serving the API on --api-socket; a VMM that dies at start or refuses to boot is a HypervisorError with its
output; malformed answers are typed errors; nothing is left afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from restvmm_harness import (  # type: ignore[import-not-found]
    FIXTURES,
    ApiSpec,
    FailedStart,
    guest_config,
    json_answer,
    recorded,
    serve_api,
    start_fails_leaving_nothing,
    validate_all,
)

from kata_shim.hypervisor import (
    BlockDevice,
    HypervisorConfig,
    HypervisorError,
    NetworkDevice,
    ShareFsDevice,
    hypervisor_factory,
)
from kata_shim.hypervisor._clh import CloudHypervisor, pci_path_of
from kata_shim.persist import PROCESSES_KEY, StateStore, cleanup_sandbox

pytestmark = pytest.mark.usefixtures("reap_fakes")  # no fake VMM outlives its test


@pytest.fixture
def config(tmp_path: Path) -> HypervisorConfig:
    return guest_config(tmp_path, "cloud-hypervisor", default_vcpus=1, default_maxvcpus=4)


def test_registered() -> None:
    assert hypervisor_factory("clh") is CloudHypervisor


def test_capabilities_declare_only_what_the_api_has() -> None:
    caps = CloudHypervisor(HypervisorConfig()).capabilities()
    assert caps.hotplug == frozenset({"block", "net", "vcpu"})
    assert caps.shared_fs == frozenset({"virtio-fs"}) and caps.hybrid_vsock and not caps.passfd
    assert caps.device_addressing == "pci"


def test_argv_and_netns(config: HypervisorConfig, root: Path) -> None:
    hv = CloudHypervisor(config, state_root=root)
    trio.run(hv.prepare_vm, "sb1", "pod-ns")
    assert hv.vmm_argv() == [config.path, "--api-socket", str(root / "sb1" / "api.sock")]
    assert hv.spawn_argv() == ["nsenter", "--net=/run/netns/pod-ns", "--", *hv.vmm_argv()]
    assert hv.agent_address() == f"hvsock:{root / 'sb1' / 'kata.hvsock'}:1024"


def test_vm_config_validates(config: HypervisorConfig, root: Path, tmp_path: Path) -> None:
    fsd = tmp_path / "virtiofsd"
    fsd.write_text("#!/bin/sh\n")
    fsd.chmod(0o755)
    config.shared_fs, config.virtio_fs_daemon = "virtio-fs", str(fsd)
    config.initrd = config.image
    share = tmp_path / "share"
    share.mkdir()
    hv = CloudHypervisor(config, state_root=root)

    async def main() -> dict[str, Any]:
        await hv.prepare_vm("sb1", None)
        await hv.add_device(ShareFsDevice(share, "kataShared"))
        info = await hv.add_device(BlockDevice(config.image or Path(), read_only=False, device_id="c1"))
        assert info.guest_path == "/dev/vdb" and info.pci_path == ""
        await hv.add_device(NetworkDevice("tap0_kata", "02:00:00:00:00:01"))
        return hv.vm_config()

    vm = trio.run(main)
    ApiSpec("clh").validate("PUT", "/vm.create", vm)
    assert vm["memory"] == {"size": 256 << 20, "shared": True}
    assert vm["cpus"] == {"boot_vcpus": 1, "max_vcpus": 4}
    assert vm["disks"][0] == {"path": str(config.image), "readonly": True, "id": "image"}
    assert vm["net"] == [{"tap": "tap0_kata", "id": "net0", "mac": "02:00:00:00:00:01"}]
    assert vm["fs"][0]["socket"] == str(root / "sb1" / "vhost-fs.sock")
    assert vm["vsock"] == {"cid": 3, "socket": str(root / "sb1" / "kata.hvsock"), "id": "vsock0"}
    assert vm["payload"]["cmdline"].endswith("root=/dev/vda1")
    assert vm["serial"] == {"mode": "Tty"} and vm["rng"] == {"src": "/dev/urandom"}


def test_spec_validator_catches_mistakes() -> None:
    spec = ApiSpec("clh")
    with pytest.raises(AssertionError, match="not in the spec"):
        spec.validate("PUT", "/vm.start", None)
    with pytest.raises(AssertionError, match="Additional properties"):
        spec.validate("PUT", "/vm.add-disk", {"path": "/x", "read_only": True})
    with pytest.raises(AssertionError, match="minimum"):
        spec.validate("PUT", "/vm.resize", {"desired_vcpus": 0})


def test_pci_path_of() -> None:
    assert pci_path_of("0000:00:05.0") == "05"
    assert pci_path_of("0000:01:05.0") == ""
    with pytest.raises(HypervisorError, match="malformed PCI BDF"):
        pci_path_of("../../etc")


def test_full_life_cycle_validates(
    config: HypervisorConfig, root: Path, record: Path, tmp_path: Path
) -> None:
    hv = CloudHypervisor(config, state_root=root)
    disk = tmp_path / "c1.img"
    disk.write_bytes(b"\0" * 4096)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.add_device(NetworkDevice("tap0_kata", "02:00:00:00:00:01"))
        await hv.start_vm(60)
        state = StateStore(root).load("sb1")
        assert state is not None and [p["name"] for p in state.extra[PROCESSES_KEY]] == ["cloud-hypervisor"]
        assert hv.pids() != [os.getpid()]
        await hv.pause_vm()
        assert await hv.vm_state() == "Paused"
        await hv.resume_vm()
        info = await hv.add_device(BlockDevice(disk, device_id="c1"))
        assert info.pci_path == "06" and info.guest_path == "/dev/vdb"
        info = await hv.add_device(NetworkDevice("tap1_kata", ""))
        assert info.pci_path == "07"
        await hv.resize_vcpus(2)
        assert await hv.resize_vcpu(2, 2) == (2, 2)  # nothing to do: no request
        with pytest.raises(HypervisorError, match="cannot resize to 5"):
            await hv.resize_vcpus(5)
        await hv.stop_vm()
        assert await hv.wait_vm() == 0
        await hv.cleanup()

    trio.run(main)
    seen = validate_all("clh", record)
    assert seen == [
        ("PUT", "/vm.create"),
        ("PUT", "/vm.boot"),
        ("GET", "/vm.info"),
        ("PUT", "/vm.pause"),
        ("GET", "/vm.info"),
        ("PUT", "/vm.resume"),
        ("PUT", "/vm.add-disk"),
        ("PUT", "/vm.add-net"),
        ("PUT", "/vm.resize"),
        ("PUT", "/vm.shutdown"),
        ("PUT", "/vmm.shutdown"),
    ]
    assert "Linux version" in hv.console_tail()
    assert not (root / "sb1" / "api.sock").exists()
    state = StateStore(root).load("sb1")
    assert state is None or PROCESSES_KEY not in state.extra


@pytest.mark.parametrize(
    ("mode", "match"), [("die", "cannot open /dev/kvm"), ("bad-boot", "HTTP 500.*KVM says no")]
)
def test_start_failure_is_a_hypervisor_error_with_output(
    config: HypervisorConfig,
    root: Path,
    record: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    mode: str,
    match: str,
) -> None:
    monkeypatch.setenv("FAKE_VMM_MODE", mode)
    hv = CloudHypervisor(config, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        try:
            with pytest.raises(HypervisorError, match=match):
                await hv.start_vm(60)
        finally:
            await hv.cleanup()

    trio.run(main)
    validate_all("clh", record)


def test_vmm_ignoring_shutdown_is_killed(
    config: HypervisorConfig, root: Path, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VMM_MODE", "ignore-shutdown")
    monkeypatch.setattr("kata_shim.hypervisor._external.STOP_GRACE", 0.5)
    hv = CloudHypervisor(config, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.start_vm(60)
        await hv.cleanup()
        assert "SIGKILL" in hv.exit_reason()

    trio.run(main)
    assert recorded(record)[-1]["path"] == "/vmm.shutdown"


def test_bad_vm_info_is_a_typed_error(config: HypervisorConfig, root: Path) -> None:
    hv = CloudHypervisor(config, state_root=root)

    async def fake_api(*args: Any, **kw: Any) -> Any:
        from kata_shim.hypervisor._rest import RestResponse

        return RestResponse(200, "OK", {}, b'{"state": "Exploded", "config": {}}')

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        hv.api = fake_api  # type: ignore[method-assign]
        with pytest.raises(HypervisorError, match="unknown state 'Exploded'"):
            await hv.info()

    trio.run(main)


# --- against an in-process fake API that validates each request ----------------------------------------
_RUNNING = json_answer({"config": {"payload": {}}, "state": "Running"})


def _in_process(
    config: HypervisorConfig,
    root: Path,
    answers: dict[tuple[str, str], Any],
    body: Callable[[CloudHypervisor], Awaitable[None]],
) -> list[tuple[str, str]]:
    """Run ``body`` with a CloudHypervisor whose API socket is served in-process (no VMM process)."""
    hv = CloudHypervisor(config, state_root=root)
    seen: list[tuple[str, str]] = []

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_api, "clh", hv.api_socket, answers, seen)
            await body(hv)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return seen


def test_boot_requests_validate_in_process(config: HypervisorConfig, root: Path) -> None:
    async def body(hv: CloudHypervisor) -> None:
        await hv._boot()

    seen = _in_process(config, root, {("GET", "/vm.info"): (_RUNNING, 0.0)}, body)
    assert seen == [("PUT", "/vm.create"), ("PUT", "/vm.boot"), ("GET", "/vm.info")]


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 9\r\n\r\nVM is off", "HTTP 500.*VM is off"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{{{", "not JSON"),
        (json_answer([1, 2]), "expected a JSON object, got list"),
        (json_answer({"state": "Running"}), "expected a JSON object, got NoneType"),
        (json_answer({"state": 7, "config": {}}), "unknown state"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "over the"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{", "no complete answer within"),
        (b"", "no answer"),
    ],
    ids=["status-500", "bad-json", "array", "no-config", "bad-state", "huge", "slow", "closed"],
)
def test_malformed_vm_info_is_a_typed_error(
    config: HypervisorConfig, root: Path, monkeypatch: pytest.MonkeyPatch, answer: bytes, match: str
) -> None:
    monkeypatch.setattr("kata_shim.hypervisor._restvmm.REST_TIMEOUT", 0.5)

    async def body(hv: CloudHypervisor) -> None:
        with pytest.raises(HypervisorError, match=match):
            await hv.info()

    _in_process(config, root, {("GET", "/vm.info"): (answer, 30.0)}, body)


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (json_answer({"id": "disk0", "bdf": "0000:00:zz.0"}), "malformed PCI BDF"),
        (json_answer({"id": 5, "bdf": "0000:00:05.0"}), "without string id and bdf"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", "HTTP 204"),
    ],
    ids=["bad-bdf", "bad-id", "no-info"],
)
def test_malformed_hotplug_answer_is_a_typed_error(
    config: HypervisorConfig, root: Path, tmp_path: Path, answer: bytes, match: str
) -> None:
    disk = tmp_path / "c1.img"
    disk.write_bytes(b"\0")

    async def body(hv: CloudHypervisor) -> None:
        await hv._boot()
        hv._vmm, hv._booted = _StubChild(), True  # type: ignore[assignment]
        with pytest.raises(HypervisorError, match=match):
            await hv.add_device(BlockDevice(disk))
        assert not any(isinstance(d, BlockDevice) for d in hv.devices)

    answers = {("GET", "/vm.info"): (_RUNNING, 0.0), ("PUT", "/vm.add-disk"): (answer, 0.0)}
    seen = _in_process(config, root, answers, body)
    assert ("PUT", "/vm.add-disk") in seen


class _StubChild:
    """A running VMM as far as `_require_running` asks."""

    exited = trio.Event()


# --- virtiofsd, crash cleanup ---------------------------------------------------------------------------
@pytest.fixture
def fs_config(config: HypervisorConfig, tmp_path: Path) -> HypervisorConfig:
    fsd = tmp_path / "virtiofsd"
    fsd.write_text(f"#!{sys.executable}\n" + (FIXTURES / "fake_virtiofsd.py").read_text())
    fsd.chmod(0o755)
    config.shared_fs, config.virtio_fs_daemon = "virtio-fs", str(fsd)
    return config


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "case", [("die", 60, "cannot open /dev/kvm"), ("bad-boot", 60, "KVM says no"), ("hang", 5, "timed out")]
)
def test_failed_start_kills_and_reaps_every_child_before_raising(
    fs_config: HypervisorConfig, root: Path, tmp_path: Path, case: FailedStart
) -> None:
    """A VMM that dies, refuses to boot or never listens: cloud-hypervisor and virtiofsd are both killed and
    reaped, and their sockets removed, by the time start_vm raises (not only at cleanup)."""
    hv = CloudHypervisor(fs_config, state_root=root)
    (tmp_path / "shared").mkdir()

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.add_device(ShareFsDevice(tmp_path / "shared"))
        try:
            await start_fails_leaving_nothing(hv, "FAKE_VMM_MODE", case, tmp_path, children=2)
        finally:
            await hv.cleanup()

    trio.run(main)


def test_shim_crash_cleanup_kills_vmm_and_virtiofsd(
    fs_config: HypervisorConfig, root: Path, record: Path, tmp_path: Path
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    hv = CloudHypervisor(fs_config, state_root=root)

    async def main() -> tuple[list[int], list[int]]:
        await hv.prepare_vm("sb1", None)
        await hv.add_device(ShareFsDevice(share))
        await hv.start_vm(60)
        pids = hv.pids()
        state = StateStore(root).load("sb1")
        assert state is not None
        assert [p["name"] for p in state.extra[PROCESSES_KEY]] == ["cloud-hypervisor", "virtiofsd"]
        # as `containerd-shim-kata-v2 delete` after a shim crash: only the recorded processes
        report = await trio.to_thread.run_sync(
            lambda: cleanup_sandbox("sb1", StateStore(root, shared_root=root / "none"), kill_shim=False)
        )
        with trio.fail_after(60):
            assert await hv.wait_vm() == 1
        await hv.cleanup()
        return pids, report.killed

    pids, killed = trio.run(main)
    assert len(pids) == 2 and sorted(killed) == sorted(pids)
    assert not any(_alive(p) for p in pids)
    validate_all("clh", record)


def test_virtiofsd_death_ends_the_vm(
    fs_config: HypervisorConfig, root: Path, record: Path, tmp_path: Path
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    hv = CloudHypervisor(fs_config, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.add_device(ShareFsDevice(share))
        await hv.start_vm(60)
        assert hv._virtiofsd is not None
        hv._virtiofsd.kill()
        with trio.fail_after(60):
            assert await hv.wait_vm() == 1
        assert "the shared directory is gone" in hv.exit_reason()
        await hv.cleanup()

    trio.run(main)


def test_share_hot_plugged_after_boot(
    fs_config: HypervisorConfig, root: Path, record: Path, tmp_path: Path
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    hv = CloudHypervisor(fs_config, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.start_vm(60)
        assert hv.vm_config()["memory"]["shared"] is True  # so that a later vhost-user share can map it
        info = await hv.add_device(ShareFsDevice(share, "late"))
        assert info.pci_path == "06"
        assert len(hv.pids()) == 2
        state = StateStore(root).load("sb1")
        assert state is not None
        assert [p["name"] for p in state.extra[PROCESSES_KEY]] == ["cloud-hypervisor", "virtiofsd"]
        with pytest.raises(HypervisorError, match="one shared directory per VM"):
            await hv.add_device(ShareFsDevice(share, "again"))
        await hv.cleanup()
        assert hv.pids() == []

    trio.run(main)
    seen = validate_all("clh", record)
    assert ("PUT", "/vm.add-fs") in seen
    body = next(r["body"] for r in recorded(record) if r["path"] == "/vm.add-fs")
    assert body["tag"] == "late" and body["socket"] == str(root / "sb1" / "vhost-fs.sock")


def test_vcpu_threads_are_found_by_name(config: HypervisorConfig, root: Path, record: Path) -> None:
    hv = CloudHypervisor(config, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.start_vm(60)
        try:
            with trio.fail_after(30):
                while True:
                    if len(hv.vcpu_thread_ids()) == 2:
                        break
                    await trio.sleep(0.05)
            assert set(hv.vcpu_thread_ids()) < set(hv.thread_ids())
        finally:
            await hv.cleanup()
        assert hv.vcpu_thread_ids() == []

    trio.run(main)


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2")
def test_vmm_runs_in_the_pod_netns(
    config: HypervisorConfig, root: Path, record: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VMM opens taps by name: it must run in the pod's netns (nsenter), the shim staying out."""
    import json
    import subprocess

    info = tmp_path / "info.json"
    monkeypatch.setenv("FAKE_VMM_INFO", str(info))
    name = f"kata-chtest-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    own = os.readlink("/proc/thread-self/ns/net")
    hv = CloudHypervisor(config, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", name)
        try:
            await hv.start_vm(60)
        finally:
            await hv.cleanup()

    try:
        trio.run(main)
        seen = json.loads(info.read_text())
        assert seen["argv"][1:3] == ["--api-socket", str(root / "sb1" / "api.sock")]
        assert seen["netns"] == f"net:[{os.stat(f'/run/netns/{name}').st_ino}]"  # the pod's
        assert os.readlink("/proc/thread-self/ns/net") == own != seen["netns"]  # not the shim's
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
    validate_all("clh", record)


@pytest.mark.parametrize(
    ("trigger", "reason"),
    [("/vm.reboot", "guest reset"), ("/vm.power-button", "guest panicked")],
    ids=["reset", "panic"],
)
def test_guest_reset_or_panic_ends_the_vm(
    config: HypervisorConfig, root: Path, record: Path, trigger: str, reason: str
) -> None:
    """cloud-hypervisor reboots a guest that resets; the event monitor tells, and the VM ends instead."""
    hv = CloudHypervisor(config, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.start_vm(60)
        await hv.api("PUT", trigger)
        with trio.fail_after(60):
            assert await hv.wait_vm() == 1
        assert reason in hv.exit_reason() and "SIGKILL" in hv.exit_reason()
        await hv.cleanup()

    trio.run(main)
    assert ("vm", "booted") in hv.events
    validate_all("clh", record)
    assert recorded(record)[0]["body"]["pvpanic"] is True


def test_garbage_on_the_event_monitor_stops_watching_only(config: HypervisorConfig, root: Path) -> None:
    hv = CloudHypervisor(config, state_root=root)

    async def main() -> None:
        read_fd, write_fd = os.pipe()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hv._watch_events, read_fd)
            data = b'{"source": "vm", "event": "booted"}\n\n' + b"[" * 70000

            def writer() -> None:  # more than a pipe holds: from a thread while the watcher reads
                # the watcher may stop reading (and close its end) before the last bytes are written
                with contextlib.suppress(BrokenPipeError), os.fdopen(write_fd, "wb") as pipe:
                    pipe.write(data)

            await trio.to_thread.run_sync(writer)
        assert hv.events == [("vm", "booted")] and hv.exit_reason() == ""

    trio.run(main)
