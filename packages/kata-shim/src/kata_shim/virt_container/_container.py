"""VirtContainerManager: the pod's containers and processes, run by the agent in the sandbox's VM.

Per process, trio tasks in the sandbox's nursery (never an OS thread): one copies containerd's stdin
fifo to WriteStdin, one or two copy ReadStdout/ReadStderr to the stdout/stderr fifos (a terminal has only
stdout), and one waits: WaitProcess, then the output copies' EOF, then the exit is recorded, /tasks/exit
is published once and every `wait_process` caller wakes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from google.protobuf.message import Message

from kata_agent_client import (
    AgentAlreadyExists,
    AgentClient,
    AgentDisconnected,
    AgentError,
    AgentFailedPrecondition,
    AgentInvalidArgument,
    AgentNotFound,
    BadSpec,
    StdioPorts,
)
from kata_proto.containerd import TOPIC_EXIT, events_pb2
from kata_resources import ResourceError, ResourceUpdateOp, mount_rootfs, share_volumes
from kata_shim.hypervisor._base import HypervisorError
from kata_shim.runtime._base import (
    AlreadyExists,
    ContainerConfig,
    ExecConfig,
    ExitStatus,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ProcessId,
    ProcessState,
    ProcessStatus,
    RuntimeHandlerError,
    Stdio,
)
from kata_shim.virt_container._devices import (
    PluggedDevices,
    block_entries,
    block_rootfs_source,
    is_loop_file_mount,
    plug_block_devices,
    plug_block_rootfs,
    unplug_block_devices,
    without_block_entries,
)
from kata_shim.virt_container._metrics import metrics_from_stats
from kata_shim.virt_container._oci import guest_spec
from kata_shim.virt_container._passfd import passfd_stdio
from kata_shim.virt_container._pod import shares_sandbox_pidns
from kata_shim.virt_container._sandbox import SandboxError, VirtSandbox
from kata_shim.virt_container._stdio import StdinCopy, copy_output, open_output_fifo
from kata_sys_util import Steps

log = logging.getLogger("kata_shim.virt_container")

#: Exit code recorded for a process whose VM went away before it reported one.
LOST_EXIT_CODE = 255
#: How long `stop` lets processes report their exit after DestroySandbox.
STOP_GRACE = 5.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _translate(err: AgentError, what: str) -> RuntimeHandlerError:
    """An agent client error as the error the Task service maps back to the same code."""
    text = f"{what}: {err}"
    if isinstance(err, AgentNotFound):
        return NotFound(text)
    if isinstance(err, AgentAlreadyExists):
        return AlreadyExists(text)
    if isinstance(err, AgentInvalidArgument | BadSpec):
        return InvalidArgument(text)
    if isinstance(err, AgentFailedPrecondition):
        return FailedPrecondition(text)
    return RuntimeHandlerError(text)


@contextlib.contextmanager
def _agent_errors(what: str) -> Iterator[None]:
    """An agent call's error, raised as `_translate(err, what)` (the Task service maps it to its code)."""
    try:
        yield
    except AgentError as err:
        raise _translate(err, what) from err


@dataclass
class _Process:
    id: ProcessId
    stdio: Stdio
    spec: dict[str, Any] | None = None
    """The OCI process JSON of an exec (the init's is in the container spec)."""
    status: ProcessStatus = ProcessStatus.CREATED
    exit: ExitStatus | None = None
    exited: trio.Event = field(default_factory=trio.Event)
    stdin: StdinCopy | None = None
    outputs: list[int | None] = field(default_factory=list)
    """Output fifo fds opened at create, handed to the copy tasks at start."""
    waiting: bool = False
    ports: StdioPorts | None = None
    """Passfd stdio: the VMM holds the fifos and these stream ports carry them to the agent."""
    """The copy and wait tasks run (from start, or from a kill before start)."""

    @property
    def exec_id(self) -> str:
        return self.id.exec_id


