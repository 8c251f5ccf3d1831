"""containerd.task.v2.Task: protobuf in, one `MessageDispatcher` call, protobuf out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2, empty_pb2
from google.protobuf.message import DecodeError

from kata_proto import ttrpc
from kata_proto.containerd import pack_event, runtimeoptions_pb2, task_pb2, types_task_pb2
from kata_shim.message import MessageDispatcher
from kata_shim.runtime._base import (
    ContainerConfig,
    ExecConfig,
    InvalidArgument,
    ProcessId,
    ProcessStatus,
    RootfsMount,
    Stdio,
)
from kata_shim.service._errors import status_for

_STATUS = {
    ProcessStatus.CREATED: types_task_pb2.CREATED,
    ProcessStatus.RUNNING: types_task_pb2.RUNNING,
    ProcessStatus.STOPPED: types_task_pb2.STOPPED,
    ProcessStatus.PAUSED: types_task_pb2.PAUSED,
}
# Kata (Go) accepts containerd's runtimeoptions and the older cri-containerd one: same fields.
_OPTION_TYPES = ("runtimeoptions.v1.Options", "cri.runtimeoptions.v1.Options")
Empty = empty_pb2.Empty


def decode_options(options: any_pb2.Any) -> dict[str, Any]:
    """CreateTaskRequest.options: {"type_url", "config_path"} for runtime options; other types are
    kept by name only (CRI hands runc options to every runtime)."""
    if not options.type_url and not options.value:
        return {}
    name = options.type_url.rsplit("/", 1)[-1]
    decoded: dict[str, Any] = {"type_url": name}
    if name in _OPTION_TYPES or name.endswith(".runtimeoptions.v1.Options"):
        try:
            parsed = runtimeoptions_pb2.Options.FromString(options.value)
        except DecodeError as err:
            raise InvalidArgument(f"runtime options ({name}) do not decode: {err}") from err
        decoded["config_path"] = parsed.config_path
    return decoded


def decode_json(data: bytes, what: str) -> dict[str, Any]:
    """An OCI JSON object carried in an Any (process spec, resources)."""
    if not data:
        return {}
    try:
        value = json.loads(data)
    except ValueError as err:
        raise InvalidArgument(f"{what} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def load_bundle_spec(bundle: Path) -> dict[str, Any]:
    """The bundle's config.json."""
    path = bundle / "config.json"
    try:
        return decode_json(path.read_bytes(), str(path)) or {}
    except OSError as err:
        raise InvalidArgument(f"cannot read {path}: {err.strerror}") from err


