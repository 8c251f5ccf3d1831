"""The Sandbox service (containerd.runtime.sandbox.v1) over a real ttrpc connection, beside the Task service,
with a fake container abstraction: containerd 2.x's call order, the sandbox it builds from the CRI pod
config, errors, WaitSandbox, StopSandbox's grace period, and that the Task-only path keeps its behaviour."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf import any_pb2
from google.protobuf.message import Message

from kata_proto import ttrpc
from kata_proto.containerd import (
    SANDBOX_SERVICE,
    TASK_SERVICE,
    cgroups_v1_metrics_pb2,
    events_pb2,
    mount_pb2,
    runtimeoptions_pb2,
    sandbox_pb2,
    task_pb2,
    unpack_event,
)
from kata_proto.cri import POD_SANDBOX_CONFIG_TYPE, cri_pb2
from kata_shim.config import load_config
from kata_shim.hypervisor import HypervisorError
from kata_shim.message import MessageDispatcher, RuntimeHandlerManager
from kata_shim.persist import StateStore
from kata_shim.runtime import (
    AlreadyExists,
    ContainerConfig,
    ExecConfig,
    ExitStatus,
    FailedPrecondition,
    NotFound,
    ProcessId,
    ProcessState,
    ProcessStatus,
    Publisher,
    RuntimeInstance,
)
from kata_shim.service import SandboxService, TaskService, merge_metrics, sandbox_container_config

SID = "sb1"
SIGTERM, SIGKILL = 15, 9


# ---- a fake container abstraction (tests only) ----------------------------------------------------


class FakeSandbox:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.first: ContainerConfig | None = None
        self.deaths: list[Callable[[str], Any]] = []
        self.booted = trio.Event()
        """Set by the test to let a start with the annotation fake.slow-start finish."""

    async def start(self, first: ContainerConfig) -> None:
        self.first = first
        self.log.append(f"sandbox.start {first.container_id}")
        if first.spec.get("annotations", {}).get("fake.fail-start"):
            raise HypervisorError("kernel /nope/vmlinuz does not exist")
        if first.spec.get("annotations", {}).get("fake.slow-start"):
            await self.booted.wait()

    async def stop(self) -> None:
        self.log.append("sandbox.stop")

    async def cleanup(self) -> None:
        self.log.append("sandbox.cleanup")

    def thread_ids(self) -> list[int]:
        return [4242]

    def on_death(self, callback: Callable[[str], Any]) -> None:
        self.deaths.append(callback)

    async def die(self, reason: str) -> None:
        for callback in self.deaths:
            await callback(reason)


@dataclass
class FakeProcess:
    pid: int
    config: ContainerConfig
    status: ProcessStatus = ProcessStatus.CREATED
    exited: trio.Event = field(default_factory=trio.Event)
    exit_status: ExitStatus | None = None


class FakeContainers:
    """Containers whose init ends on SIGTERM unless its args say "ignore-term"."""

    def __init__(self, publish: Publisher, log: list[str]) -> None:
        self.publish = publish
        self.log = log
        self.procs: dict[str, FakeProcess] = {}

    def _get(self, cid: str) -> FakeProcess:
        if cid not in self.procs:
            raise NotFound(f"container {cid} not found")
        return self.procs[cid]

    async def create_container(self, config: ContainerConfig) -> int:
        if config.container_id in self.procs:
            raise AlreadyExists(config.container_id)
        self.procs[config.container_id] = FakeProcess(200 + len(self.procs), config)
        self.log.append(f"create {config.container_id}")
        return self.procs[config.container_id].pid

    async def start_process(self, process: ProcessId) -> int:
        p = self._get(process.container_id)
        p.status = ProcessStatus.RUNNING
        return p.pid

    async def _exit(self, cid: str, code: int) -> None:
        p = self.procs[cid]
        p.status = ProcessStatus.STOPPED
        p.exit_status = ExitStatus(code, dt.datetime(2026, 1, 2, tzinfo=dt.UTC))
        await self.publish("/tasks/exit", events_pb2.TaskExit(container_id=cid, id=cid, exit_status=code))
        p.exited.set()

    async def kill_process(self, process: ProcessId, signal: int, all_processes: bool = False) -> None:
        p = self._get(process.container_id)
        self.log.append(f"kill {process.container_id} {signal}")
        if p.status is ProcessStatus.STOPPED:
            raise NotFound(f"{process.container_id} already finished")
        ignores = p.config.spec.get("process", {}).get("args") == ["ignore-term"]
        if p.status is ProcessStatus.RUNNING and not (signal == SIGTERM and ignores):
            await self._exit(process.container_id, 128 + signal)

    async def wait_process(self, process: ProcessId) -> ExitStatus:
        p = self._get(process.container_id)
        await p.exited.wait()
        assert p.exit_status is not None
        return p.exit_status

    async def state_process(self, process: ProcessId) -> ProcessState:
        p = self._get(process.container_id)
        return ProcessState(process, p.pid, p.status, str(p.config.bundle), p.config.stdio, p.exit_status)

    async def delete_process(self, process: ProcessId) -> ExitStatus:
        p = self._get(process.container_id)
        if p.exit_status is None:
            raise FailedPrecondition(f"{process.container_id} is running")
        del self.procs[process.container_id]
        self.log.append(f"delete {process.container_id}")
        return p.exit_status

    async def stats_container(self, container_id: str) -> Message:
        self._get(container_id)
        metrics = cgroups_v1_metrics_pb2.Metrics()
        metrics.pids.current = 2
        metrics.memory.usage.usage = 4096
        metrics.cpu.usage.total = 1000
        metrics.cpu.usage.per_cpu.extend([600, 400])
        metrics.network.add(name="eth0", rx_bytes=77)
        return metrics

    def container_ids(self) -> list[str]:
        return list(self.procs)

    async def exec_process(self, config: ExecConfig) -> None:
        raise NotImplementedError

    async def close_process_io(self, process: ProcessId) -> None:
        raise NotImplementedError

    async def resize_process_pty(self, process: ProcessId, width: int, height: int) -> None:
        raise NotImplementedError

    async def pause_container(self, container_id: str) -> None:
        raise NotImplementedError

    async def resume_container(self, container_id: str) -> None:
        raise NotImplementedError

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        raise NotImplementedError

    async def pids(self, container_id: str) -> list[int]:
        return [self._get(container_id).pid]


class FakeHandler:
    name = "virt_container"

    def __init__(self) -> None:
        self.log: list[str] = []
        self.instances: list[RuntimeInstance] = []

    def new_instance(self, sandbox_id: str, config: Any, publish: Publisher) -> RuntimeInstance:
        self.log.append(f"new_instance {sandbox_id}")
        instance = RuntimeInstance(FakeSandbox(self.log), FakeContainers(publish, self.log))
        self.instances.append(instance)
        return instance


# ---- harness: containerd's side (Sandbox and Task clients on one shim socket) ---------------------


@dataclass
class Harness:
    sandbox: Any
    """A ServiceStub for containerd.runtime.sandbox.v1.Sandbox."""
    task: Any
    """A ServiceStub for containerd.task.v2.Task on the same socket."""
    client: ttrpc.TtrpcClient
    handler: FakeHandler
    dispatcher: MessageDispatcher
    service: SandboxService
    events: list[tuple[str, Message]]
    tmp: Path
    store: StateStore

    def fake(self) -> FakeSandbox:
        sandbox = self.handler.instances[0].sandbox
        assert isinstance(sandbox, FakeSandbox)
        return sandbox

    def bundle(self, id: str, **spec: Any) -> Path:
        bundle = self.tmp / "bundles" / id
        bundle.mkdir(parents=True)
        if spec:
            (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", **spec}))
        return bundle

    def create_sandbox_request(self, **pod: Any) -> sandbox_pb2.CreateSandboxRequest:
        """What containerd 2.x's CRI sends: no config.json in the bundle, the pod config in options."""
        config = cri_pb2.PodSandboxConfig(**pod)
        return sandbox_pb2.CreateSandboxRequest(
            sandbox_id=SID,
            bundle_path=str(self.bundle(SID)),
            options=any_pb2.Any(type_url=POD_SANDBOX_CONFIG_TYPE, value=config.SerializeToString()),
            netns_path="/var/run/netns/cni-1234",
        )

    def create_task_request(self, id: str, **process: Any) -> task_pb2.CreateTaskRequest:
        annotations = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": SID}
        bundle = self.bundle(id, annotations=annotations, process=process)
        return task_pb2.CreateTaskRequest(
            id=id, bundle=str(bundle), rootfs=[mount_pb2.Mount(type="overlay", source="overlay")]
        )


