"""A container in the sandbox: its bundle, storages, init process, execs and runtime state."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from typing import Any

import trio

from kata_agent import _cgroups, _guest
from kata_agent._mount import MountedStorage, release_storages
from kata_agent._passfd import PassfdStdio
from kata_agent._process import Process
from kata_agent._runtime import ConsoleSocket, OciRuntime
from kata_proto import ttrpc


class Container:
    """One container: created by the runtime at CreateContainer, run at StartContainer."""

    def __init__(self, container_id: str, bundle: str, runtime: OciRuntime, nursery: trio.Nursery) -> None:
        self.id = container_id
        self.bundle = bundle
        self.runtime = runtime
        self.storages: list[MountedStorage] = []
        self.init: Process | None = None
        self.execs: dict[str, Process] = {}
        self.status = "creating"
        self.cgroups: dict[str, str] = {}
        self._nursery = nursery
        self._log = os.path.join(bundle, "runtime.log")

    # -- lifecycle ------------------------------------------------------------------------------
    async def create(self, config: dict[str, Any], passfd: PassfdStdio | None = None) -> None:
        """Write config.json and `runtime create`; the init waits for StartContainer.

        With `passfd`, the init's stdio is pumped through those streams (the caller closes them if this
        fails).
        """
        _guest.write_json(os.path.join(self.bundle, "config.json"), config)
        process = Process("", terminal=bool(config["process"].get("terminal")))
        self.init = process
        pid_file = os.path.join(self.bundle, "init.pid")
        args = ["create", "--bundle", self.bundle, "--pid-file", pid_file]
        await self._spawn(process, args, pid_file)
        if passfd is not None:
            process.attach_passfd(passfd, self._nursery)
        try:
            self.cgroups = _cgroups.cgroup_paths(process.pid)
        except OSError:
            self.cgroups = {}
        self.status = "created"

    async def _spawn(self, process: Process, args: list[str], pid_file: str) -> None:
        # Detached runtime commands: the process ends up a child of the agent (subreaper).
        if process.terminal:
            console = os.path.join(self.bundle, f"console-{process.exec_id or 'init'}.sock")
            async with ConsoleSocket(console) as sock, trio.open_nursery() as nursery:
                got: list[int] = []
                received = trio.Event()

                async def receive() -> None:
                    got.append(await sock.receive_fd())
                    received.set()

                nursery.start_soon(receive)
                try:
                    await self.runtime.run([*args, "--console-socket", console, self.id], log=self._log)
                except BaseException:
                    nursery.cancel_scope.cancel()
                    raise
                with trio.fail_after(10):
                    await received.wait()
                process.attach_pty(got[0])
        else:
            child = process.open_pipes()
            try:
                await self.runtime.run(
                    [*args, self.id], log=self._log, stdin=child[0], stdout=child[1], stderr=child[2]
                )
            finally:
                for fd in child:
                    os.close(fd)
        pid = _guest.read_pid(pid_file)
        process.pid = pid
        self._nursery.start_soon(process.watch, pid)

    async def start(self) -> None:
        """`runtime start`: the init execs the container's process."""
        if self.status != "created":
            raise ttrpc.FailedPrecondition(f"container {self.id} is {self.status}, not created")
        await self.runtime.run(["start", self.id], log=self._log)
        self.status = "running"

    async def exec(
        self, exec_id: str, process_json: dict[str, Any], passfd: PassfdStdio | None = None
    ) -> Process:
        """`runtime exec -d` of another process in the running container (stdio through `passfd`, which
        the caller closes if this fails)."""
        if exec_id in self.execs or not exec_id:
            raise ttrpc.AlreadyExists(f"exec {exec_id!r} already exists in container {self.id}")
        if self.status != "running" or (self.init is not None and self.init.exited):
            raise ttrpc.FailedPrecondition(f"container {self.id} is {self.status}, not running")
        path = os.path.join(self.bundle, f"exec-{len(self.execs)}.json")
        _guest.write_json(path, process_json)
        process = Process(exec_id, terminal=bool(process_json.get("terminal")))
        self.execs[exec_id] = process
        pid_file = os.path.join(self.bundle, f"exec-{len(self.execs)}.pid")
        try:
            await self._spawn(process, ["exec", "-d", "--pid-file", pid_file, "--process", path], pid_file)
        except BaseException:
            del self.execs[exec_id]
            process.close()
            raise
        if passfd is not None:
            process.attach_passfd(passfd, self._nursery)
        return process

    def process(self, exec_id: str) -> Process:
        """The init (empty exec id) or an exec; NotFound otherwise."""
        found = self.init if not exec_id else self.execs.get(exec_id)
        if found is None:
            raise ttrpc.NotFound(f"process {exec_id!r} not found in container {self.id}")
        return found

    def forget_if_finished(self, exec_id: str) -> None:
        """Drop an exec whose status and output have all been collected (frees its fds)."""
        process = self.execs.get(exec_id) if exec_id else None
        if process is not None and process.finished:
            del self.execs[exec_id]
            process.close()

    async def pause(self) -> None:
        """Freeze every process of the container."""
        await self.runtime.run(["pause", self.id], log=self._log)
        self.status = "paused"

    async def resume(self) -> None:
        """Thaw the container."""
        await self.runtime.run(["resume", self.id], log=self._log)
        self.status = "running"

    async def update(self, resources: dict[str, Any]) -> None:
        """`runtime update -r` with OCI LinuxResources JSON."""
        path = os.path.join(self.bundle, "update.json")
        _guest.write_json(path, resources)
        await self.runtime.run(["update", "-r", path, self.id], log=self._log)

    async def destroy(self, *, grace: float = 10.0) -> None:
        """Kill what runs, `runtime delete -f`, unmount storages, remove the bundle; never raises."""
        for proc in [self.init, *self.execs.values()]:
            if proc is not None and not proc.exited and proc.pid > 0:
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            await self.runtime.run(["delete", "--force", self.id], stderr=subprocess.DEVNULL)
        with trio.move_on_after(grace):
            for proc in [self.init, *self.execs.values()]:
                if proc is not None and proc.pid > 0:
                    await proc.wait()
        for proc in [self.init, *self.execs.values()]:
            if proc is not None:
                proc.close()
        _remove_agent_cgroups(self.cgroups)
        try:
            release_storages(self.storages)
        finally:
            shutil.rmtree(self.bundle, ignore_errors=True)
        self.status = "stopped"


def _remove_agent_cgroups(paths: dict[str, str]) -> None:
    # The runtime removes the container's cgroup; the agent's default parent (/kata_agent)
    # goes too once empty (rmdir of a cgroup with children fails, which is fine).
    for path in set(paths.values()):
        for d in (path, os.path.dirname(path)):
            if os.path.basename(d) == "kata_agent" or d == path:
                with contextlib.suppress(OSError):
                    os.rmdir(d)