class TaskService:
    """The Task service a shim serves on its socket.

    Register it with ``TtrpcServer.register(kata_proto.containerd.TASK_SERVICE, TaskService(dispatcher))``.
    """

    def __init__(self, dispatcher: MessageDispatcher) -> None:
        self.dispatcher = dispatcher

    async def Create(
        self, req: task_pb2.CreateTaskRequest, ctx: ttrpc.CallContext
    ) -> task_pb2.CreateTaskResponse:
        with status_for("Create"):
            if not req.id:
                raise InvalidArgument("container id is empty")
            if req.checkpoint or req.parent_checkpoint:
                raise ttrpc.Unimplemented("kata-shim cannot restore a checkpoint")
            bundle = Path(req.bundle)
            config = ContainerConfig(
                container_id=req.id,
                bundle=bundle,
                spec=load_bundle_spec(bundle),
                rootfs=[RootfsMount(m.type, m.source, m.target, tuple(m.options)) for m in req.rootfs],
                stdio=Stdio(req.stdin, req.stdout, req.stderr, req.terminal),
                options=decode_options(req.options),
            )
            pid = await self.dispatcher.create(config, req.checkpoint)
        return task_pb2.CreateTaskResponse(pid=pid)

    async def Start(self, req: task_pb2.StartRequest, ctx: ttrpc.CallContext) -> task_pb2.StartResponse:
        with status_for("Start"):
            pid = await self.dispatcher.start(ProcessId(req.id, req.exec_id))
        return task_pb2.StartResponse(pid=pid)

    async def Delete(self, req: task_pb2.DeleteRequest, ctx: ttrpc.CallContext) -> task_pb2.DeleteResponse:
        with status_for("Delete"):
            pid, status = await self.dispatcher.delete(ProcessId(req.id, req.exec_id))
        return task_pb2.DeleteResponse(pid=pid, exit_status=status.code, exited_at=status.timestamp())

    async def State(self, req: task_pb2.StateRequest, ctx: ttrpc.CallContext) -> task_pb2.StateResponse:
        with status_for("State"):
            st = await self.dispatcher.state(ProcessId(req.id, req.exec_id))
        resp = task_pb2.StateResponse(
            id=req.exec_id or req.id,
            exec_id=req.exec_id,
            bundle=st.bundle,
            pid=st.pid,
            status=_STATUS[st.status],
            stdin=st.stdio.stdin,
            stdout=st.stdio.stdout,
            stderr=st.stdio.stderr,
            terminal=st.stdio.terminal,
        )
        if st.exit_status is not None:
            resp.exit_status = st.exit_status.code
            resp.exited_at.CopyFrom(st.exit_status.timestamp())
        return resp

    async def Pids(self, req: task_pb2.PidsRequest, ctx: ttrpc.CallContext) -> task_pb2.PidsResponse:
        with status_for("Pids"):
            pids = await self.dispatcher.pids(req.id)
        return task_pb2.PidsResponse(processes=[types_task_pb2.ProcessInfo(pid=p) for p in pids])

    async def Pause(self, req: task_pb2.PauseRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        with status_for("Pause"):
            await self.dispatcher.pause(req.id)
        return Empty()

    async def Resume(self, req: task_pb2.ResumeRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        with status_for("Resume"):
            await self.dispatcher.resume(req.id)
        return Empty()

    async def Checkpoint(
        self, req: task_pb2.CheckpointTaskRequest, ctx: ttrpc.CallContext
    ) -> empty_pb2.Empty:
        raise ttrpc.Unimplemented("kata-shim does not checkpoint containers")

    async def Kill(self, req: task_pb2.KillRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        with status_for("Kill"):
            await self.dispatcher.kill(ProcessId(req.id, req.exec_id), req.signal, req.all)
        return Empty()

    async def Exec(self, req: task_pb2.ExecProcessRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        with status_for("Exec"):
            if not req.exec_id:
                raise InvalidArgument("exec id is empty")
            config = ExecConfig(
                process=ProcessId(req.id, req.exec_id),
                spec=decode_json(req.spec.value, "exec process spec"),
                stdio=Stdio(req.stdin, req.stdout, req.stderr, req.terminal),
            )
            await self.dispatcher.exec(config)
        return Empty()

    async def ResizePty(self, req: task_pb2.ResizePtyRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        with status_for("ResizePty"):
            await self.dispatcher.resize_pty(ProcessId(req.id, req.exec_id), req.width, req.height)
        return Empty()

    async def CloseIO(self, req: task_pb2.CloseIORequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        with status_for("CloseIO"):
            if req.stdin:
                await self.dispatcher.close_io(ProcessId(req.id, req.exec_id))
        return Empty()

    async def Update(self, req: task_pb2.UpdateTaskRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        with status_for("Update"):
            await self.dispatcher.update(req.id, decode_json(req.resources.value, "resources"))
        return Empty()

    async def Wait(self, req: task_pb2.WaitRequest, ctx: ttrpc.CallContext) -> task_pb2.WaitResponse:
        with status_for("Wait"):
            status = await self.dispatcher.wait(ProcessId(req.id, req.exec_id))
        return task_pb2.WaitResponse(exit_status=status.code, exited_at=status.timestamp())

    async def Stats(self, req: task_pb2.StatsRequest, ctx: ttrpc.CallContext) -> task_pb2.StatsResponse:
        with status_for("Stats"):
            metrics = await self.dispatcher.stats(req.id)
        return task_pb2.StatsResponse(stats=pack_event(metrics))

    async def Connect(self, req: task_pb2.ConnectRequest, ctx: ttrpc.CallContext) -> task_pb2.ConnectResponse:
        with status_for("Connect"):
            shim_pid, task_pid = await self.dispatcher.connect(req.id)
        return task_pb2.ConnectResponse(shim_pid=shim_pid, task_pid=task_pid)

    async def Shutdown(self, req: task_pb2.ShutdownRequest, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        with status_for("Shutdown"):
            await self.dispatcher.shutdown()
        return Empty()