def write_config(tmp: Path) -> Path:
    kernel = tmp / "vmlinuz"
    kernel.write_bytes(b"\0")
    path = tmp / "configuration.toml"
    path.write_text(f'[hypervisor.dragonball]\nkernel = "{kernel}"\n[runtime]\nname = "virt_container"\n')
    return path


@asynccontextmanager
async def harness(tmp: Path) -> AsyncIterator[Harness]:
    handler = FakeHandler()
    store = StateStore(tmp / "run-kata")
    config = write_config(tmp)
    events: list[tuple[str, Message]] = []

    async def publish(topic: str, event: Message) -> None:
        events.append((topic, event))

    async with trio.open_nursery() as nursery:
        manager = RuntimeHandlerManager(
            SID,
            namespace="k8s.io",
            shim_address="unix:///test/shim.sock",
            store=store,
            # containerd 2.x hands the sandbox shim no runtime options: the default configuration is used
            load=lambda path: load_config(path or str(config), env={}),
            new_handler=lambda name: handler,
        )
        dispatcher = MessageDispatcher(manager, publish)
        service = SandboxService(dispatcher)
        server = ttrpc.TtrpcServer()
        server.register(TASK_SERVICE, TaskService(dispatcher))
        server.register(SANDBOX_SERVICE, service)
        shim_path = await nursery.start(server.serve_unix, str(tmp / "shim.sock"))
        async with ttrpc.open_ttrpc_client(shim_path) as client:
            yield Harness(
                ttrpc.ServiceStub(client, SANDBOX_SERVICE, timeout=30),
                ttrpc.ServiceStub(client, TASK_SERVICE, timeout=30),
                client,
                handler,
                dispatcher,
                service,
                events,
                tmp,
                store,
            )
        nursery.cancel_scope.cancel()


