"""A containerd shim v2 stand-in whose Task service is our TtrpcServer.

containerd's own ttrpc client (Go) then calls our server: Create, Start, Wait, Delete,
Shutdown. The "task" runs nothing; it exits with status 7 shortly after Start.

    fake_shim.py [flags] start    (containerd runs this with cwd = bundle)
    fake_shim.py [flags] delete
    fake_shim.py serve SOCKET LOG CONTAINERD_ADDRESS   (the daemon `start` leaves behind)

Every call the daemon serves is appended to LOG as `Method id seconds-left namespace`
(`-` when the call has no deadline, `None` when no namespace metadata came).
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from typing import Any

import trio
from google.protobuf import empty_pb2, timestamp_pb2

from kata_proto import ttrpc
from kata_proto._gen.containerd.runtime.task.v2 import shim_pb2
from kata_proto._gen.containerd.types.task import task_pb2

EXIT_STATUS = 7
TASK = shim_pb2.DESCRIPTOR.services_by_name["Task"]


def _flags(argv: list[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    i = 0
    while i < len(argv):
        if argv[i].startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            flags[argv[i].lstrip("-")] = argv[i + 1]
            i += 2
        else:
            i += 1
    return flags


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


class FakeTask:
    def __init__(self, log: str, done: trio.CancelScope) -> None:
        self._log = log
        self._done = done
        self._started = trio.Event()
        self._exited = trio.Event()
        self._bundle = ""

    def _record(self, method: str, ctx: ttrpc.CallContext, id: str) -> None:
        with open(self._log, "a") as f:
            left = ctx.time_remaining()
            f.write(f"{method} {id} {'-' if left == float('inf') else f'{left:.1f}'} {ctx.namespace}\n")

    async def Create(self, req: Any, ctx: ttrpc.CallContext) -> Any:
        self._record("Create", ctx, req.id)
        self._bundle = req.bundle
        return shim_pb2.CreateTaskResponse(pid=os.getpid())

    async def Start(self, req: Any, ctx: ttrpc.CallContext) -> Any:
        self._record("Start", ctx, req.id)
        self._started.set()
        return shim_pb2.StartResponse(pid=os.getpid())

    async def Wait(self, req: Any, ctx: ttrpc.CallContext) -> Any:
        self._record("Wait", ctx, req.id)
        await self._started.wait()
        with trio.move_on_after(0.2):
            await self._exited.wait()
        self._exited.set()
        return shim_pb2.WaitResponse(exit_status=EXIT_STATUS, exited_at=_now())

    async def State(self, req: Any, ctx: ttrpc.CallContext) -> Any:
        self._record("State", ctx, req.id)
        status = task_pb2.STOPPED if self._exited.is_set() else task_pb2.RUNNING
        return shim_pb2.StateResponse(
            id=req.id, bundle=self._bundle, pid=os.getpid(), status=status, exit_status=EXIT_STATUS
        )

    async def Kill(self, req: Any, ctx: ttrpc.CallContext) -> Any:
        self._record("Kill", ctx, req.id)
        self._exited.set()
        return empty_pb2.Empty()

    async def Delete(self, req: Any, ctx: ttrpc.CallContext) -> Any:
        self._record("Delete", ctx, req.id)
        return shim_pb2.DeleteResponse(pid=os.getpid(), exit_status=EXIT_STATUS, exited_at=_now())

    async def Connect(self, req: Any, ctx: ttrpc.CallContext) -> Any:
        self._record("Connect", ctx, req.id)
        return shim_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=os.getpid())

    async def Shutdown(self, req: Any, ctx: ttrpc.CallContext) -> Any:
        self._record("Shutdown", ctx, req.id)
        self._done.cancel()
        return empty_pb2.Empty()


async def _serve(path: str, log: str) -> None:
    # Never outlive a test by much, whatever containerd does.
    with trio.move_on_after(60) as scope:
        server = ttrpc.TtrpcServer()
        server.register(TASK, FakeTask(log, scope))
        await server.serve_unix(path)


def _socket_path(flags: dict[str, str]) -> str:
    key = f"{flags.get('address')}|{flags.get('namespace')}|{flags.get('id')}".encode()
    return f"/tmp/kata-fakeshim-{hashlib.sha256(key).hexdigest()[:16]}.sock"


def main(argv: list[str]) -> int:
    action = argv[-1]
    if argv[0] == "serve":
        trio.run(_serve, argv[1], argv[2])
        return 0
    flags = _flags(argv)
    path = _socket_path(flags)
    if action == "start":
        subprocess.Popen(
            [sys.executable, __file__, "serve", path, os.environ["FAKE_SHIM_LOG"], flags.get("address", "")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(200):
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    break
                except OSError:
                    time.sleep(0.05)
        sys.stdout.write(f"unix://{path}")
        return 0
    if action == "delete":
        sys.stdout.buffer.write(
            shim_pb2.DeleteResponse(exit_status=137, exited_at=_now()).SerializeToString()
        )
        return 0
    print(f"fake shim: unknown action {action!r}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
