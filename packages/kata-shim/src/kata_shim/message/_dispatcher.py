"""The message dispatcher: one typed call per Task request, routed to the pod's container manager,
with the lifecycle events containerd expects published around them.

It publishes /tasks/create, /tasks/start, /tasks/delete, /tasks/exec-added, /tasks/exec-started,
/tasks/paused and /tasks/resumed (fields as containerd's runc shim fills them). /tasks/exit and
/tasks/oom come from the container abstraction through `handler_publish`, which holds a process's
exit back until its /tasks/start or /tasks/exec-started is queued, so containerd never sees an exit
before the start of the same process.
"""

from __future__ import annotations

import contextlib
import logging
import os

import trio
from google.protobuf.message import Message

from kata_proto.containerd import (
    TOPIC_CREATE,
    TOPIC_DELETE,
    TOPIC_EXEC_ADDED,
    TOPIC_EXEC_STARTED,
    TOPIC_EXIT,
    TOPIC_PAUSED,
    TOPIC_RESUMED,
    TOPIC_START,
    events_pb2,
    mount_pb2,
)
from kata_shim.message._manager import RuntimeHandlerManager
from kata_shim.runtime._base import (
    ContainerConfig,
    ContainerManager,
    ExecConfig,
    ExitStatus,
    NotFound,
    ProcessId,
    ProcessState,
    Publisher,
)

log = logging.getLogger("kata_shim.dispatcher")


class MessageDispatcher:
    """Routes Task requests to the `RuntimeHandlerManager` and publishes lifecycle events."""

    def __init__(self, manager: RuntimeHandlerManager, publish: Publisher) -> None:
        self.manager = manager
        self._publish = publish
        self._starting: dict[ProcessId, trio.Event] = {}
        self.shutdown_requested = trio.Event()
        """Set by a Shutdown that found no container left: the shim should exit."""

    async def handler_publish(self, topic: str, event: Message) -> None:
        """The `Publisher` given to the container abstraction (exit events wait for their start)."""
        if topic == TOPIC_EXIT and isinstance(event, events_pb2.TaskExit):
            exec_id = "" if event.id in ("", event.container_id) else event.id
            started = self._starting.get(ProcessId(event.container_id, exec_id))
            if started is not None:
                await started.wait()
        await self._publish(topic, event)

    def _cm(self, container_id: str) -> ContainerManager:
        return self.manager.require(container_id).containers

    async def create(self, config: ContainerConfig, checkpoint: str = "") -> int:
        """Task.Create: the first also starts the sandbox. Returns the init pid."""
        pid = await self.manager.create_container(config, self.handler_publish)
        event = events_pb2.TaskCreate(
            container_id=config.container_id,
            bundle=str(config.bundle),
            rootfs=[
                mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
                for m in config.rootfs
            ],
            io=events_pb2.TaskIO(
                stdin=config.stdio.stdin,
                stdout=config.stdio.stdout,
                stderr=config.stdio.stderr,
                terminal=config.stdio.terminal,
            ),
            checkpoint=checkpoint,
            pid=pid,
        )
        await self._publish(TOPIC_CREATE, event)
        return pid

    async def start(self, process: ProcessId) -> int:
        """Task.Start of an init or exec'd process. Returns its pid."""
        cm = self._cm(process.container_id)
        gate = trio.Event()
        self._starting[process] = gate
        try:
            pid = await cm.start_process(process)
            event: Message
            if process.exec_id:
                event = events_pb2.TaskExecStarted(
                    container_id=process.container_id, exec_id=process.exec_id, pid=pid
                )
                await self._publish(TOPIC_EXEC_STARTED, event)
            else:
                event = events_pb2.TaskStart(container_id=process.container_id, pid=pid)
                await self._publish(TOPIC_START, event)
        finally:
            gate.set()
            if self._starting.get(process) is gate:
                del self._starting[process]
        return pid

    async def delete(self, process: ProcessId) -> tuple[int, ExitStatus]:
        """Task.Delete of a stopped process: its pid and how it ended."""
        cm = self._cm(process.container_id)
        pid = (await cm.state_process(process)).pid
        status = await cm.delete_process(process)
        if not process.exec_id:
            # As containerd's runc shim: one /tasks/delete per container (id "" means its init).
            event = events_pb2.TaskDelete(
                container_id=process.container_id,
                pid=pid,
                exit_status=status.code,
                exited_at=status.timestamp(),
            )
            await self._publish(TOPIC_DELETE, event)
        return pid, status

    async def state(self, process: ProcessId) -> ProcessState:
        """Task.State."""
        return await self._cm(process.container_id).state_process(process)

    async def pids(self, container_id: str) -> list[int]:
        """Task.Pids."""
        return await self._cm(container_id).pids(container_id)

    async def pause(self, container_id: str) -> None:
        """Task.Pause."""
        await self._cm(container_id).pause_container(container_id)
        await self._publish(TOPIC_PAUSED, events_pb2.TaskPaused(container_id=container_id))

    async def resume(self, container_id: str) -> None:
        """Task.Resume."""
        await self._cm(container_id).resume_container(container_id)
        await self._publish(TOPIC_RESUMED, events_pb2.TaskResumed(container_id=container_id))

    async def kill(self, process: ProcessId, signal: int, all_processes: bool = False) -> None:
        """Task.Kill."""
        await self._cm(process.container_id).kill_process(process, signal, all_processes)

    async def exec(self, config: ExecConfig) -> None:
        """Task.Exec: registers the process (it runs on Start)."""
        process = config.process
        await self._cm(process.container_id).exec_process(config)
        event = events_pb2.TaskExecAdded(container_id=process.container_id, exec_id=process.exec_id)
        await self._publish(TOPIC_EXEC_ADDED, event)

    async def resize_pty(self, process: ProcessId, width: int, height: int) -> None:
        """Task.ResizePty."""
        await self._cm(process.container_id).resize_process_pty(process, width, height)

    async def close_io(self, process: ProcessId) -> None:
        """Task.CloseIO with stdin set."""
        await self._cm(process.container_id).close_process_io(process)

    async def update(self, container_id: str, resources: dict[str, object]) -> None:
        """Task.Update."""
        await self._cm(container_id).update_container(container_id, resources)

    async def wait(self, process: ProcessId) -> ExitStatus:
        """Task.Wait: blocks until the process exits."""
        return await self._cm(process.container_id).wait_process(process)

    async def stats(self, container_id: str) -> Message:
        """Task.Stats: containerd cgroups v1 Metrics."""
        return await self._cm(container_id).stats_container(container_id)

    async def connect(self, container_id: str) -> tuple[int, int]:
        """Task.Connect: (shim pid, the container's init pid or 0 when unknown)."""
        task_pid = 0
        if self.manager.instance is not None:
            with contextlib.suppress(NotFound):
                task_pid = (await self._cm(container_id).state_process(ProcessId(container_id))).pid
        return os.getpid(), task_pid

    async def shutdown(self) -> bool:
        """Task.Shutdown: True (and `shutdown_requested` set) when no container is left.

        Never for a sandbox containerd drives through the Sandbox API: containerd 2.x sends Task.Shutdown
        after each container's Delete, but the pod lives on until ShutdownSandbox."""
        if self.manager.sandbox_api:
            log.info("shutdown ignored: sandbox %s ends on ShutdownSandbox", self.manager.sandbox_id)
            return False
        remaining = self.manager.container_ids()
        if remaining:
            log.info("shutdown ignored: containers %s remain", ", ".join(remaining))
            return False
        self.shutdown_requested.set()
        return True