def run(tmp: Path, body: Callable[[Harness], Awaitable[None]]) -> None:
    async def main() -> None:
        async with harness(tmp) as h:
            await body(h)

    trio.run(main)


def pod_config(**overrides: Any) -> dict[str, Any]:
    linux = cri_pb2.LinuxPodSandboxConfig(
        cgroup_parent="/kubepods/burstable/pod-uid-1",
        resources=cri_pb2.LinuxContainerResources(
            cpu_period=100000, cpu_quota=250000, cpu_shares=512, memory_limit_in_bytes=256 << 20
        ),
    )
    return {
        "metadata": cri_pb2.PodSandboxMetadata(name="web", uid="uid-1", namespace="default"),
        "hostname": "web-pod",
        "annotations": {
            "io.katacontainers.config.hypervisor.default_memory": "1024",
            "team": "a",
            "io.kubernetes.cri.sandbox-memory": str(64 << 30),  # a pod's own: containerd's value wins
        },
        "dns_config": cri_pb2.DNSConfig(
            servers=["10.96.0.10"], searches=["a.svc", "svc"], options=["ndots:5"]
        ),
        "linux": linux,
        **overrides,
    }


# ---- tests ---------------------------------------------------------------------------------------


def test_containerd_2_pod_lifecycle_through_the_sandbox_api(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kata_shim.sandbox")

    async def body(h: Harness) -> None:
        await h.sandbox.CreateSandbox(h.create_sandbox_request(hostname="web-pod"))
        assert h.handler.log == ["new_instance sb1"]  # built, not started
        started = await h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=SID))
        assert started.pid == os.getpid()
        assert started.created_at.seconds > 0
        assert h.handler.log == ["new_instance sb1", "sandbox.start sb1"]

        status = await h.sandbox.SandboxStatus(sandbox_pb2.SandboxStatusRequest(sandbox_id=SID))
        assert (status.sandbox_id, status.state, status.pid) == (SID, "SANDBOX_READY", os.getpid())
        assert status.created_at == started.created_at
        assert not status.HasField("exited_at")
        assert dict(status.info) == {}
        await h.sandbox.PingSandbox(sandbox_pb2.PingRequest(sandbox_id=SID))
        plat = (await h.sandbox.Platform(sandbox_pb2.PlatformRequest(sandbox_id=SID))).platform
        expected = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        assert (plat.os, plat.architecture) == ("linux", expected)

        # A workload container joins the running VM through the Task service.
        await h.task.Create(h.create_task_request("c1"))
        await h.task.Start(task_pb2.StartRequest(id="c1"))
        assert h.handler.log[-1] == "create c1"
        assert h.handler.log.count("sandbox.start sb1") == 1
        verbose = await h.sandbox.SandboxStatus(
            sandbox_pb2.SandboxStatusRequest(sandbox_id=SID, verbose=True)
        )
        assert verbose.info["containers"] == "c1"
        assert verbose.info["runtime"] == "virt_container"
        assert "info" not in verbose.info  # containerd's CRI owns that key

        metrics = (await h.sandbox.SandboxMetrics(sandbox_pb2.SandboxMetricsRequest(sandbox_id=SID))).metrics
        assert metrics.id == SID and metrics.timestamp.seconds > 0
        data = unpack_event(metrics.data)
        assert isinstance(data, cgroups_v1_metrics_pb2.Metrics)
        assert (data.pids.current, data.memory.usage.usage, data.cpu.usage.total) == (2, 4096, 1000)

        async with trio.open_nursery() as nursery:
            waited: list[sandbox_pb2.WaitSandboxResponse] = []

            async def wait() -> None:
                waited.append(await h.sandbox.WaitSandbox(sandbox_pb2.WaitSandboxRequest(sandbox_id=SID)))

            nursery.start_soon(wait)
            await trio.sleep(0.1)
            assert not waited  # blocks while the sandbox runs
            await h.sandbox.StopSandbox(sandbox_pb2.StopSandboxRequest(sandbox_id=SID))
        assert (waited[0].exit_status, waited[0].exited_at.seconds > 0) == (0, True)
        assert h.handler.log[-2:] == ["sandbox.stop", "sandbox.cleanup"]
        status = await h.sandbox.SandboxStatus(sandbox_pb2.SandboxStatusRequest(sandbox_id=SID))
        assert status.state == "SANDBOX_NOTREADY"
        assert status.exited_at == waited[0].exited_at

        # RemovePodSandbox: containers go first (Task Delete + Shutdown, which must not end the shim) ...
        await h.task.Kill(task_pb2.KillRequest(id="c1", signal=SIGKILL))
        await h.task.Delete(task_pb2.DeleteRequest(id="c1"))
        await h.task.Shutdown(task_pb2.ShutdownRequest(id="c1"))
        assert not h.dispatcher.shutdown_requested.is_set()
        # ... then ShutdownSandbox ends it.
        await h.sandbox.ShutdownSandbox(sandbox_pb2.ShutdownSandboxRequest(sandbox_id=SID))
        assert h.dispatcher.shutdown_requested.is_set()
        await h.dispatcher.manager.shutdown()  # what the run loop does next
        assert not h.store.path(SID).parent.exists()

    run(tmp_path, body)
    calls = [r.getMessage().split()[0] for r in caplog.records if r.name == "kata_shim.sandbox"]
    assert [c for c in calls if c.startswith("Sandbox.")] == [
        "Sandbox.CreateSandbox",
        "Sandbox.StartSandbox",
        "Sandbox.SandboxStatus",
        "Sandbox.PingSandbox",
        "Sandbox.Platform",
        "Sandbox.SandboxStatus",
        "Sandbox.SandboxMetrics",
        "Sandbox.WaitSandbox",
        "Sandbox.StopSandbox",
        "Sandbox.SandboxStatus",
        "Sandbox.ShutdownSandbox",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records if r.getMessage().startswith("Sandbox."))