@dataclass
class _Container:
    id: str
    bundle: Path
    init: _Process
    execs: dict[str, _Process] = field(default_factory=dict)
    paused: bool = False
    devices: PluggedDevices = field(default_factory=PluggedDevices)
    """Its hot-plugged block devices (removed with it)."""


class VirtContainerManager:
    """runtime-rs's `VirtContainerManager`: containers in the VM, through the agent."""

    def __init__(self, sandbox: VirtSandbox) -> None:
        self.sandbox = sandbox
        self._containers: dict[str, _Container] = {}
        self._creating: set[str] = set()
        sandbox.on_stop(self._on_sandbox_stop)
        sandbox.on_death(self._on_sandbox_death)
        sandbox.container_known = self._containers.__contains__

    # -- lookups ----------------------------------------------------------------------------------
    def _container(self, container_id: str) -> _Container:
        found = self._containers.get(container_id)
        if found is None:
            raise NotFound(f"container {container_id!r} not found")
        return found

    def _process(self, process: ProcessId) -> _Process:
        c = self._container(process.container_id)
        if not process.exec_id:
            return c.init
        found = c.execs.get(process.exec_id)
        if found is None:
            raise NotFound(f"process {process.exec_id!r} of container {process.container_id!r} not found")
        return found

    def _agent(self) -> AgentClient:
        return self.sandbox.agent

    def container_ids(self) -> list[str]:
        """Containers that exist now."""
        return list(self._containers)

    # -- create / start ---------------------------------------------------------------------------
    async def create_container(self, config: ContainerConfig) -> int:
        """Mount the rootfs and volumes into the shared dir, open the output fifos, CreateContainer."""
        cid = config.container_id
        if cid in self._containers or cid in self._creating:
            raise AlreadyExists(f"container {cid!r} already exists")
        agent = self._agent()
        layout, ledger = self.sandbox.layout, self.sandbox.ledger
        process = _Process(ProcessId(cid), config.stdio)
        devices = PluggedDevices()
        steps = Steps()
        self._creating.add(cid)
        try:
            root = config.spec.get("root") or {}
            bundle_rootfs = Path(root.get("path") or "rootfs")
            if not bundle_rootfs.is_absolute():
                bundle_rootfs = config.bundle / bundle_rootfs
            hv = self.sandbox.require_hypervisor()
            storages = []
            block_root = block_rootfs_source(config.rootfs)
            if block_root is not None and hv.capabilities().block_device_hotplug:
                # a block snapshotter's rootfs: the guest mounts it; the host only makes the mount point
                ledger.mkdir(layout.rootfs_host_path(cid))
                guest_root = layout.rootfs_guest_path(cid)
                storages.append(await plug_block_rootfs(hv, cid, config.rootfs[0], guest_root, devices))
            elif block_root is not None and is_loop_file_mount(config.rootfs[0]):
                # the host would need a loop device to mount it: the share is for directories
                raise InvalidArgument(
                    f"container {cid}: rootfs {block_root} is a loop file (a blockfile snapshot), which "
                    f"needs block hot-plug; {hv.name} has none"
                )
            else:
                mount_rootfs(config.rootfs, layout.rootfs_host_path(cid), ledger, bundle_rootfs=bundle_rootfs)
            steps.mark("rootfs")
            mounts = share_volumes(config.spec.get("mounts") or [], layout, cid, ledger)
            mounts = self.sandbox.guest_mounts(mounts)  # the pod's one /dev/shm
            spec = guest_spec(config.spec, cid, layout.rootfs_guest_path(cid), mounts)
            steps.mark("volumes")
            # dynamic sizing: the VM grows before the container asks the guest for its CPUs (runtime-rs)
            await self.sandbox.resize_for(cid, _oci_resources(config.spec), ResourceUpdateOp.ADD)
            if block_entries(spec):
                await plug_block_devices(hv, cid, spec, devices)
                spec = without_block_entries(spec)
            steps.mark("resize-devices")
            await self._open_stdio(agent, process)
            steps.mark("stdio")
            await agent.create_container(
                cid,
                spec,
                storages=storages or None,
                devices=devices.agent or None,
                stdio_ports=process.ports,
                sandbox_pidns=shares_sandbox_pidns(config.spec),  # pod namespaces (issue 14)
            )
            steps.mark("agent-create")
        except BaseException as err:
            self._close_stdio(process)
            if self.sandbox.vcpu_plan is not None:
                self.sandbox.vcpu_plan.requests.pop(cid, None)  # uncounted; the VM shrinks on a later change
            if self.sandbox.memory_plan is not None:
                self.sandbox.memory_plan.requests.pop(cid, None)
            if devices.block:
                with trio.CancelScope(shield=True):
                    await unplug_block_devices(self.sandbox.require_hypervisor(), cid, devices)
            try:
                # Only this container's mounts: other Creates may be mounting concurrently.
                ledger.undo(below=layout.container_dir(cid))
                layout.remove_container(cid)
            except ResourceError as rm_err:
                log.warning("container %s: %s", cid, rm_err)
            if isinstance(err, AgentError):
                raise _translate(err, f"CreateContainer {cid}") from err
            if isinstance(err, (ResourceError, ValueError, OSError)):
                raise InvalidArgument(f"container {cid}: {err}") from err
            if isinstance(err, HypervisorError):
                raise SandboxError(f"container {cid}: {err}") from err
            raise
        finally:
            self._creating.discard(cid)
        self._containers[cid] = _Container(cid, config.bundle, process, devices=devices)
        # Pod resources (issue 14): the sandbox cgroup's limits now count this container too.
        await self.sandbox.container_resources(cid, _oci_resources(config.spec))
        steps.mark("pod-resources")
        log.debug("container %s: created, %s", cid, steps)
        return self.sandbox.pid()

    async def _open_stdio(self, agent: AgentClient, p: _Process) -> None:
        """Open the fifos now (as containerd's runc shim does at create), so a bad path fails Create.

        With passfd I/O the fifos go to the VMM at once and only their stream ports are kept."""
        listener = self.sandbox.passfd_listener()
        if listener is not None:
            p.ports = await passfd_stdio(
                listener, p.stdio.stdin, p.stdio.stdout, p.stdio.stderr, terminal=p.stdio.terminal
            )
            return
        paths = [p.stdio.stdout] if p.stdio.terminal else [p.stdio.stdout, p.stdio.stderr]
        try:
            for path in paths:
                p.outputs.append(open_output_fifo(path) if path else None)
            if p.stdio.stdin:
                cid, eid = p.id.container_id, p.exec_id
                p.stdin = StdinCopy(p.stdio.stdin, lambda data: agent.write_stdin(cid, eid, data))
        except BaseException:
            self._close_stdio(p)
            raise

    def _close_stdio(self, p: _Process) -> None:
        """Close fifos no copy task took over (a process deleted or failed before it started)."""
        for fd in p.outputs:
            if fd is not None:
                os.close(fd)
        p.outputs.clear()
        if p.stdin is not None and not p.stdin.started:
            p.stdin.discard()
            p.stdin = None

    async def start_process(self, process: ProcessId) -> int:
        """StartContainer (init) or ExecProcess (exec), then the stdio copies and the wait task."""
        c = self._container(process.container_id)
        p = self._process(process)
        if p.status is not ProcessStatus.CREATED:
            raise FailedPrecondition(f"process {process} is {p.status.value}, not created")
        if process.exec_id and c.init.status is not ProcessStatus.RUNNING:
            raise FailedPrecondition(f"container {c.id} is not running")
        agent = self._agent()
        with _agent_errors(f"start {process}"):
            if process.exec_id:
                assert p.spec is not None
                await agent.exec_process(c.id, process.exec_id, p.spec, stdio_ports=p.ports)
            else:
                await agent.start_container(c.id)
        p.status = ProcessStatus.RUNNING
        self._start_io_and_wait(agent, p)
        if not process.exec_id and c.id == self.sandbox.sandbox_id:
            await self.sandbox.rescan_network()  # as upstream does on the sandbox container's Start
        return self.sandbox.pid()

    def _start_io_and_wait(self, agent: AgentClient, p: _Process) -> None:
        if p.waiting:
            return
        p.waiting = True
        nursery = self.sandbox.nursery
        cid, eid = p.id.container_id, p.exec_id
        if p.stdin is not None:
            nursery.start_soon(p.stdin.run)
        copies_done: list[trio.Event] = []
        readers = [lambda: agent.read_stdout(cid, eid), lambda: agent.read_stderr(cid, eid)]
        for read, fd, name in zip(readers, p.outputs, ("stdout", "stderr"), strict=False):
            done = trio.Event()
            copies_done.append(done)
            nursery.start_soon(self._copy, read, fd, name, done)
        p.outputs = []  # the copies own the fds now
        nursery.start_soon(self._wait, agent, p, copies_done)

    @staticmethod
    async def _copy(read: Any, fd: int | None, name: str, done: trio.Event) -> None:
        try:
            await copy_output(read, fd, name=name)
        except Exception as err:  # one process's copy must not take the pod's tasks down
            log.error("%s copy failed: %r", name, err)
        finally:
            done.set()

    async def _wait(self, agent: AgentClient, p: _Process, copies_done: list[trio.Event]) -> None:
        code = await self._exit_code(agent, p)
        for done in copies_done:
            await done.wait()
        await self._record_exit(p, code)

    @staticmethod
    async def _exit_code(agent: AgentClient, p: _Process) -> int:
        # WaitProcess, asked again on the new connection when the agent connection was re-established.
        cid, eid = p.id.container_id, p.exec_id
        while True:
            generation = agent.generation
            try:
                return await agent.wait_process(cid, eid)
            except AgentDisconnected as err:
                if await agent.wait_reconnected(generation):
                    log.info("process %s: agent reconnected, asking WaitProcess again", p.id)
                    continue
                failure: BaseException = err
            except Exception as err:  # the agent or the VM is gone (or answered nonsense)
                failure = err
            log.warning("process %s: WaitProcess failed (%r): exit %d", p.id, failure, LOST_EXIT_CODE)
            return LOST_EXIT_CODE

    async def _record_exit(self, p: _Process, code: int) -> None:
        if p.exit is not None:
            return
        p.exit = ExitStatus(code, _now())
        p.status = ProcessStatus.STOPPED
        if p.stdin is not None:
            p.stdin.close()
        event = events_pb2.TaskExit(
            container_id=p.id.container_id,
            id=p.exec_id or p.id.container_id,
            pid=self.sandbox.pid(),
            exit_status=code,
            exited_at=p.exit.timestamp(),
        )
        with trio.CancelScope(shield=True):
            await self.sandbox.publish(TOPIC_EXIT, event)
        p.exited.set()

    async def _on_sandbox_stop(self) -> None:
        # After DestroySandbox: let the wait tasks report what the agent killed, then give up on the rest.
        running = [p for c in self._containers.values() for p in (c.init, *c.execs.values())]
        with trio.move_on_after(STOP_GRACE):
            for p in running:
                if p.status is ProcessStatus.RUNNING or p.status is ProcessStatus.PAUSED:
                    await p.exited.wait()
        await self._end_all(running)

    async def _on_sandbox_death(self, reason: str) -> None:
        # The VM is gone: nothing will report an exit; every process ends now with LOST_EXIT_CODE.
        running = [p for c in self._containers.values() for p in (c.init, *c.execs.values())]
        for p in running:
            if p.status is not ProcessStatus.STOPPED:
                log.error("process %s: exit %d, %s", p.id, LOST_EXIT_CODE, reason)
        await self._end_all(running)

    async def _end_all(self, processes: list[_Process]) -> None:
        for p in processes:
            # Never-started processes are ended too, so no Task.Wait on them hangs.
            if p.status is not ProcessStatus.STOPPED:
                self._close_stdio(p)
                await self._record_exit(p, LOST_EXIT_CODE)

    # -- exec -------------------------------------------------------------------------------------
    async def exec_process(self, config: ExecConfig) -> None:
        """Register an exec'd process; its fifos open now, it runs on `start_process`."""
        c = self._container(config.process.container_id)
        eid = config.process.exec_id
        if not eid:
            raise InvalidArgument("exec id is empty")
        if eid in c.execs:
            raise AlreadyExists(f"exec {eid!r} already exists in container {c.id!r}")
        if c.init.status is not ProcessStatus.RUNNING:
            raise FailedPrecondition(f"container {c.id} is {c.init.status.value}, not running")
        if not config.spec.get("args"):
            raise InvalidArgument("exec process has no args")
        p = _Process(config.process, config.stdio, spec=config.spec)
        try:
            await self._open_stdio(self._agent(), p)
        except OSError as err:
            raise InvalidArgument(f"exec {eid}: stdio fifo: {err}") from err
        c.execs[eid] = p

    # -- signals, wait, state ---------------------------------------------------------------------
    async def kill_process(self, process: ProcessId, signal: int, all_processes: bool = False) -> None:
        """SignalProcess; NotFound once the process has exited (as runc's shim answers)."""
        p = self._process(process)
        if p.status is ProcessStatus.STOPPED:
            raise NotFound(f"process {process} already finished")
        if p.status is ProcessStatus.CREATED and process.exec_id:
            raise FailedPrecondition(f"process {process} is not started")
        agent = self._agent()
        with _agent_errors(f"kill {process}"):
            await agent.signal_process(process.container_id, process.exec_id, signal)
        if p.status is ProcessStatus.CREATED:
            # A created init killed before start still exits (runc's shim reports it): wait for it.
            self._start_io_and_wait(agent, p)

    async def wait_process(self, process: ProcessId) -> ExitStatus:
        """Return once the process has exited (after /tasks/exit went out)."""
        p = self._process(process)
        await p.exited.wait()
        assert p.exit is not None
        return p.exit

    async def state_process(self, process: ProcessId) -> ProcessState:
        """Status, pid and exit of one process."""
        c = self._container(process.container_id)
        p = self._process(process)
        status = p.status
        if c.paused and status is ProcessStatus.RUNNING:
            status = ProcessStatus.PAUSED
        return ProcessState(process, self.sandbox.pid(), status, str(c.bundle), p.stdio, p.exit)

    # -- delete -----------------------------------------------------------------------------------
    async def delete_process(self, process: ProcessId) -> ExitStatus:
        """Forget a stopped (or never started) process; the init takes the container with it:
        RemoveContainer, then its rootfs and volumes are unmounted and its directory removed."""
        c = self._container(process.container_id)
        p = self._process(process)
        if p.status in (ProcessStatus.RUNNING, ProcessStatus.PAUSED):
            raise FailedPrecondition(f"process {process} is still running")
        if not process.exec_id and any(
            e.status in (ProcessStatus.RUNNING, ProcessStatus.PAUSED) for e in c.execs.values()
        ):
            raise FailedPrecondition(f"container {c.id} still has running execs")
        exit_status = p.exit or ExitStatus(0, _now())
        self._close_stdio(p)
        if process.exec_id:
            del c.execs[process.exec_id]
            return exit_status
        await self._remove_container(c)
        return exit_status

    async def _remove_container(self, c: _Container) -> None:
        errors = []
        agent = self.sandbox.agent_or_none
        if agent is not None:
            try:
                with trio.move_on_after(self.sandbox.destroy_timeout):
                    await agent.remove_container(c.id)
            except AgentError as err:
                if not isinstance(err, AgentNotFound):
                    errors.append(f"RemoveContainer: {err}")
        if c.devices.block and self.sandbox.hypervisor is not None and self.sandbox.dead is None:
            with trio.CancelScope(shield=True):
                errors += await unplug_block_devices(self.sandbox.hypervisor, c.id, c.devices)
        layout = self.sandbox.layout
        try:
            self.sandbox.ledger.undo(below=layout.container_dir(c.id))
            layout.remove_container(c.id)
        except ResourceError as err:
            errors.append(str(err))
        del self._containers[c.id]
        await self.sandbox.container_resources(c.id, None)  # pod resources (issue 14)
        try:
            await self.sandbox.resize_for(c.id, None, ResourceUpdateOp.DEL)  # dynamic sizing: may shrink
        except SandboxError as err:  # the container is gone either way; the VM keeps its vCPUs
            log.warning("container %s: %s", c.id, err)
        if errors:
            log.warning("container %s: delete: %s", c.id, "; ".join(errors))
            if any(not e.startswith("RemoveContainer") for e in errors):
                raise RuntimeHandlerError(f"container {c.id}: {'; '.join(errors)}")

    # -- io ---------------------------------------------------------------------------------------
    async def close_process_io(self, process: ProcessId) -> None:
        """Close stdin once what containerd wrote so far reached the process."""
        p = self._process(process)
        if p.ports is not None:
            # Passfd: the VMM holds the stdin fifo's only read end; containerd closing its write end is
            # the EOF the VMM forwards (after every byte written before it) as the stream's shutdown.
            return
        if p.stdin is not None:
            p.stdin.close()
            if p.stdin.started:
                await p.stdin.done.wait()
        elif p.status is ProcessStatus.RUNNING:
            with _agent_errors(f"close io of {process}"):
                await self._agent().close_stdin(process.container_id, process.exec_id)

    async def resize_process_pty(self, process: ProcessId, width: int, height: int) -> None:
        """TtyWinResize (rows = height, columns = width)."""
        p = self._process(process)
        if not p.stdio.terminal:
            raise FailedPrecondition(f"process {process} has no terminal")
        if p.status is not ProcessStatus.RUNNING:
            return  # containerd resizes before start too; the agent has no pty yet
        with _agent_errors(f"resize {process}"):
            await self._agent().tty_win_resize(process.container_id, process.exec_id, height, width)

    # -- container-wide ---------------------------------------------------------------------------
    async def pause_container(self, container_id: str) -> None:
        """PauseContainer (the guest freezes the container's cgroup)."""
        c = self._container(container_id)
        with _agent_errors(f"pause {container_id}"):
            await self._agent().pause_container(container_id)
        c.paused = True

    async def resume_container(self, container_id: str) -> None:
        """ResumeContainer."""
        c = self._container(container_id)
        with _agent_errors(f"resume {container_id}"):
            await self._agent().resume_container(container_id)
        c.paused = False

    async def stats_container(self, container_id: str) -> Message:
        """StatsContainer as io.containerd.cgroups.v1.Metrics."""
        self._container(container_id)
        with _agent_errors(f"stats {container_id}"):
            stats = await self._agent().stats_container(container_id)
        return metrics_from_stats(stats)

    async def update_container(self, container_id: str, resources: dict[str, Any]) -> None:
        """UpdateContainer with OCI LinuxResources JSON."""
        self._container(container_id)
        try:
            await self.sandbox.resize_for(container_id, resources, ResourceUpdateOp.UPDATE)
        except ValueError as err:
            raise InvalidArgument(f"update {container_id}: {err}") from err
        with _agent_errors(f"update {container_id}"):
            await self._agent().update_container(container_id, resources)
        await self.sandbox.container_resources(container_id, resources)  # pod resources (issue 14)

    async def pids(self, container_id: str) -> list[int]:
        """The pid containerd knows the container's processes by (the VMM's; the agent API has no
        process listing in use by runtime-rs either)."""
        self._container(container_id)
        return [self.sandbox.pid()]


def _oci_resources(spec: dict[str, Any]) -> dict[str, Any]:
    """``linux.resources`` of an OCI spec ({} when absent)."""
    resources = (spec.get("linux") or {}).get("resources")
    return resources if isinstance(resources, dict) else {}
