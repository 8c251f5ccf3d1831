"""The Firecracker back-end without firecracker: its argv, and every request of a full life cycle
(machine-config, boot-source, drives, network-interfaces, vsock, entropy, InstanceStart, pause/resume,
SendCtrlAltDel) validated against the upstream Swagger spec (fixtures/firecracker.yaml, v1.12.1), run against
a fake "firecracker" serving the API on --api-sock; no virtio-fs: a shared directory is refused at create with
an error naming the capability; a refused InstanceStart is a HypervisorError quoting fault_message."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from restvmm_harness import (  # type: ignore[import-not-found]
    ApiSpec,
    FailedStart,
    guest_config,
    json_answer,
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
from kata_shim.hypervisor._firecracker import Firecracker

pytestmark = pytest.mark.usefixtures("reap_fakes")  # no fake VMM outlives its test


@pytest.fixture
def config(tmp_path: Path) -> HypervisorConfig:
    return guest_config(tmp_path, "firecracker", default_vcpus=2)


def test_registered_and_capabilities() -> None:
    assert hypervisor_factory("firecracker") is Firecracker
    caps = Firecracker(HypervisorConfig()).capabilities()
    assert caps.shared_fs == frozenset() and not caps.fs_sharing
    assert caps.hotplug == frozenset() and caps.hybrid_vsock and caps.device_addressing == "mmio"


def test_argv(config: HypervisorConfig, root: Path) -> None:
    hv = Firecracker(config, state_root=root)
    trio.run(hv.prepare_vm, "sb1", None)
    assert hv.spawn_argv() == [config.path, "--api-sock", str(root / "sb1" / "api.sock")]


def test_shared_fs_refused_at_create(config: HypervisorConfig, root: Path, tmp_path: Path) -> None:
    """The sandbox always shares its directory: with firecracker that fails at create, naming why."""
    config.shared_fs = "virtio-fs"
    with pytest.raises(HypervisorError, match=r"not supported by firecracker.*shared_fs is empty"):
        trio.run(Firecracker(config, state_root=root).prepare_vm, "sb1", None)
    config.shared_fs = "none"
    hv = Firecracker(config, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        with pytest.raises(HypervisorError, match=r"no virtio-fs \(capabilities\(\)\.shared_fs is empty\)"):
            await hv.add_device(ShareFsDevice(tmp_path, "kataShared"))

    trio.run(main)


def test_too_many_vcpus_refused(config: HypervisorConfig, root: Path) -> None:
    config.default_vcpus = 33
    with pytest.raises(HypervisorError, match="at most 32 vCPUs"):
        trio.run(Firecracker(config, state_root=root).prepare_vm, "sb1", None)


def test_full_life_cycle_validates(
    config: HypervisorConfig, root: Path, record: Path, tmp_path: Path
) -> None:
    hv = Firecracker(config, state_root=root)
    disk = tmp_path / "c1.img"
    disk.write_bytes(b"\0" * 4096)
    config.initrd = disk

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        info = await hv.add_device(BlockDevice(disk, read_only=True))
        assert info.guest_path == "/dev/vdb"
        await hv.add_device(NetworkDevice("tap0_kata", "02:00:00:00:00:01"))
        await hv.start_vm(60)
        with pytest.raises(HypervisorError, match="cannot hot-plug"):
            await hv.add_device(BlockDevice(disk))
        await hv.pause_vm()
        assert await hv.instance_state() == "Paused"
        await hv.resume_vm()
        await hv.stop_vm()
        assert await hv.wait_vm() == 0
        await hv.cleanup()

    trio.run(main)
    seen = validate_all("firecracker", record)
    assert seen == [
        ("PUT", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/image"),
        ("PUT", "/drives/disk0"),
        ("PUT", "/network-interfaces/eth0"),
        ("PUT", "/vsock"),
        ("PUT", "/entropy"),
        ("PUT", "/actions"),
        ("GET", "/"),
        ("PATCH", "/vm"),
        ("GET", "/"),
        ("PATCH", "/vm"),
        ("PUT", "/actions"),
    ]
    assert "Linux version" in hv.console_tail()


def test_requests_validate_one_by_one(config: HypervisorConfig, root: Path) -> None:
    hv = Firecracker(config, state_root=root)
    trio.run(hv.prepare_vm, "sb1", None)
    spec = ApiSpec("firecracker")
    for method, path, body in hv.requests():
        spec.validate(method, path, body)
    assert ("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(root / "sb1" / "kata.hvsock")}) in hv.requests()


@pytest.mark.parametrize("case", [("bad-boot", 60, "KVM says no"), ("hang", 5, "timed out")])
def test_failed_start_kills_and_reaps_the_vmm_before_raising(
    config: HypervisorConfig, root: Path, tmp_path: Path, case: FailedStart
) -> None:
    """A refused InstanceStart or a firecracker that never listens: it is killed and reaped, and its
    sockets removed, by the time start_vm raises."""
    hv = Firecracker(config, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        try:
            await start_fails_leaving_nothing(hv, "FAKE_VMM_MODE", case, tmp_path, children=1)
        finally:
            await hv.cleanup()

    trio.run(main)


def test_refused_instance_start_quotes_fault_message(
    config: HypervisorConfig, root: Path, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VMM_MODE", "bad-boot")
    hv = Firecracker(config, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        try:
            with pytest.raises(HypervisorError, match="HTTP 400 Bad Request: cannot boot: KVM says no"):
                await hv.start_vm(60)
        finally:
            await hv.cleanup()

    trio.run(main)
    validate_all("firecracker", record)


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (json_answer({"fault_message": "boom"}, "400 Bad Request"), "HTTP 400 Bad Request: boom"),
        (
            json_answer({"app_name": "Firecracker", "id": "x", "state": "Exploded", "vmm_version": "1"}),
            "unknown state",
        ),
        (json_answer("Running"), "expected a JSON object"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked"),
    ],
    ids=["fault", "bad-state", "string", "chunked"],
)
def test_malformed_instance_info_is_a_typed_error(
    config: HypervisorConfig, root: Path, answer: bytes, match: str
) -> None:
    hv = Firecracker(config, state_root=root)
    seen: list[tuple[str, str]] = []

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_api, "firecracker", hv.api_socket, {("GET", "/"): (answer, 0.0)}, seen)
            with pytest.raises(HypervisorError, match=match):
                await hv._boot()
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert ("PUT", "/actions") in seen and not any(m == "INVALID" for m, _ in seen)


def test_firecracker_ignoring_ctrl_alt_del_is_killed(
    config: HypervisorConfig, root: Path, record: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VMM_MODE", "ignore-shutdown")
    monkeypatch.setattr("kata_shim.hypervisor._external.STOP_GRACE", 0.5)
    hv = Firecracker(config, state_root=root)

    async def main() -> None:
        await hv.prepare_vm("sb1", None)
        await hv.start_vm(60)
        await hv.cleanup()
        assert "SIGKILL" in hv.exit_reason()

    trio.run(main)
    validate_all("firecracker", record)