def test_the_sandbox_starts_from_the_pod_config_containerd_sends(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        text = (
            write_config(tmp_path)
            .read_text()
            .replace(
                "[hypervisor.dragonball]\n",
                '[hypervisor.dragonball]\nenable_annotations = ["default_memory"]\n',
            )
        )
        (tmp_path / "configuration.toml").write_text(text)
        await h.sandbox.CreateSandbox(h.create_sandbox_request(**pod_config()))
        await h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=SID))
        first = h.fake().first
        assert first is not None
        assert (first.container_id, first.bundle) == (SID, tmp_path / "bundles" / SID)
        assert first.spec["hostname"] == "web-pod"
        assert first.spec["linux"]["namespaces"] == [{"type": "network", "path": "/var/run/netns/cni-1234"}]
        assert first.spec["linux"]["cgroupsPath"] == "/kubepods/burstable/pod-uid-1/sb1"
        annotations = first.spec["annotations"]
        assert annotations["io.kubernetes.cri.container-type"] == "sandbox"
        assert annotations["io.kubernetes.cri.sandbox-cpu-quota"] == "250000"
        assert annotations["io.kubernetes.cri.sandbox-memory"] == str(256 << 20)
        assert annotations["team"] == "a"
        assert first.dns == ["nameserver 10.96.0.10", "search a.svc svc", "options ndots:5"]
        # the pod's io.katacontainers.* annotations configure the VM, through enable_annotations
        assert h.dispatcher.manager.config is not None
        assert h.dispatcher.manager.config.hypervisor.default_memory == 1024

    run(tmp_path, body)


