"""grpc.AgentService and grpc.Health: the rpc handlers, over the agent's sandbox state."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import trio
from google.protobuf import empty_pb2

from kata_agent import _cgroups, _guest
from kata_agent.__about__ import __version__
from kata_agent._container import Container
from kata_agent._devices import add_devices, wait_for_devices, wait_for_storages
from kata_agent._errors import RuntimeFailed
from kata_agent._mount import STORAGE_DRIVERS, MountedStorage, mount_storage, release_storages
from kata_agent._namespaces import PodNamespaces
from kata_agent._network import Netlink
from kata_agent._oci import message_to_json, process_to_json, spec_to_config
from kata_agent._passfd import PassfdStdio, PassfdStreams, closed_on_error
from kata_agent._runtime import OciRuntime
from kata_proto import ttrpc
from kata_proto.agent import agent_pb2, health_pb2
from kata_sys_util import Steps, set_child_subreaper

log = logging.getLogger("kata_agent")

#: Seconds OnlineCPUMem waits for hot-added CPUs to appear, and the pause between its looks (upstream's agent:
#: 100 looks 50 ms apart; a guest under nested emulation takes longer to handle the ACPI event).
ONLINE_CPU_TIMEOUT = 20.0
ONLINE_CPU_RETRY = 0.05
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def become_subreaper() -> None:
    """prctl(PR_SET_CHILD_SUBREAPER): orphaned container processes are re-parented to us."""
    set_child_subreaper()


@dataclass
class AgentConfig:
    """Where the agent keeps bundles, which runtime it runs, where CopyFile may write."""

    runtime: str = "/usr/bin/crun"
    runtime_root: str | None = None
    run_dir: str = "/run/kata-containers"
    netns: str | None = None
    passfd_port: int = 0  # vsock port of the passfd listener; 0 = off
    oom_poll_interval: float = 0.5
    extra: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def runtime_failure_as(error: type[ttrpc.TtrpcError]) -> Iterator[None]:
    """The OCI runtime's failure (RuntimeFailed) becomes the ttrpc `error` the caller gets, same message."""
    try:
        yield
    except RuntimeFailed as err:
        raise error(str(err)) from err


def _check_id(kind: str, value: str) -> str:
    if not _ID.match(value):
        raise ttrpc.InvalidArgument(f"bad {kind} {value!r}")
    return value


