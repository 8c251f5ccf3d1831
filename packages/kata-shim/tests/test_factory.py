"""The VM template (issue 16): what its manifest records and when it is stale, the locks that serialize
building across shims, the build itself on a fake back-end whose "guest" is the real kata_agent in this
process, `template_for`'s cold-boot decisions and `kata-ctl factory`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

import kata_agent
from kata_agent import AgentConfig as GuestAgentConfig
from kata_agent import open_agent
from kata_agent._network import Netlink
from kata_shim import _kata_ctl
from kata_shim.config import AgentConfig, FactoryConfig, RuntimeConfig, TomlConfig
from kata_shim.factory import (
    FactoryError,
    Template,
    TemplateBusy,
    _template,
    expected_manifest,
    mismatch,
    opened,
    template_for,
)
from kata_shim.hypervisor import (
    Capabilities,
    Device,
    DeviceInfo,
    Hypervisor,
    HypervisorConfig,
    HypervisorError,
    ShareFsDevice,
)


@pytest.fixture
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="kfac-", dir="/tmp"))  # short: unix socket paths live below
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def config(base: Path, monkeypatch: pytest.MonkeyPatch) -> TomlConfig:
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        (base / name).write_bytes(b"\0" * 16)
    monkeypatch.setattr(_template, "sandbox_dir", lambda vm_id: base / "state" / vm_id)
    return TomlConfig(
        base / "configuration.toml",
        RuntimeConfig(use_passfd_io=True),
        HypervisorConfig(
            kernel=base / "vmlinuz", initrd=base / "initrd.img", image=base / "rootfs.img", default_memory=256
        ),
        AgentConfig(reconnect_timeout_ms=10_000, dial_timeout_ms=10),
        factory=FactoryConfig(enable_template=True, template_path=base / "template"),
    )


class FakeVm:
    """A back-end that can save: "booting" serves the real kata_agent on a unix socket, `save_vm` writes a
    directory, `restore_from` is recorded. `fail`: "boot" (start_vm raises), "dies" (the VM stops before
    its agent answers)."""

    name = "fake"

    def __init__(
        self, config: HypervisorConfig, base: Path, *, fail: str = "", snapshot: bool = True
    ) -> None:
        self.config = config
        self.base = base
        self.fail = fail
        self.snapshot = snapshot
        self.calls: list[str] = []
        self.devices: list[Device] = []
        self.passfd_port = 0
        self.restored: Path | None = None
        self.started = False
        self._stop = trio.Event()
        self._stopped = trio.Event()

    def capabilities(self) -> Capabilities:
        return Capabilities(shared_fs=frozenset({"virtio-fs"}), passfd=True, snapshot=self.snapshot)

    async def prepare_vm(self, sandbox_id: str, netns: str | None) -> None:
        self.calls.append(f"prepare_vm:{sandbox_id.split('-', maxsplit=1)[0]}")
        self.base.mkdir(parents=True, exist_ok=True)

    def set_passfd_listener_port(self, port: int) -> None:
        self.passfd_port = port

    async def add_device(self, device: Device) -> DeviceInfo:
        self.calls.append(f"add_device:{type(device).__name__}")
        self.devices.append(device)
        return DeviceInfo()

    async def start_vm(self, timeout: float) -> None:  # noqa: ASYNC109
        self.calls.append("start_vm")
        if self.fail == "boot":
            raise HypervisorError("guest kernel panicked")
        if self.fail == "dies":
            self._stopped.set()
            return
        ready = trio.Event()
        self.started = True
        trio.lowlevel.spawn_system_task(self._serve, ready)  # a "guest" outliving the caller's block
        await ready.wait()

    async def _serve(self, ready: trio.Event) -> None:
        config = GuestAgentConfig(run_dir=str(self.base / "run"))
        try:
            async with open_agent(f"unix:{self.base / 'agent.sock'}", config):
                ready.set()
                await self._stop.wait()
        finally:
            self._stopped.set()

    async def save_vm(self, directory: Path) -> None:
        self.calls.append("save_vm")
        os.mkdir(directory)
        with open(directory / "memory-0.bin", "wb") as f:  # noqa: ASYNC230 (a few bytes on /tmp)
            f.write(b"ram")

    def restore_from(self, directory: Path | None) -> None:
        self.restored = directory

    async def remove_device(self, device: Device) -> None:
        raise HypervisorError(f"fake cannot hot-unplug a {type(device).__name__}")

    async def resize_vcpu(self, old_vcpus: int, new_vcpus: int) -> tuple[int, int]:
        raise HypervisorError(f"fake cannot resize vCPUs ({old_vcpus} -> {new_vcpus})")

    async def pause_vm(self) -> None:
        self.calls.append("pause_vm")

    async def resume_vm(self) -> None:
        self.calls.append("resume_vm")

    def passfd_listener(self) -> tuple[Path, int] | None:
        return None

    def pids(self) -> list[int]:
        return []

    def thread_ids(self) -> list[int]:
        return []

    def vcpu_thread_ids(self) -> list[int]:
        return []

    async def stop_vm(self) -> None:
        self.calls.append("stop_vm")
        self._stop.set()
        if self.started:
            await self._stopped.wait()

    async def wait_vm(self) -> int:
        await self._stopped.wait()
        return 1

    def exit_reason(self) -> str:
        return "triple fault" if self.fail == "dies" else ""

    def console_tail(self) -> str:
        return "Kernel panic - not syncing" if self.fail == "dies" else ""

    def agent_address(self) -> str:
        return f"unix:{self.base / 'agent.sock'}"

    async def cleanup(self) -> None:
        self.calls.append("cleanup")


def _is_a_hypervisor(vm: FakeVm) -> Hypervisor:
    return vm  # mypy: FakeVm implements the whole Hypervisor protocol


def _vms(base: Path, **kwargs: Any) -> tuple[list[FakeVm], Any]:
    made: list[FakeVm] = []

    def new(config: TomlConfig) -> FakeVm:
        made.append(FakeVm(config.hypervisor, base / f"vm{len(made)}", **kwargs))
        return made[-1]

    return made, new


def test_the_manifest_names_each_difference_from_the_configuration(config: TomlConfig, base: Path) -> None:
    hv = FakeVm(config.hypervisor, base)
    saved = expected_manifest(config, hv)
    assert saved["kernel"] == {
        "path": str(base / "vmlinuz"),
        "size": 16,
        "mtime_ns": os.stat(base / "vmlinuz").st_mtime_ns,
    }
    assert (saved["vcpus"], saved["memory_mib"], saved["passfd_listener_port"]) == (1, 256, 1027)
    assert saved["shim_version"] and saved["vmm_version"]
    assert mismatch(saved, expected_manifest(config, hv)) == []
    assert mismatch(None, saved) == ["no template"]
    (base / "rootfs.img").write_bytes(b"a new agent in a new image")
    config.hypervisor.default_vcpus = 2
    reasons = mismatch(saved, expected_manifest(config, hv))
    assert [r.split(":")[0] for r in reasons] == ["image", "vcpus"]
    assert "template has 1, configuration 2" in reasons[1]


def test_a_template_made_for_other_max_vcpus_is_stale(config: TomlConfig, base: Path) -> None:
    """The template guest's MADT lists default_maxvcpus CPUs, the most a restored VM can hot-plug: a
    template saved for another maximum is rebuilt (0 means the host's CPUs, as the back-end counts)."""
    hv = FakeVm(config.hypervisor, base)
    config.hypervisor.default_maxvcpus = 2
    saved = expected_manifest(config, hv)
    assert saved["max_vcpus"] == 2
    config.hypervisor.default_maxvcpus = 4
    reasons = mismatch(saved, expected_manifest(config, hv))
    assert reasons == ["max_vcpus: template has 2, configuration 4"]
    config.hypervisor.default_maxvcpus = 0
    assert expected_manifest(config, hv)["max_vcpus"] == max(os.cpu_count() or 1, 1)


def test_one_builder_at_a_time_and_a_swap_keeps_readers_out(config: TomlConfig) -> None:
    template = Template(config.factory)
    with template.building():
        assert template.is_building()
        with pytest.raises(TemplateBusy, match="being built by another process"):
            template.building().__enter__()
        with pytest.raises(TemplateBusy):
            template.destroy()  # not under a builder's feet
    assert not template.is_building()
    with template.reading_nowait(), template.reading_nowait():
        pass  # readers share
    with (
        template._flock(_template.LOCK_NAME, _template.fcntl.LOCK_EX),  # a swap or a removal
        pytest.raises(TemplateBusy, match="replaced or removed"),
    ):
        template.reading_nowait().__enter__()


def test_build_boots_to_agent_ready_saves_and_records_what_it_was_made_from(
    config: TomlConfig, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made, new = _vms(base)
    # the template's agent lists its interfaces (its netlink code imported) before the save
    monkeypatch.setattr(
        Netlink, "list_interfaces", lambda self: made[0].calls.append("agent:list_interfaces") or []
    )

    async def main() -> None:
        template = Template(config.factory)
        manifest = await template.build(config, new(config))
        assert manifest["agent_version"] == kata_agent.__version__
        assert json.loads((template.current / "template.json").read_text()) == manifest
        assert (template.vm_dir / "memory-0.bin").read_bytes() == b"ram"
        hv = made[0]
        assert hv.calls == [
            "prepare_vm:template",
            "add_device:ShareFsDevice",
            "start_vm",
            "agent:list_interfaces",
            "save_vm",
            "stop_vm",
            "cleanup",
        ]
        (share,) = hv.devices
        assert isinstance(share, ShareFsDevice) and share.mount_tag == "kataShared"
        assert share.host_path == config.factory.template_path / "share"
        assert hv.passfd_port == 1027  # the same kernel command line as the sandboxes'
        assert sorted(p.name for p in template.root.iterdir()) == ["build.lock", "current", "lock", "share"]
        status = template.status(expected_manifest(config, hv))
        assert status.exists and not status.stale and not status.building
        assert "matches the configuration" in "\n".join(status.lines())

    trio.run(main)


@pytest.mark.parametrize("fail", ["boot", "dies"])
def test_a_failed_build_leaves_no_template_and_stops_its_vm(
    config: TomlConfig, base: Path, fail: str
) -> None:
    made, new = _vms(base, fail=fail)

    async def main() -> None:
        template = Template(config.factory)
        message = r"panicked|stopped before its agent answered: triple fault; console:\nKernel panic"
        with pytest.raises(FactoryError, match=message):
            await template.build(config, new(config))
        assert made[0].calls[-2:] == ["stop_vm", "cleanup"]
        assert not template.current.exists() and not list(template.root.glob("build-*"))

    trio.run(main)


def test_template_for_builds_once_rebuilds_when_stale_and_cold_boots_what_it_cannot_serve(
    config: TomlConfig, base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    made, new = _vms(base)
    caplog.set_level(logging.INFO, "kata_shim.factory")

    async def main() -> None:
        sandbox_hv = FakeVm(config.hypervisor, base / "sb")
        size = {"vcpus": 1, "memory_mib": 256, "nics": 0}
        found = await template_for(config, sandbox_hv, new, **size)
        assert found is not None and len(made) == 1
        assert "building it (no template)" in caplog.text
        with opened(found, config, sandbox_hv) as vm_dir:
            assert vm_dir == found.vm_dir
        assert await template_for(config, sandbox_hv, new, **size) is not None
        assert len(made) == 1  # up to date: not rebuilt
        (base / "vmlinuz").write_bytes(b"another kernel")
        caplog.clear()
        assert await template_for(config, sandbox_hv, new, **size) is not None
        assert len(made) == 2 and "building it (kernel: template has" in caplog.text
        # what a template cannot serve boots cold, and says why
        caplog.clear()
        assert await template_for(config, sandbox_hv, new, vcpus=2, memory_mib=256, nics=0) is None
        assert await template_for(config, sandbox_hv, new, vcpus=1, memory_mib=256, nics=1) is None
        assert "pod sized 2 vCPU/256 MiB, the template 1/256: cold boot" in caplog.text
        assert "network device(s), a template none" in caplog.text
        annotated = dataclasses.replace(config, annotated=["kernel_params"])
        assert await template_for(annotated, sandbox_hv, new, **size) is None
        assert "pod annotations set kernel_params: cold boot" in caplog.text
        no_restore = FakeVm(config.hypervisor, base / "nr", snapshot=False)
        assert await template_for(config, no_restore, new, **size) is None
        # another shim is building: this one cold-boots at once rather than wait a boot's time
        (base / "vmlinuz").write_bytes(b"a third kernel")
        caplog.clear()
        with Template(config.factory).building():
            assert await template_for(config, sandbox_hv, new, **size) is None
        assert "being built by another shim: cold boot" in caplog.text
        assert len(made) == 2

    trio.run(main)


def test_opened_yields_none_when_the_template_changed_or_is_being_swapped(
    config: TomlConfig, base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _made, new = _vms(base)
    caplog.set_level(logging.INFO, "kata_shim.factory")

    async def main() -> None:
        hv = FakeVm(config.hypervisor, base / "sb")
        found = await template_for(config, hv, new, vcpus=1, memory_mib=256, nics=0)
        assert found is not None
        with found._flock(_template.LOCK_NAME, _template.fcntl.LOCK_EX), opened(found, config, hv) as vm_dir:
            assert vm_dir is None
        config.hypervisor.kernel_params = "debug"
        with opened(found, config, hv) as vm_dir:
            assert vm_dir is None
        assert "it changed since it was checked; cold boot" in caplog.text

    trio.run(main)


def test_kata_ctl_factory_status_init_destroy(
    config: TomlConfig, base: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    made, new = _vms(base)
    monkeypatch.setattr(_kata_ctl, "load_config", lambda: config)
    monkeypatch.setattr("kata_shim.hypervisor.new_hypervisor", lambda name, hv_config: new(config))
    assert _kata_ctl.main(["factory", "status"]) == 0
    assert "template: none" in capsys.readouterr().out
    assert _kata_ctl.main(["factory", "init"]) == 0
    assert f"template built in {base / 'template' / 'current'}" in capsys.readouterr().out
    assert _kata_ctl.main(["factory", "init"]) == 0
    assert "up to date" in capsys.readouterr().out and len(made) == 3  # a back-end per command
    (base / "initrd.img").write_bytes(b"new")
    assert _kata_ctl.main(["factory", "status"]) == 0
    out = capsys.readouterr().out
    assert "stale" in out and "initrd: template has" in out
    assert _kata_ctl.main(["factory", "destroy"]) == 0
    assert "removed" in capsys.readouterr().out
    assert not (base / "template" / "current").exists()
    assert _kata_ctl.main(["factory", "destroy"]) == 0
    assert "did not exist" in capsys.readouterr().out
    config.factory.enable_template = False
    assert _kata_ctl.main(["factory", "init"]) == 1
    assert "enable_template is false" in capsys.readouterr().err