def test_disabled_kata_annotation_fails_create_and_leaves_nothing(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        with pytest.raises(ttrpc.InvalidArgument, match="default_memory: not enabled"):
            await h.sandbox.CreateSandbox(h.create_sandbox_request(**pod_config()))
        assert h.handler.log == []
        assert not h.store.path(SID).parent.exists()
        await h.sandbox.CreateSandbox(_plain_request(h))
        assert h.handler.log == ["new_instance sb1"]

    run(tmp_path, body)


def _plain_request(h: Harness) -> sandbox_pb2.CreateSandboxRequest:
    config = cri_pb2.PodSandboxConfig(hostname="p")
    return sandbox_pb2.CreateSandboxRequest(
        sandbox_id=SID,
        bundle_path=str(h.tmp / "bundles"),
        options=any_pb2.Any(type_url=POD_SANDBOX_CONFIG_TYPE, value=config.SerializeToString()),
    )


def test_wrong_sandbox_id_is_not_found_for_every_call(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sandbox.CreateSandbox(h.create_sandbox_request())
        await h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=SID))
        other = "not-this-pod"
        for call in (
            h.sandbox.CreateSandbox(sandbox_pb2.CreateSandboxRequest(sandbox_id=other, bundle_path="/b")),
            h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=other)),
            h.sandbox.Platform(sandbox_pb2.PlatformRequest(sandbox_id=other)),
            h.sandbox.StopSandbox(sandbox_pb2.StopSandboxRequest(sandbox_id=other)),
            h.sandbox.WaitSandbox(sandbox_pb2.WaitSandboxRequest(sandbox_id=other)),
            h.sandbox.SandboxStatus(sandbox_pb2.SandboxStatusRequest(sandbox_id=other)),
            h.sandbox.PingSandbox(sandbox_pb2.PingRequest(sandbox_id=other)),
            h.sandbox.ShutdownSandbox(sandbox_pb2.ShutdownSandboxRequest(sandbox_id=other)),
            h.sandbox.SandboxMetrics(sandbox_pb2.SandboxMetricsRequest(sandbox_id=other)),
        ):
            with pytest.raises(ttrpc.NotFound, match="not-this-pod"):
                await call
        assert not h.dispatcher.shutdown_requested.is_set()
        assert h.handler.log == ["new_instance sb1", "sandbox.start sb1"]

    run(tmp_path, body)


def test_calls_before_create_are_not_found_and_create_twice_already_exists(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        for call in (
            h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=SID)),
            h.sandbox.StopSandbox(sandbox_pb2.StopSandboxRequest(sandbox_id=SID)),
            h.sandbox.WaitSandbox(sandbox_pb2.WaitSandboxRequest(sandbox_id=SID)),
            h.sandbox.SandboxStatus(sandbox_pb2.SandboxStatusRequest(sandbox_id=SID)),
            h.sandbox.SandboxMetrics(sandbox_pb2.SandboxMetricsRequest(sandbox_id=SID)),
        ):
            with pytest.raises(ttrpc.NotFound, match="not created"):
                await call
        await h.sandbox.PingSandbox(sandbox_pb2.PingRequest(sandbox_id=SID))
        await h.sandbox.CreateSandbox(h.create_sandbox_request())
        with pytest.raises(ttrpc.AlreadyExists):
            await h.sandbox.CreateSandbox(_plain_request(h))
        # created, not started: no metrics yet, and the status says so
        with pytest.raises(ttrpc.FailedPrecondition):
            await h.sandbox.SandboxMetrics(sandbox_pb2.SandboxMetricsRequest(sandbox_id=SID))
        status = await h.sandbox.SandboxStatus(sandbox_pb2.SandboxStatusRequest(sandbox_id=SID))
        assert status.state == "SANDBOX_NOTREADY" and not status.HasField("created_at")

    run(tmp_path, body)