class AgentService:
    """Implementation of grpc.AgentService; rpcs it lacks answer Unimplemented through ttrpc."""

    def __init__(self, config: AgentConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self.runtime = OciRuntime(config.runtime, config.runtime_root)
        self.containers: dict[str, Container] = {}
        self.sandbox_id = ""
        self.sandbox_storages: list[MountedStorage] = []
        self.pod_namespaces: PodNamespaces | None = None
        self._nursery = nursery
        self._lock = trio.Lock()
        self._oom_send, self._oom_recv = trio.open_memory_channel[str](64)
        self.netlink = Netlink(config.netns)
        self.passfd = PassfdStreams()
        os.makedirs(config.run_dir, exist_ok=True)

    def container(self, container_id: str) -> Container:
        """The container, or NotFound."""
        found = self.containers.get(container_id)
        if found is None:
            raise ttrpc.NotFound(f"container {container_id!r} not found")
        return found

    # -- sandbox ----------------------------------------------------------------------------------
    async def CreateSandbox(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        if self.sandbox_id:
            raise ttrpc.AlreadyExists(f"sandbox {self.sandbox_id} already exists")
        mounted: list[MountedStorage] = []
        steps = Steps()
        try:
            for storage in req.storages:
                mounted.append(mount_storage(storage))
            steps.mark("storages")
            for module in req.kernel_modules:
                await _modprobe(module.name, list(module.parameters))
            steps.mark("modules")
            if req.dns:
                _guest.write_resolv_conf(list(req.dns))
            # The hostname goes into the pod's UTS namespace only: the guest's own stays as it is.
            try:
                pod_ns = PodNamespaces.create(
                    os.path.join(self.config.run_dir, "sandbox", "ns"),
                    req.hostname,
                    share_pid=bool(req.sandbox_pidns),
                )
            except OSError as err:
                if err.errno == errno.EINVAL:
                    raise ttrpc.InvalidArgument(str(err)) from err
                raise
            steps.mark("namespaces")
        except BaseException:
            release_storages(mounted)
            raise
        self.sandbox_storages = mounted
        self.pod_namespaces = pod_ns
        self.sandbox_id = req.sandbox_id or "sandbox"
        log.info("sandbox created", extra={"sandbox": self.sandbox_id})
        log.debug("sandbox %s: created, %s", self.sandbox_id, steps)
        return empty_pb2.Empty()

    async def DestroySandbox(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        for container in list(self.containers.values()):
            await container.destroy()
            self.containers.pop(container.id, None)
        release_storages(self.sandbox_storages)
        if self.pod_namespaces is not None:
            self.pod_namespaces.release()
            self.pod_namespaces = None
        self.sandbox_id = ""
        return empty_pb2.Empty()

    # -- containers -------------------------------------------------------------------------------
    async def CreateContainer(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        cid = _check_id("container id", req.container_id)
        if cid in self.containers:
            raise ttrpc.AlreadyExists(f"container {cid!r} already exists")
        steps = Steps()
        config = spec_to_config(req.OCI, cid)
        if self.pod_namespaces is not None:
            self.pod_namespaces.apply(config, share_pid=bool(req.sandbox_pidns))
        steps.mark("spec")
        await wait_for_devices(list(req.devices))
        await wait_for_storages(list(req.storages))
        add_devices(config, list(req.devices))
        steps.mark("devices")
        if not _guest.is_dir(config["root"]["path"]) and not req.storages:
            raise ttrpc.InvalidArgument(f"OCI root.path {config['root']['path']!r} is not a directory")
        terminal = bool(config["process"].get("terminal"))
        passfd = await PassfdStdio.take(
            self.passfd, req.stdin_port, req.stdout_port, req.stderr_port, terminal=terminal
        )
        steps.mark("stdio")
        with closed_on_error(passfd):
            await self._create_container(cid, config, req.storages, passfd, steps)
        log.debug("container %s: created, %s", cid, steps)
        return empty_pb2.Empty()

    async def _create_container(
        self, cid: str, config: dict[str, Any], storages: Any, passfd: PassfdStdio | None, steps: Steps
    ) -> None:
        bundle = os.path.join(self.config.run_dir, cid)
        os.makedirs(bundle, exist_ok=False)
        container = Container(cid, bundle, self.runtime, self._nursery)
        self.containers[cid] = container
        try:
            for storage in storages:
                container.storages.append(mount_storage(storage))
            if not _guest.is_dir(config["root"]["path"]):
                raise ttrpc.InvalidArgument(f"OCI root.path {config['root']['path']!r} is not a directory")
            steps.mark("storages")
            await container.create(config, passfd)
            steps.mark("runtime-create")
            if self.pod_namespaces is not None and container.init is not None:
                self.pod_namespaces.container_created(container.init.pid)
        except BaseException as err:
            with trio.CancelScope(shield=True):
                await container.destroy()
            self.containers.pop(cid, None)
            if isinstance(err, RuntimeFailed):
                raise ttrpc.InvalidArgument(str(err)) from err
            raise
        self._nursery.start_soon(self._watch_oom, container)
        log.info("container created", extra={"container": cid})

    async def StartContainer(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        container = self.container(req.container_id)
        with runtime_failure_as(ttrpc.FailedPrecondition):
            await container.start()
        return empty_pb2.Empty()

    async def RemoveContainer(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        container = self.container(req.container_id)
        del self.containers[container.id]
        with trio.CancelScope(shield=True):
            await container.destroy(grace=float(req.timeout or 10))
        return empty_pb2.Empty()

    async def ExecProcess(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        container = self.container(req.container_id)
        _check_id("exec id", req.exec_id)
        process = process_to_json(req.process)
        passfd = await PassfdStdio.take(
            self.passfd,
            req.stdin_port,
            req.stdout_port,
            req.stderr_port,
            terminal=bool(process.get("terminal")),
        )
        with runtime_failure_as(ttrpc.InvalidArgument), closed_on_error(passfd):
            await container.exec(req.exec_id, process, passfd)
        return empty_pb2.Empty()

    async def SignalProcess(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        container = self.container(req.container_id)
        process = container.process(req.exec_id)
        if container.status == "paused" and req.signal == signal.SIGKILL:
            process.signal(req.signal)
            await container.resume()
            return empty_pb2.Empty()
        process.signal(req.signal)
        return empty_pb2.Empty()

    async def WaitProcess(self, req: Any, ctx: Any) -> agent_pb2.WaitProcessResponse:
        container = self.container(req.container_id)
        status = await container.process(req.exec_id).wait()
        if not req.exec_id:
            container.status = "stopped"
        container.forget_if_finished(req.exec_id)
        return agent_pb2.WaitProcessResponse(status=status)

    async def _read(self, req: Any, which: int) -> agent_pb2.ReadStreamResponse:
        container = self.container(req.container_id)
        data = await container.process(req.exec_id).read(which, req.len)
        if not data:
            container.forget_if_finished(req.exec_id)
        return agent_pb2.ReadStreamResponse(data=data)

    async def ReadStdout(self, req: Any, ctx: Any) -> agent_pb2.ReadStreamResponse:
        return await self._read(req, 1)

    async def ReadStderr(self, req: Any, ctx: Any) -> agent_pb2.ReadStreamResponse:
        return await self._read(req, 2)

    async def WriteStdin(self, req: Any, ctx: Any) -> agent_pb2.WriteStreamResponse:
        process = self.container(req.container_id).process(req.exec_id)
        return agent_pb2.WriteStreamResponse(len=await process.write_stdin(req.data))

    async def CloseStdin(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        await self.container(req.container_id).process(req.exec_id).close_stdin()
        return empty_pb2.Empty()

    async def TtyWinResize(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        self.container(req.container_id).process(req.exec_id).resize(req.row, req.column)
        return empty_pb2.Empty()

    async def UpdateContainer(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        container = self.container(req.container_id)
        with runtime_failure_as(ttrpc.InvalidArgument):
            await container.update(message_to_json(req.resources))
        return empty_pb2.Empty()

    async def StatsContainer(self, req: Any, ctx: Any) -> agent_pb2.StatsContainerResponse:
        container = self.container(req.container_id)
        resp = agent_pb2.StatsContainerResponse()
        _cgroups.fill_stats(container.cgroups, resp.cgroup_stats)
        return resp

    async def PauseContainer(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        container = self.container(req.container_id)
        with runtime_failure_as(ttrpc.FailedPrecondition):
            await container.pause()
        return empty_pb2.Empty()

    async def ResumeContainer(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        container = self.container(req.container_id)
        with runtime_failure_as(ttrpc.FailedPrecondition):
            await container.resume()
        return empty_pb2.Empty()

    # -- OOM ----------------------------------------------------------------------------------
    async def _watch_oom(self, container: Container) -> None:
        # Poll the cgroup's oom_kill counter (the same for cgroup v1 and v2), and look once
        # more the moment the init exits: an OOM-killed init must still produce its event
        # before RemoveContainer deletes the cgroup.
        seen = _cgroups.oom_kills(container.cgroups)
        init = container.init
        while self.containers.get(container.id) is container:
            exited = init is None or init.exited
            if not exited:
                assert init is not None
                with trio.move_on_after(self.config.oom_poll_interval):
                    await init.wait_exited()
            now = _cgroups.oom_kills(container.cgroups)
            if now > seen:
                seen = now
                log.info("oom kill", extra={"container": container.id})
                with contextlib.suppress(trio.WouldBlock):
                    self._oom_send.send_nowait(container.id)
            if exited:
                return

    async def GetOOMEvent(self, req: Any, ctx: Any) -> agent_pb2.OOMEvent:
        return agent_pb2.OOMEvent(container_id=await self._oom_recv.receive())

    # -- network ----------------------------------------------------------------------------------
    async def UpdateInterface(self, req: Any, ctx: Any) -> Any:
        return self.netlink.update_interface(req.interface)

    async def ListInterfaces(self, req: Any, ctx: Any) -> agent_pb2.Interfaces:
        return agent_pb2.Interfaces(Interfaces=self.netlink.list_interfaces())

    async def UpdateRoutes(self, req: Any, ctx: Any) -> agent_pb2.Routes:
        return agent_pb2.Routes(Routes=self.netlink.update_routes(list(req.routes.Routes)))

    async def ListRoutes(self, req: Any, ctx: Any) -> agent_pb2.Routes:
        return agent_pb2.Routes(Routes=self.netlink.list_routes())

    async def AddARPNeighbors(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        self.netlink.add_arp_neighbors(list(req.neighbors.ARPNeighbors))
        return empty_pb2.Empty()

    # -- guest ------------------------------------------------------------------------------------
    async def OnlineCPUMem(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        """Bring ``nb_cpus`` CPUs online (the VM's count after a hot-add, as upstream's agent takes it),
        waiting for CPUs the guest kernel has not registered yet (QEMU's ACPI hot-plug: device_add returns
        before the guest handles the event), then memory unless ``cpu_only``."""
        online = _guest.online_cpus(req.nb_cpus)
        with trio.move_on_after(ONLINE_CPU_TIMEOUT):
            while online < req.nb_cpus:
                await trio.sleep(ONLINE_CPU_RETRY)
                online = _guest.online_cpus(req.nb_cpus)
        if online < req.nb_cpus:
            raise ttrpc.DeadlineExceeded(
                f"online {req.nb_cpus} CPU(s): {online} online after {ONLINE_CPU_TIMEOUT:g} s"
            )
        if not req.cpu_only:
            _guest.online_memory()
        return empty_pb2.Empty()

    async def GetGuestDetails(self, req: Any, ctx: Any) -> agent_pb2.GuestDetailsResponse:
        resp = agent_pb2.GuestDetailsResponse()
        if req.mem_block_size:
            resp.mem_block_size_bytes = _guest.memory_block_size()
        resp.support_mem_hotplug_probe = _guest.has_memory_probe()
        details = resp.agent_details
        details.version = __version__
        details.init_daemon = os.getpid() == 1
        details.storage_handlers.extend(STORAGE_DRIVERS)
        return resp

    async def SetGuestDateTime(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        _guest.set_realtime(req.Sec, req.Usec)
        return empty_pb2.Empty()

    async def ReseedRandomDev(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        _guest.reseed_random(bytes(req.data))
        return empty_pb2.Empty()

    async def CopyFile(self, req: Any, ctx: Any) -> empty_pb2.Empty:
        _guest.copy_file(self.config.run_dir, req)
        return empty_pb2.Empty()

    async def GetMetrics(self, req: Any, ctx: Any) -> agent_pb2.Metrics:
        lines = [
            "# HELP kata_agent_process_resident_memory_bytes Resident memory of the agent.",
            "# TYPE kata_agent_process_resident_memory_bytes gauge",
            f"kata_agent_process_resident_memory_bytes {_guest.rss_bytes()}",
            "# HELP kata_agent_containers Containers the agent holds.",
            "# TYPE kata_agent_containers gauge",
            f"kata_agent_containers {len(self.containers)}",
        ]
        return agent_pb2.Metrics(metrics="\n".join(lines) + "\n")

    async def close(self) -> None:
        """Destroy every container and the sandbox storages (agent shutdown)."""
        with trio.CancelScope(shield=True):
            await self.DestroySandbox(None, None)
        self.passfd.close()


async def _modprobe(name: str, parameters: list[str]) -> None:
    if not _ID.match(name):
        raise ttrpc.InvalidArgument(f"bad kernel module name {name!r}")
    result = await trio.run_process(["modprobe", name, *parameters], capture_stderr=True, check=False)
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        raise ttrpc.InvalidArgument(f"modprobe {name}: {message or result.returncode}")


class HealthService:
    """grpc.Health: Check answers SERVING while the agent runs; Version names the agent."""

    async def Check(self, req: Any, ctx: Any) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Version(self, req: Any, ctx: Any) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(grpc_version="ttrpc", agent_version=__version__)
