"""What the message dispatcher asks of a container abstraction (runtime-rs `RuntimeHandler`, `Sandbox`,
`ContainerManager`, trimmed to what the Task service needs).

One `RuntimeInstance` serves one pod (one shim process): its `sandbox` owns the VM (or nothing, for a
linux_container) and its `containers` run the pod's containers and their exec'd processes.

The Task service (kata_shim.service) publishes /tasks/create, start, delete, exec-added, exec-started,
paused and resumed itself. The container abstraction publishes what only it can see happen: /tasks/exit (from
its wait loop, exactly once per process, before `wait_process` returns to anyone) and /tasks/oom, through the
`Publisher` it was given. TaskExit.id is the exec id, or the container id for an init process.
The dispatcher holds a process's /tasks/exit back until its /tasks/start (or /tasks/exec-started) is
queued, so `start_process` must not wait for its own exit to be published (run the wait loop apart).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message


class RuntimeHandlerError(Exception):
    """Base of the errors a container abstraction raises (the service maps subclasses to ttrpc codes)."""


class NotFound(RuntimeHandlerError):
    """No such container or process (ttrpc NotFound)."""


class AlreadyExists(RuntimeHandlerError):
    """The container or exec id is taken (ttrpc AlreadyExists)."""


class FailedPrecondition(RuntimeHandlerError):
    """The call is not valid in the current state, e.g. start twice (ttrpc FailedPrecondition)."""


class InvalidArgument(RuntimeHandlerError):
    """A malformed request: bad OCI spec, unknown option (ttrpc InvalidArgument)."""


Publisher = Callable[[str, Message], Awaitable[None]]
"""``await publish("/tasks/exit", TaskExit(...))``: sends the event to containerd (never raises)."""


@dataclass(frozen=True)
class RootfsMount:
    """One of containerd's rootfs mounts (CreateTaskRequest.rootfs).

    Means ``mount -t type source target -o options``."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProcessId:
    """A container's init process (exec_id "") or one of its exec'd processes."""

    container_id: str
    exec_id: str = ""


@dataclass(frozen=True)
class Stdio:
    """containerd's fifo paths (empty when not wanted) and whether a terminal is requested."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass
class ContainerConfig:
    """Everything Task.Create carries about a container."""

    container_id: str
    bundle: Path
    spec: dict[str, Any]
    """The bundle's config.json, parsed."""
    rootfs: list[RootfsMount]
    stdio: Stdio
    options: dict[str, Any] = field(default_factory=dict)
    """Decoded runtime options (e.g. config_path)."""
    dns: list[str] | None = None
    """For a sandbox: the resolv.conf lines its pod config gives (Sandbox API: the CRI DNSConfig). None:
    the lines of the file the spec binds on /etc/resolv.conf (a sandbox container's)."""


@dataclass
class ExecConfig:
    """Everything Task.Exec carries about a new process."""

    process: ProcessId
    spec: dict[str, Any]
    """The OCI process JSON (ExecProcessRequest.spec decoded)."""
    stdio: Stdio


class ProcessStatus(enum.Enum):
    """containerd's task status names."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    PAUSED = "paused"


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended."""

    code: int
    exited_at: dt.datetime

    def timestamp(self) -> timestamp_pb2.Timestamp:
        """`exited_at` as the protobuf Timestamp of containerd's TaskExit, Wait and Delete answers."""
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(self.exited_at)
        return stamp


@dataclass
class ProcessState:
    """Task.State's answer for one process."""

    process: ProcessId
    pid: int
    status: ProcessStatus
    bundle: str
    stdio: Stdio
    exit_status: ExitStatus | None = None


class Sandbox(Protocol):
    """The pod's isolation boundary: for virt_container the VM and its agent."""

    async def start(self, first: ContainerConfig) -> None:
        """Prepare resources and boot (called once, on the pod's first Create, before `create_container`)."""

    async def stop(self) -> None:
        """Stop every process and the VM (idempotent)."""

    async def cleanup(self) -> None:
        """Release host resources: mounts, directories, sockets, taps (idempotent; also after a crash)."""

    def thread_ids(self) -> list[int]:
        """Native ids of the OS threads the sandbox added to this process (for the thread-count checks)."""

    def on_death(self, callback: Callable[[str], Any]) -> None:
        """Run ``callback(reason)`` (sync or async) when the sandbox dies under its own steam (the VM
        stopped, the agent was lost), not on a requested `stop`. The Sandbox API's WaitSandbox ends then."""


class ContainerManager(Protocol):
    """The pod's containers and their processes."""

    async def create_container(self, config: ContainerConfig) -> int:
        """Create (not start) the container; return its init pid as the guest reports it."""

    async def start_process(self, process: ProcessId) -> int:
        """Start the init process or an exec'd process; return its pid."""

    async def exec_process(self, config: ExecConfig) -> None:
        """Register an exec'd process (Task.Exec); it starts on `start_process`."""

    async def kill_process(self, process: ProcessId, signal: int, all_processes: bool = False) -> None:
        """Deliver a signal."""

    async def wait_process(self, process: ProcessId) -> ExitStatus:
        """Return once the process has exited (any number of callers)."""

    async def state_process(self, process: ProcessId) -> ProcessState:
        """The process's current state."""

    async def delete_process(self, process: ProcessId) -> ExitStatus:
        """Forget a stopped process (for an init process: remove the container and its host resources)."""

    async def close_process_io(self, process: ProcessId) -> None:
        """Close the process's stdin once what containerd wrote so far has been delivered."""

    async def resize_process_pty(self, process: ProcessId, width: int, height: int) -> None:
        """Resize a terminal process's pty."""

    async def pause_container(self, container_id: str) -> None:
        """Freeze every process of the container."""

    async def resume_container(self, container_id: str) -> None:
        """Undo `pause_container`."""

    async def stats_container(self, container_id: str) -> Message:
        """containerd cgroups metrics (io.containerd.cgroups.v1.Metrics) for Task.Stats."""

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        """Apply OCI LinuxResources JSON."""

    async def pids(self, container_id: str) -> list[int]:
        """Pids of the container's processes (as the guest sees them)."""

    def container_ids(self) -> list[str]:
        """Containers that exist now."""


@dataclass
class RuntimeInstance:
    """One pod: its sandbox and its container manager."""

    sandbox: Sandbox
    containers: ContainerManager


class RuntimeHandler(Protocol):
    """A container abstraction (virt_container, linux_container, wasm_container) registered by name."""

    name: str

    def new_instance(self, sandbox_id: str, config: Any, publish: Publisher) -> RuntimeInstance:
        """Build the pod's sandbox and container manager (nothing starts until `Sandbox.start`).

        ``config`` is the loaded kata_shim configuration (TomlConfig)."""