def test_create_sandbox_after_a_task_api_pod_already_exists(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        # containerd 1.6: the pod's first Task Create made and started the sandbox
        await h.task.Create(h.create_task_request("c0"))
        with pytest.raises(ttrpc.AlreadyExists):
            await h.sandbox.CreateSandbox(h.create_sandbox_request())
        assert h.handler.log == ["new_instance sb1", "sandbox.start c0", "create c0"]
        # and the Task path's Shutdown semantics stay: exit once no container is left
        await h.task.Start(task_pb2.StartRequest(id="c0"))
        await h.task.Kill(task_pb2.KillRequest(id="c0", signal=SIGKILL))
        await h.task.Delete(task_pb2.DeleteRequest(id="c0"))
        await h.task.Shutdown(task_pb2.ShutdownRequest(id="c0"))
        assert h.dispatcher.shutdown_requested.is_set()

    run(tmp_path, body)


def test_task_create_before_start_sandbox_starts_the_created_sandbox_once(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sandbox.CreateSandbox(h.create_sandbox_request())
        await h.task.Create(h.create_task_request("c1"))
        await h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=SID))
        assert h.handler.log == ["new_instance sb1", "sandbox.start sb1", "create c1"]

    run(tmp_path, body)


def test_wait_returns_when_stop_comes_on_another_connection(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sandbox.CreateSandbox(h.create_sandbox_request())
        await h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=SID))
        results: list[sandbox_pb2.WaitSandboxResponse] = []

        async def wait() -> None:
            results.append(await h.sandbox.WaitSandbox(sandbox_pb2.WaitSandboxRequest(sandbox_id=SID)))

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(wait)
            await trio.sleep(0.1)
            async with ttrpc.open_ttrpc_client(str(tmp_path / "shim.sock")) as other:
                stub = ttrpc.ServiceStub(other, SANDBOX_SERVICE, timeout=30)
                await stub.StopSandbox(sandbox_pb2.StopSandboxRequest(sandbox_id=SID))
                await stub.StopSandbox(sandbox_pb2.StopSandboxRequest(sandbox_id=SID))  # idempotent
        assert [r.exit_status for r in results] == [0, 0]
        assert results[0].exited_at == results[1].exited_at
        # after the stop: Wait answers at once, a new Start is refused, no metrics
        again = await h.sandbox.WaitSandbox(sandbox_pb2.WaitSandboxRequest(sandbox_id=SID))
        assert again.exited_at == results[0].exited_at
        with pytest.raises(ttrpc.FailedPrecondition):
            await h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=SID))
        with pytest.raises(ttrpc.FailedPrecondition):
            await h.sandbox.SandboxMetrics(sandbox_pb2.SandboxMetricsRequest(sandbox_id=SID))

    run(tmp_path, body)


