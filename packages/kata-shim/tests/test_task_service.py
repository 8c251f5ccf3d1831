"""The Task service over a real ttrpc connection: rpc -> dispatcher -> runtime handler mapping, error
codes, and the events containerd receives (order and fields), with a fake container abstraction."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import Message

from kata_proto import ttrpc
from kata_proto.containerd import (
    EVENTS_SERVICE,
    TASK_SERVICE,
    cgroups_v1_metrics_pb2,
    events_pb2,
    mount_pb2,
    runtimeoptions_pb2,
    task_pb2,
    types_task_pb2,
    unpack_event,
)
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
from kata_shim.service import EventPublisher, TaskService

NS = "test-ns"


# ---- a fake container abstraction (tests only) ----------------------------------------------------


@dataclass
class FakeProcess:
    pid: int
    config: ContainerConfig | ExecConfig
    status: ProcessStatus = ProcessStatus.CREATED
    exited: trio.Event = field(default_factory=trio.Event)
    exit_status: ExitStatus | None = None


class FakeSandbox:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def start(self, first: ContainerConfig) -> None:
        self.log.append(f"sandbox.start {first.container_id}")
        if first.spec.get("annotations", {}).get("fake.fail-start"):
            raise HypervisorError("kernel /nope/vmlinuz does not exist")

    async def stop(self) -> None:
        self.log.append("sandbox.stop")

    async def cleanup(self) -> None:
        self.log.append("sandbox.cleanup")

    def thread_ids(self) -> list[int]:
        return []


class FakeContainers:
    def __init__(self, publish: Publisher, log: list[str]) -> None:
        self.publish = publish
        self.log = log
        self.procs: dict[ProcessId, FakeProcess] = {}
        self.next_pid = 100
        self.calls: list[tuple[str, object]] = []

    def _get(self, p: ProcessId) -> FakeProcess:
        try:
            return self.procs[p]
        except KeyError:
            raise NotFound(f"process {p.container_id}/{p.exec_id}: not found") from None

    async def create_container(self, config: ContainerConfig) -> int:
        p = ProcessId(config.container_id)
        if p in self.procs:
            raise AlreadyExists(f"container {config.container_id} exists")
        self.next_pid += 1
        self.procs[p] = FakeProcess(self.next_pid, config)
        self.log.append(f"create {config.container_id}")
        return self.next_pid

    async def exit(self, p: ProcessId, code: int) -> None:
        proc = self.procs[p]
        proc.status = ProcessStatus.STOPPED
        proc.exit_status = ExitStatus(code, dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
        event = events_pb2.TaskExit(
            container_id=p.container_id,
            id=p.exec_id or p.container_id,
            pid=proc.pid,
            exit_status=code,
        )
        event.exited_at.FromDatetime(proc.exit_status.exited_at)
        await self.publish("/tasks/exit", event)
        proc.exited.set()

    async def start_process(self, process: ProcessId) -> int:
        proc = self._get(process)
        if proc.status != ProcessStatus.CREATED:
            raise FailedPrecondition(f"{process} already started")
        proc.status = ProcessStatus.RUNNING
        spec = (
            proc.config.spec if isinstance(proc.config, ExecConfig) else proc.config.spec.get("process", {})
        )
        if spec.get("args") == ["exit-at-once"]:
            # The process's own wait loop publishes its exit while Start has not answered yet.
            trio.lowlevel.spawn_system_task(self.exit, process, 3)
            await trio.sleep(0.05)
        return proc.pid

    async def exec_process(self, config: ExecConfig) -> None:
        self._get(ProcessId(config.process.container_id))
        if config.process in self.procs:
            raise AlreadyExists(f"exec {config.process.exec_id} exists")
        self.next_pid += 1
        self.procs[config.process] = FakeProcess(self.next_pid, config)

    async def kill_process(self, process: ProcessId, signal: int, all_processes: bool = False) -> None:
        proc = self._get(process)
        self.calls.append(("kill", (process, signal, all_processes)))
        if proc.status == ProcessStatus.RUNNING:
            await self.exit(process, 128 + signal)

    async def wait_process(self, process: ProcessId) -> ExitStatus:
        proc = self._get(process)
        await proc.exited.wait()
        assert proc.exit_status is not None
        return proc.exit_status

    async def state_process(self, process: ProcessId) -> ProcessState:
        proc = self._get(process)
        bundle = proc.config.bundle if isinstance(proc.config, ContainerConfig) else Path("/exec")
        return ProcessState(process, proc.pid, proc.status, str(bundle), proc.config.stdio, proc.exit_status)

    async def delete_process(self, process: ProcessId) -> ExitStatus:
        proc = self._get(process)
        if proc.exit_status is None:
            raise FailedPrecondition(f"{process.container_id} is running")
        del self.procs[process]
        return proc.exit_status

    async def close_process_io(self, process: ProcessId) -> None:
        self.calls.append(("close_io", process))

    async def resize_process_pty(self, process: ProcessId, width: int, height: int) -> None:
        self.calls.append(("resize", (process, width, height)))

    async def pause_container(self, container_id: str) -> None:
        self._get(ProcessId(container_id)).status = ProcessStatus.PAUSED

    async def resume_container(self, container_id: str) -> None:
        self._get(ProcessId(container_id)).status = ProcessStatus.RUNNING

    async def stats_container(self, container_id: str) -> Message:
        self._get(ProcessId(container_id))
        metrics = cgroups_v1_metrics_pb2.Metrics()
        metrics.pids.current = 2
        metrics.memory.usage.usage = 4096
        return metrics

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        self.calls.append(("update", (container_id, resources)))

    async def pids(self, container_id: str) -> list[int]:
        return sorted(p.pid for k, p in self.procs.items() if k.container_id == container_id)

    def container_ids(self) -> list[str]:
        return [p.container_id for p in self.procs if not p.exec_id]


class FakeHandler:
    name = "virt_container"

    def __init__(self) -> None:
        self.log: list[str] = []
        self.instances: list[RuntimeInstance] = []
        self.configs: list[Any] = []

    def new_instance(self, sandbox_id: str, config: Any, publish: Publisher) -> RuntimeInstance:
        self.log.append(f"new_instance {sandbox_id}")
        self.configs.append(config)
        instance = RuntimeInstance(FakeSandbox(self.log), FakeContainers(publish, self.log))
        self.instances.append(instance)
        return instance


# ---- harness: containerd's side (Task client, Events server) --------------------------------------


class EventSink:
    def __init__(self) -> None:
        self.envelopes: list[Any] = []
        self.changed = trio.Event()

    async def Forward(self, req: Any, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        self.envelopes.append(req.envelope)
        self.changed.set()
        self.changed = trio.Event()
        return empty_pb2.Empty()

    def topics(self) -> list[str]:
        return [e.topic for e in self.envelopes]

    def events(self, topic: str) -> list[Any]:
        return [unpack_event(e.event) for e in self.envelopes if e.topic == topic]

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(5):
            while len(self.envelopes) < count:
                await self.changed.wait()


@dataclass
class Harness:
    task: Any
    """A ServiceStub for containerd.task.v2.Task (Any: its methods are looked up by name)."""
    sink: EventSink
    handler: FakeHandler
    dispatcher: MessageDispatcher
    tmp: Path
    config_path: Path
    store: StateStore

    def bundle(self, id: str, **spec: Any) -> Path:
        bundle = self.tmp / "bundles" / id
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", **spec}))
        return bundle

    def create_request(self, id: str, *, options: bool = True, **spec: Any) -> task_pb2.CreateTaskRequest:
        req = task_pb2.CreateTaskRequest(
            id=id,
            bundle=str(self.bundle(id, **spec)),
            rootfs=[
                mount_pb2.Mount(type="overlay", source="overlay", options=["lowerdir=/l", "upperdir=/u"])
            ],
            stdin="/fifo/in",
            stdout="/fifo/out",
            stderr="/fifo/err",
            terminal=False,
        )
        if options:
            opts = runtimeoptions_pb2.Options(config_path=str(self.config_path))
            req.options.CopyFrom(
                any_pb2.Any(type_url="runtimeoptions.v1.Options", value=opts.SerializeToString())
            )
        return req

    def containers(self) -> FakeContainers:
        cm = self.handler.instances[0].containers
        assert isinstance(cm, FakeContainers)
        return cm


def write_config(tmp: Path) -> Path:
    kernel = tmp / "vmlinuz"
    kernel.write_bytes(b"\0")
    path = tmp / "configuration.toml"
    path.write_text(f'[hypervisor.dragonball]\nkernel = "{kernel}"\n[runtime]\nname = "virt_container"\n')
    return path


@asynccontextmanager
async def harness(tmp: Path) -> AsyncIterator[Harness]:
    sink = EventSink()
    events_server = ttrpc.TtrpcServer()
    events_server.register(EVENTS_SERVICE, sink)
    handler = FakeHandler()
    store = StateStore(tmp / "run-kata")
    async with trio.open_nursery() as nursery:
        events_path = await nursery.start(events_server.serve_unix, str(tmp / "events.sock"))
        publisher = EventPublisher(events_path, NS)
        await nursery.start(publisher.run)
        manager = RuntimeHandlerManager(
            "sb1",
            namespace=NS,
            shim_address="unix:///test/shim.sock",
            store=store,
            load=lambda path: load_config(path, env={}),
            new_handler=lambda name: handler,
        )
        dispatcher = MessageDispatcher(manager, publisher.publish)
        server = ttrpc.TtrpcServer()
        server.register(TASK_SERVICE, TaskService(dispatcher))
        shim_path = await nursery.start(server.serve_unix, str(tmp / "shim.sock"))
        async with ttrpc.open_ttrpc_client(shim_path) as client:
            stub = ttrpc.ServiceStub(client, TASK_SERVICE, timeout=10)
            yield Harness(stub, sink, handler, dispatcher, tmp, write_config(tmp), store)
        nursery.cancel_scope.cancel()


def run(tmp: Path, body: Callable[[Harness], Awaitable[None]]) -> None:
    async def main() -> None:
        async with harness(tmp) as h:
            await body(h)

    trio.run(main)


# ---- tests ---------------------------------------------------------------------------------------


def test_container_lifecycle_maps_to_handler_and_publishes_events_in_order(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        req = h.create_request("c1")
        created = await h.task.Create(req)
        assert created.pid == 101
        # The first Create built the instance with the file the runtime options named, then started it.
        assert h.handler.log == ["new_instance sb1", "sandbox.start c1", "create c1"]
        assert h.handler.configs[0].path == h.config_path
        state = h.store.load("sb1")
        assert state is not None and state.shim_pid == os.getpid() and state.config_path == str(h.config_path)
        assert (await h.task.Start(task_pb2.StartRequest(id="c1"))).pid == 101
        st = await h.task.State(task_pb2.StateRequest(id="c1"))
        assert (st.id, st.pid, st.status, st.bundle, st.stdout) == (
            "c1",
            101,
            types_task_pb2.RUNNING,
            req.bundle,
            "/fifo/out",
        )
        await h.task.Kill(task_pb2.KillRequest(id="c1", signal=9))
        waited = await h.task.Wait(task_pb2.WaitRequest(id="c1"))
        assert waited.exit_status == 137
        assert waited.exited_at.ToDatetime(tzinfo=dt.UTC) == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
        deleted = await h.task.Delete(task_pb2.DeleteRequest(id="c1"))
        assert (deleted.pid, deleted.exit_status, deleted.exited_at) == (101, 137, waited.exited_at)
        await h.sink.wait_for(4)
        assert h.sink.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
        assert {e.namespace for e in h.sink.envelopes} == {NS}
        assert all(e.event.type_url.startswith("containerd.events.Task") for e in h.sink.envelopes)
        (create,) = h.sink.events("/tasks/create")
        assert (create.container_id, create.bundle, create.pid, create.checkpoint) == (
            "c1",
            req.bundle,
            101,
            "",
        )
        assert list(create.rootfs) == list(req.rootfs)
        assert (create.io.stdin, create.io.stdout, create.io.stderr, create.io.terminal) == (
            "/fifo/in",
            "/fifo/out",
            "/fifo/err",
            False,
        )
        (start,) = h.sink.events("/tasks/start")
        assert (start.container_id, start.pid) == ("c1", 101)
        (delete,) = h.sink.events("/tasks/delete")
        assert (delete.container_id, delete.pid, delete.exit_status, delete.id) == ("c1", 101, 137, "")
        assert delete.exited_at == waited.exited_at

    run(tmp_path, body)


def test_later_creates_reuse_the_instance(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.task.Create(h.create_request("c1"))
        await h.task.Create(h.create_request("c2", options=False))
        assert h.handler.log == ["new_instance sb1", "sandbox.start c1", "create c1", "create c2"]
        assert h.containers().container_ids() == ["c1", "c2"]

    run(tmp_path, body)


def test_exec_publishes_added_started_exit_and_no_delete(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.task.Create(h.create_request("c1"))
        await h.task.Start(task_pb2.StartRequest(id="c1"))
        spec = any_pb2.Any(
            type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
            value=json.dumps({"args": ["sh"], "cwd": "/"}).encode(),
        )
        await h.task.Exec(task_pb2.ExecProcessRequest(id="c1", exec_id="e1", stdout="/fifo/e1", spec=spec))
        exec_config = h.containers().procs[ProcessId("c1", "e1")].config
        assert isinstance(exec_config, ExecConfig)
        assert exec_config.spec == {"args": ["sh"], "cwd": "/"}
        assert exec_config.stdio.stdout == "/fifo/e1"
        pid = (await h.task.Start(task_pb2.StartRequest(id="c1", exec_id="e1"))).pid
        st = await h.task.State(task_pb2.StateRequest(id="c1", exec_id="e1"))
        assert (st.id, st.exec_id, st.pid) == ("e1", "e1", pid)
        await h.task.Kill(task_pb2.KillRequest(id="c1", exec_id="e1", signal=15))
        assert (await h.task.Wait(task_pb2.WaitRequest(id="c1", exec_id="e1"))).exit_status == 143
        await h.task.Delete(task_pb2.DeleteRequest(id="c1", exec_id="e1"))
        await h.sink.wait_for(5)
        assert h.sink.topics() == [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
        ]
        (added,) = h.sink.events("/tasks/exec-added")
        assert (added.container_id, added.exec_id) == ("c1", "e1")
        (started,) = h.sink.events("/tasks/exec-started")
        assert (started.container_id, started.exec_id, started.pid) == ("c1", "e1", pid)

    run(tmp_path, body)


def test_exit_during_start_is_published_after_the_start_event(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.task.Create(h.create_request("c1", process={"args": ["exit-at-once"]}))
        await h.task.Start(task_pb2.StartRequest(id="c1"))
        assert (await h.task.Wait(task_pb2.WaitRequest(id="c1"))).exit_status == 3
        await h.sink.wait_for(3)
        assert h.sink.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit"]

    run(tmp_path, body)


def test_pause_resume_publish_events(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.task.Create(h.create_request("c1"))
        await h.task.Start(task_pb2.StartRequest(id="c1"))
        await h.task.Pause(task_pb2.PauseRequest(id="c1"))
        st = await h.task.State(task_pb2.StateRequest(id="c1"))
        assert st.status == types_task_pb2.PAUSED
        await h.task.Resume(task_pb2.ResumeRequest(id="c1"))
        await h.sink.wait_for(4)
        assert h.sink.topics()[2:] == ["/tasks/paused", "/tasks/resumed"]
        assert [e.container_id for e in h.sink.events("/tasks/paused")] == ["c1"]
        assert [e.container_id for e in h.sink.events("/tasks/resumed")] == ["c1"]

    run(tmp_path, body)


def test_pass_through_rpcs(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.task.Create(h.create_request("c1"))
        await h.task.Start(task_pb2.StartRequest(id="c1"))
        await h.task.Exec(task_pb2.ExecProcessRequest(id="c1", exec_id="e1"))
        await h.task.Start(task_pb2.StartRequest(id="c1", exec_id="e1"))
        pids = await h.task.Pids(task_pb2.PidsRequest(id="c1"))
        assert [p.pid for p in pids.processes] == [101, 102]
        await h.task.ResizePty(task_pb2.ResizePtyRequest(id="c1", exec_id="e1", width=80, height=24))
        await h.task.CloseIO(task_pb2.CloseIORequest(id="c1", stdin=True))
        await h.task.CloseIO(task_pb2.CloseIORequest(id="c1", stdin=False))  # nothing to close
        resources = any_pb2.Any(value=json.dumps({"memory": {"limit": 1 << 28}}).encode())
        await h.task.Update(task_pb2.UpdateTaskRequest(id="c1", resources=resources))
        await h.task.Kill(task_pb2.KillRequest(id="c1", signal=15, all=True))
        assert h.containers().calls == [
            ("resize", (ProcessId("c1", "e1"), 80, 24)),
            ("close_io", ProcessId("c1")),
            ("update", ("c1", {"memory": {"limit": 1 << 28}})),
            ("kill", (ProcessId("c1"), 15, True)),
        ]
        stats = await h.task.Stats(task_pb2.StatsRequest(id="c1"))
        assert stats.stats.type_url == "io.containerd.cgroups.v1.Metrics"
        metrics = cgroups_v1_metrics_pb2.Metrics.FromString(stats.stats.value)
        assert (metrics.pids.current, metrics.memory.usage.usage) == (2, 4096)
        connected = await h.task.Connect(task_pb2.ConnectRequest(id="c1"))
        assert (connected.shim_pid, connected.task_pid) == (os.getpid(), 101)

    run(tmp_path, body)


@pytest.mark.parametrize(
    ("call", "code"),
    [
        ("state-unknown", ttrpc.NotFound),
        ("create-twice", ttrpc.AlreadyExists),
        ("start-twice", ttrpc.FailedPrecondition),
        ("delete-running", ttrpc.FailedPrecondition),
        ("exec-bad-spec", ttrpc.InvalidArgument),
        ("exec-no-id", ttrpc.InvalidArgument),
        ("checkpoint", ttrpc.Unimplemented),
        ("create-no-bundle", ttrpc.InvalidArgument),
    ],
)
def test_errors_map_to_ttrpc_codes(tmp_path: Path, call: str, code: type[ttrpc.TtrpcError]) -> None:
    async def body(h: Harness) -> None:
        await h.task.Create(h.create_request("c1"))
        await h.task.Start(task_pb2.StartRequest(id="c1"))
        with pytest.raises(code) as info:
            if call == "state-unknown":
                await h.task.State(task_pb2.StateRequest(id="nope"))
            elif call == "create-twice":
                await h.task.Create(task_pb2.CreateTaskRequest(id="c1", bundle=str(h.tmp / "bundles" / "c1")))
            elif call == "start-twice":
                await h.task.Start(task_pb2.StartRequest(id="c1"))
            elif call == "delete-running":
                await h.task.Delete(task_pb2.DeleteRequest(id="c1"))
            elif call == "exec-bad-spec":
                bad = any_pb2.Any(value=b"{not json")
                await h.task.Exec(task_pb2.ExecProcessRequest(id="c1", exec_id="e", spec=bad))
            elif call == "exec-no-id":
                await h.task.Exec(task_pb2.ExecProcessRequest(id="c1"))
            elif call == "checkpoint":
                await h.task.Checkpoint(task_pb2.CheckpointTaskRequest(id="c1"))
            elif call == "create-no-bundle":
                await h.task.Create(task_pb2.CreateTaskRequest(id="c9", bundle=str(h.tmp / "missing")))
        assert str(info.value)

    run(tmp_path, body)


def test_rpcs_before_the_first_create_are_not_found(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        for call in (
            h.task.State(task_pb2.StateRequest(id="c1")),
            h.task.Start(task_pb2.StartRequest(id="c1")),
            h.task.Delete(task_pb2.DeleteRequest(id="c1")),
            h.task.Wait(task_pb2.WaitRequest(id="c1")),
        ):
            with pytest.raises(ttrpc.NotFound):
                await call
        connected = await h.task.Connect(task_pb2.ConnectRequest(id="c1"))
        assert (connected.shim_pid, connected.task_pid) == (os.getpid(), 0)

    run(tmp_path, body)


def test_config_error_reaches_the_caller_and_leaves_nothing(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        h.config_path.write_text('[runtime]\nhypervisor_name = "nosuchvmm"\n')
        with pytest.raises(ttrpc.InvalidArgument) as info:
            await h.task.Create(h.create_request("c1"))
        assert f"{h.config_path}: runtime.hypervisor_name: unknown hypervisor 'nosuchvmm'" in str(info.value)
        assert h.handler.log == []
        assert not h.store.path("sb1").parent.exists()
        assert h.sink.topics() == []

    run(tmp_path, body)


def test_failed_sandbox_start_is_torn_down_and_can_be_retried(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        with pytest.raises(ttrpc.Internal, match="kernel /nope/vmlinuz does not exist"):
            await h.task.Create(h.create_request("c1", annotations={"fake.fail-start": "1"}))
        assert h.handler.log == ["new_instance sb1", "sandbox.start c1", "sandbox.stop", "sandbox.cleanup"]
        assert not h.store.path("sb1").parent.exists()
        assert h.dispatcher.manager.instance is None
        assert (await h.task.Create(h.create_request("c2"))).pid == 101

    run(tmp_path, body)


def test_shutdown_exits_only_when_no_container_is_left(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.task.Create(h.create_request("c1"))
        await h.task.Start(task_pb2.StartRequest(id="c1"))
        await h.task.Shutdown(task_pb2.ShutdownRequest(id="c1"))
        assert not h.dispatcher.shutdown_requested.is_set()
        await h.task.Kill(task_pb2.KillRequest(id="c1", signal=9))
        await h.task.Delete(task_pb2.DeleteRequest(id="c1"))
        await h.task.Shutdown(task_pb2.ShutdownRequest(id="c1"))
        assert h.dispatcher.shutdown_requested.is_set()
        # What the run loop does next: stop the sandbox and drop its state.
        await h.dispatcher.manager.shutdown()
        assert h.handler.log[-2:] == ["sandbox.stop", "sandbox.cleanup"]
        assert not h.store.path("sb1").parent.exists()

    run(tmp_path, body)


def test_create_applies_enabled_kata_annotations_and_refuses_the_others(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        memory = {"io.katacontainers.config.hypervisor.default_memory": "1024"}
        with pytest.raises(ttrpc.InvalidArgument, match="default_memory: not enabled"):
            await h.task.Create(h.create_request("c1", annotations=memory))
        text = h.config_path.read_text().replace(
            "[hypervisor.dragonball]\n", '[hypervisor.dragonball]\nenable_annotations = ["default_memory"]\n'
        )
        h.config_path.write_text(text)
        await h.task.Create(h.create_request("c2", annotations=memory))
        assert h.handler.configs[0].hypervisor.default_memory == 1024

    run(tmp_path, body)