def test_a_vm_that_dies_ends_wait_with_255_and_is_not_ready(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sandbox.CreateSandbox(h.create_sandbox_request())
        await h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=SID))
        results: list[sandbox_pb2.WaitSandboxResponse] = []

        async def wait() -> None:
            results.append(await h.sandbox.WaitSandbox(sandbox_pb2.WaitSandboxRequest(sandbox_id=SID)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.sleep(0.1)
            await h.fake().die("the VM stopped (guest panic)")
        assert results[0].exit_status == 255
        status = await h.sandbox.SandboxStatus(sandbox_pb2.SandboxStatusRequest(sandbox_id=SID, verbose=True))
        assert status.state == "SANDBOX_NOTREADY"
        assert status.info["dead"] == "the VM stopped (guest panic)"
        # StopPodSandbox still releases the host resources; the exit stays the death's
        await h.sandbox.StopSandbox(sandbox_pb2.StopSandboxRequest(sandbox_id=SID))
        assert h.handler.log[-2:] == ["sandbox.stop", "sandbox.cleanup"]
        again = await h.sandbox.WaitSandbox(sandbox_pb2.WaitSandboxRequest(sandbox_id=SID))
        assert (again.exit_status, again.exited_at) == (255, results[0].exited_at)

    run(tmp_path, body)


def test_stop_with_timeout_sigterms_the_containers_then_stops_the_vm(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sandbox.CreateSandbox(h.create_sandbox_request())
        await h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=SID))
        for cid, args in (("polite", ["sleep"]), ("stubborn", ["ignore-term"])):
            await h.task.Create(h.create_task_request(cid, args=args))
            await h.task.Start(task_pb2.StartRequest(id=cid))
        await h.sandbox.StopSandbox(sandbox_pb2.StopSandboxRequest(sandbox_id=SID, timeout_secs=1))
        tail = h.handler.log[h.handler.log.index("create stubborn") + 1 :]
        assert tail == ["kill polite 15", "kill stubborn 15", "sandbox.stop", "sandbox.cleanup"]
        exits = [(e.container_id, e.exit_status) for t, e in h.events if t == "/tasks/exit"]
        assert exits == [("polite", 143)]  # the stubborn one ends with the VM (the real one: 255)

    run(tmp_path, body)


def test_stop_without_timeout_stops_the_vm_at_once(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sandbox.CreateSandbox(h.create_sandbox_request())
        await h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=SID))
        await h.task.Create(h.create_task_request("c1", args=["ignore-term"]))
        await h.task.Start(task_pb2.StartRequest(id="c1"))
        await h.sandbox.StopSandbox(sandbox_pb2.StopSandboxRequest(sandbox_id=SID))
        assert h.handler.log[-2:] == ["sandbox.stop", "sandbox.cleanup"]
        assert not any(line.startswith("kill") for line in h.handler.log)

    run(tmp_path, body)


def test_status_and_wait_while_the_vm_boots(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sandbox.CreateSandbox(h.create_sandbox_request(annotations={"fake.slow-start": "1"}))
        waited: list[sandbox_pb2.WaitSandboxResponse] = []

        async def wait() -> None:
            waited.append(await h.sandbox.WaitSandbox(sandbox_pb2.WaitSandboxRequest(sandbox_id=SID)))

        started = trio.Event()

        async def start() -> None:
            await h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=SID))
            started.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start)
            nursery.start_soon(wait)
            await trio.sleep(0.1)
            status = await h.sandbox.SandboxStatus(sandbox_pb2.SandboxStatusRequest(sandbox_id=SID))
            assert status.state == "SANDBOX_NOTREADY"
            h.fake().booted.set()
            with trio.fail_after(30):
                await started.wait()
            status = await h.sandbox.SandboxStatus(sandbox_pb2.SandboxStatusRequest(sandbox_id=SID))
            assert status.state == "SANDBOX_READY"
            assert not waited
            await h.sandbox.StopSandbox(sandbox_pb2.StopSandboxRequest(sandbox_id=SID))
        assert waited[0].exit_status == 0

    run(tmp_path, body)


def test_failed_start_is_torn_down_and_shutdown_still_ends_the_shim(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        req = h.create_sandbox_request(annotations={"fake.fail-start": "1"})
        await h.sandbox.CreateSandbox(req)
        with pytest.raises(ttrpc.Internal, match="kernel /nope/vmlinuz does not exist"):
            await h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=SID))
        assert h.handler.log == ["new_instance sb1", "sandbox.start sb1", "sandbox.stop", "sandbox.cleanup"]
        assert not h.store.path(SID).parent.exists()
        # containerd's cleanupShim: ShutdownSandbox, then it waits for the shim to go
        await h.sandbox.ShutdownSandbox(sandbox_pb2.ShutdownSandboxRequest(sandbox_id=SID))
        assert h.dispatcher.shutdown_requested.is_set()

    run(tmp_path, body)


def test_shutdown_of_a_running_sandbox_stops_it_and_ends_waits(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.sandbox.CreateSandbox(h.create_sandbox_request())
        await h.sandbox.StartSandbox(sandbox_pb2.StartSandboxRequest(sandbox_id=SID))
        results: list[sandbox_pb2.WaitSandboxResponse] = []

        async def wait() -> None:
            results.append(await h.sandbox.WaitSandbox(sandbox_pb2.WaitSandboxRequest(sandbox_id=SID)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.sleep(0.1)
            await h.sandbox.ShutdownSandbox(sandbox_pb2.ShutdownSandboxRequest(sandbox_id=SID))
        assert results[0].exit_status == 0
        assert h.handler.log[-2:] == ["sandbox.stop", "sandbox.cleanup"]
        assert h.dispatcher.shutdown_requested.is_set()

    run(tmp_path, body)


# ---- the pure parts --------------------------------------------------------------------------------


def test_sandbox_config_keeps_a_bundle_spec_and_takes_runtime_options(tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    bundle.mkdir()
    spec = {"hostname": "own", "linux": {"cgroupsPath": "/mine", "namespaces": [{"type": "network"}]}}
    (bundle / "config.json").write_text(json.dumps(spec))
    opts = runtimeoptions_pb2.Options(config_path="/etc/kata/x.toml")
    req = sandbox_pb2.CreateSandboxRequest(
        sandbox_id="p1",
        bundle_path=str(bundle),
        options=any_pb2.Any(type_url="runtimeoptions.v1.Options", value=opts.SerializeToString()),
        netns_path="/var/run/netns/n1",
        annotations={"a": "b"},
        rootfs=[mount_pb2.Mount(type="bind", source="/x")],
    )
    config = sandbox_container_config(req)
    assert config.options == {"type_url": "runtimeoptions.v1.Options", "config_path": "/etc/kata/x.toml"}
    assert config.spec["hostname"] == "own"
    assert config.spec["linux"] == {
        "cgroupsPath": "/mine",
        "namespaces": [{"type": "network", "path": "/var/run/netns/n1"}],
    }
    assert config.spec["annotations"] == {"a": "b", "io.kubernetes.cri.sandbox-id": "p1"}
    assert [m.source for m in config.rootfs] == ["/x"]
    assert config.dns is None  # no pod config: the spec's resolv.conf bind, as a sandbox container's


def test_sandbox_config_systemd_cgroup_parent_and_bad_options(tmp_path: Path) -> None:
    pod = cri_pb2.PodSandboxConfig(linux=cri_pb2.LinuxPodSandboxConfig(cgroup_parent="kubepods-pod1.slice"))
    req = sandbox_pb2.CreateSandboxRequest(
        sandbox_id="p1",
        bundle_path=str(tmp_path),
        options=any_pb2.Any(
            type_url=f"type.googleapis.com/{POD_SANDBOX_CONFIG_TYPE}", value=pod.SerializeToString()
        ),
    )
    config = sandbox_container_config(req)
    assert config.spec["linux"] == {"cgroupsPath": "kubepods-pod1.slice:cri-containerd:p1"}
    assert "namespaces" not in config.spec["linux"]
    req.options.value = b"\xff\xff"
    with pytest.raises(Exception, match="do not decode"):
        sandbox_container_config(req)
    with pytest.raises(Exception, match="sandbox id is empty"):
        sandbox_container_config(sandbox_pb2.CreateSandboxRequest(bundle_path=str(tmp_path)))


def test_merge_metrics_sums_the_containers_and_counts_the_network_once() -> None:
    parts = []
    for total, per_cpu in ((1000, [600, 400]), (500, [100, 200, 200])):
        m = cgroups_v1_metrics_pb2.Metrics()
        m.cpu.usage.total = total
        m.cpu.usage.per_cpu.extend(per_cpu)
        m.memory.usage.usage = 10
        m.memory.cache = 3
        m.pids.current = 1
        m.blkio.io_service_bytes_recursive.add(op="Read", major=254, value=5)
        m.network.add(name="eth0", rx_bytes=77)
        parts.append(m)
    merged = merge_metrics(parts)
    assert merged.cpu.usage.total == 1500
    assert list(merged.cpu.usage.per_cpu) == [700, 600, 200]
    assert (merged.memory.usage.usage, merged.memory.cache, merged.pids.current) == (20, 6, 2)
    assert len(merged.blkio.io_service_bytes_recursive) == 2
    assert [(n.name, n.rx_bytes) for n in merged.network] == [("eth0", 77)]
    assert merge_metrics([]) == cgroups_v1_metrics_pb2.Metrics()
