"""AgentClient: every agent rpc the runtime uses, typed, with upstream's timeouts."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

import trio
from google.protobuf import empty_pb2

from kata_agent_client import _convert as cv
from kata_agent_client._budget import GUEST_WALL_CAP, guest_timed
from kata_agent_client._connect import AgentAddress, connect
from kata_agent_client._errors import (
    AgentConnectionLost,
    AgentDeadlineExceeded,
    AgentDisconnected,
    AgentError,
    AgentTimeout,
    BadSpec,
    agent_error,
)
from kata_agent_client._types import (
    AgentVersion,
    ContainerSpec,
    ContainerStats,
    Device,
    GuestDetails,
    Process,
    Resources,
    StdioPorts,
    Storage,
)
from kata_proto import ttrpc
from kata_proto.agent import OciJsonError, agent_pb2, health_pb2, oci_from_json
from kata_proto.network import ARPNeighbor, Interface, Route

AGENT = "grpc.AgentService"
HEALTH = "grpc.Health"
#: Upstream runtime-rs's default per-call timeout.
DEFAULT_TIMEOUT = 30.0
#: Long-polling calls have no timeout (upstream sets none for these).
NO_TIMEOUT = {"WaitProcess", "ReadStdout", "ReadStderr", "WriteStdin", "GetOOMEvent"}
#: Read size asked for by ReadStdout/ReadStderr.
READ_CHUNK = 64 * 1024

T = TypeVar("T")


class AgentClient:
    """A connected agent; make one with `open_agent_client`."""

    def __init__(
        self,
        ttrpc_client: ttrpc.TtrpcClient | None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] | None = None,
        wall_cap: float = GUEST_WALL_CAP,
    ) -> None:
        self._client = ttrpc_client
        self.timeout = timeout
        self.clock = clock
        """Seconds on the guest's clock (one that stands still while the VM waits for a host CPU), or None:
        each call's `timeout` is then counted on it, within `wall_cap` timeouts of wall time."""
        self.wall_cap = wall_cap
        self.generation = 0 if ttrpc_client is None else 1
        """How many connections the client has had (reconnects add one each)."""
        self.lost: str | None = None
        """Why the agent is gone for good (set once; every later call fails), None while it is reachable."""
        self.closing = False
        self._changed = trio.Event()

    # -- the connection -------------------------------------------------------------------------
    def _attach(self, raw: ttrpc.TtrpcClient) -> None:
        self._client = raw
        self.generation += 1
        self._changed.set()
        self._changed = trio.Event()

    def _lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason or "connection lost"
        self._changed.set()

    async def wait_lost(self) -> str:
        """Wait until the agent is gone for good (no reconnect, or the reconnect budget ran out)."""
        while self.lost is None:
            await self._changed.wait()
        return self.lost

    async def wait_reconnected(self, generation: int) -> bool:
        """After a call on connection `generation` failed: True once a newer connection is up, False
        when the agent is lost instead."""
        while self.generation <= generation and self.lost is None:
            await self._changed.wait()
        return self.generation > generation

    async def within(self, budget: float, call: Callable[[], Awaitable[T]]) -> T:
        """`await call()` within `budget` seconds: of the guest's time with a `clock` (`guest_timed`, within
        `wall_cap` budgets of wall time), else of wall time; `trio.TooSlowError` when it runs out."""
        return await guest_timed(self.clock, budget, call, wall_cap=self.wall_cap)

    async def _call(self, method: str, request: Any, response_type: type[Any], service: str = AGENT) -> Any:
        timeout = None if method in NO_TIMEOUT else self.timeout
        if self.lost is not None:
            raise AgentConnectionLost(f"{method}: agent connection lost: {self.lost}")
        raw = self._client
        if raw is None or self.closing:
            raise AgentDisconnected(f"{method}: the agent client is closed")
        if raw.broken is not None:  # between a lost connection and the next (or the verdict)
            raise AgentDisconnected(f"{method}: agent connection: {raw.broken}")
        try:
            if timeout is None or self.clock is None:
                return await raw.call(service, method, request, response_type, timeout=timeout)

            async def call() -> Any:
                return await raw.call(service, method, request, response_type)  # the cap is its deadline

            return await guest_timed(self.clock, timeout, call, wall_cap=self.wall_cap)
        except trio.TooSlowError as err:
            raise AgentDeadlineExceeded(method, ttrpc.Code.DEADLINE_EXCEEDED, f"no response {err}") from err
        except Exception as err:
            mapped = agent_error(err, method)
            if mapped is None:
                raise
            raise mapped from err

    # -- health -----------------------------------------------------------------------------------
    async def check(self) -> bool:
        """Health.Check: True when the agent answers SERVING."""
        resp = await self._call("Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse, HEALTH)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    async def version(self) -> AgentVersion:
        """Health.Version."""
        resp = await self._call("Version", health_pb2.CheckRequest(), health_pb2.VersionCheckResponse, HEALTH)
        return AgentVersion(resp.grpc_version, resp.agent_version)

    # -- sandbox ----------------------------------------------------------------------------------
    async def create_sandbox(
        self,
        sandbox_id: str,
        *,
        hostname: str = "",
        dns: list[str] | None = None,
        storages: list[Storage] | None = None,
        sandbox_pidns: bool = False,
        kernel_modules: list[tuple[str, list[str]]] | None = None,
    ) -> None:
        """CreateSandbox; `kernel_modules` are (name, parameters) pairs the agent modprobes."""
        req = agent_pb2.CreateSandboxRequest(
            hostname=hostname,
            dns=dns or [],
            storages=[cv.storage_pb(s) for s in storages or []],
            sandbox_pidns=sandbox_pidns,
            sandbox_id=sandbox_id,
            kernel_modules=[agent_pb2.KernelModule(name=n, parameters=p) for n, p in kernel_modules or []],
        )
        await self._call("CreateSandbox", req, empty_pb2.Empty)

    async def destroy_sandbox(self) -> None:
        """DestroySandbox: every container is killed and removed."""
        await self._call("DestroySandbox", agent_pb2.DestroySandboxRequest(), empty_pb2.Empty)

    # -- containers -------------------------------------------------------------------------------
    async def create_container(
        self,
        container_id: str,
        spec: ContainerSpec | Mapping[str, Any],
        *,
        storages: list[Storage] | None = None,
        devices: list[Device] | None = None,
        stdio_ports: StdioPorts | None = None,
        sandbox_pidns: bool = False,
    ) -> None:
        """CreateContainer (the init process is created, not started).

        `sandbox_pidns`: the container joins the sandbox's PID namespace (CRI's shareProcessNamespace).

        `spec`: a `ContainerSpec`, or a whole OCI config.json (as a runtime has it; BadSpec if a value does
        not fit oci.proto).

        `stdio_ports`: the passfd streams (their host ports) that carry the init's stdio.
        """
        req = agent_pb2.CreateContainerRequest(
            container_id=container_id,
            storages=[cv.storage_pb(s) for s in storages or []],
            devices=[
                agent_pb2.Device(
                    id=d.id,
                    type=d.type,
                    vm_path=d.vm_path,
                    container_path=d.container_path,
                    options=d.options,
                )
                for d in devices or []
            ],
        )
        (stdio_ports or StdioPorts()).set_on(req)
        req.sandbox_pidns = sandbox_pidns
        if isinstance(spec, ContainerSpec):
            req.OCI.CopyFrom(cv.spec_pb(spec))
        else:
            _from_json(spec, req.OCI)
        await self._call("CreateContainer", req, empty_pb2.Empty)

    async def start_container(self, container_id: str) -> None:
        """StartContainer."""
        await self._call(
            "StartContainer", agent_pb2.StartContainerRequest(container_id=container_id), empty_pb2.Empty
        )

    async def remove_container(self, container_id: str, grace: int = 0) -> None:
        """RemoveContainer: kill what still runs, unmount its storages, drop the bundle.

        `grace` is how many seconds the agent waits for the processes to go (0: its default).
        """
        req = agent_pb2.RemoveContainerRequest(container_id=container_id, timeout=grace)
        await self._call("RemoveContainer", req, empty_pb2.Empty)

    async def exec_process(
        self,
        container_id: str,
        exec_id: str,
        process: Process | Mapping[str, Any],
        *,
        stdio_ports: StdioPorts | None = None,
    ) -> None:
        """ExecProcess: start another process in a running container (stdio through passfd ports).

        `process`: a `Process`, or an OCI process object (Task.Exec's spec)."""
        req = agent_pb2.ExecProcessRequest(container_id=container_id, exec_id=exec_id)
        (stdio_ports or StdioPorts()).set_on(req)
        if isinstance(process, Process):
            req.process.CopyFrom(cv.process_pb(process))
        else:
            if not process.get("args"):
                raise BadSpec("OCI process has no args")
            _from_json(process, req.process, "process")
        await self._call("ExecProcess", req, empty_pb2.Empty)

    async def signal_process(self, container_id: str, exec_id: str, signal: int) -> None:
        """SignalProcess (empty exec_id: the container's init)."""
        req = agent_pb2.SignalProcessRequest(container_id=container_id, exec_id=exec_id, signal=int(signal))
        await self._call("SignalProcess", req, empty_pb2.Empty)

    async def wait_process(self, container_id: str, exec_id: str = "") -> int:
        """WaitProcess: the exit status (128+N after signal N); no timeout."""
        req = agent_pb2.WaitProcessRequest(container_id=container_id, exec_id=exec_id)
        resp = await self._call("WaitProcess", req, agent_pb2.WaitProcessResponse)
        return int(resp.status)

    async def read_stdout(self, container_id: str, exec_id: str = "", length: int = READ_CHUNK) -> bytes:
        """ReadStdout long-poll: some bytes, or b"" at EOF."""
        req = agent_pb2.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=length)
        return bytes((await self._call("ReadStdout", req, agent_pb2.ReadStreamResponse)).data)

    async def read_stderr(self, container_id: str, exec_id: str = "", length: int = READ_CHUNK) -> bytes:
        """ReadStderr long-poll: some bytes, or b"" at EOF."""
        req = agent_pb2.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=length)
        return bytes((await self._call("ReadStderr", req, agent_pb2.ReadStreamResponse)).data)

    async def read_all(self, container_id: str, exec_id: str = "", *, stderr: bool = False) -> bytes:
        """Read a stream until EOF."""
        read = self.read_stderr if stderr else self.read_stdout
        chunks = []
        while chunk := await read(container_id, exec_id):
            chunks.append(chunk)
        return b"".join(chunks)

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        """WriteStdin; empty data closes stdin."""
        req = agent_pb2.WriteStreamRequest(container_id=container_id, exec_id=exec_id, data=data)
        return int((await self._call("WriteStdin", req, agent_pb2.WriteStreamResponse)).len)

    async def close_stdin(self, container_id: str, exec_id: str = "") -> None:
        """CloseStdin."""
        req = agent_pb2.CloseStdinRequest(container_id=container_id, exec_id=exec_id)
        await self._call("CloseStdin", req, empty_pb2.Empty)

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int, columns: int) -> None:
        """TtyWinResize."""
        req = agent_pb2.TtyWinResizeRequest(
            container_id=container_id, exec_id=exec_id, row=rows, column=columns
        )
        await self._call("TtyWinResize", req, empty_pb2.Empty)

    async def update_container(self, container_id: str, resources: Resources | Mapping[str, Any]) -> None:
        """UpdateContainer with `Resources` or OCI LinuxResources JSON (Task.Update's)."""
        req = agent_pb2.UpdateContainerRequest(container_id=container_id)
        if isinstance(resources, Resources):
            req.resources.CopyFrom(cv.resources_pb(resources))
        else:
            _from_json(resources, req.resources, "resources")
        await self._call("UpdateContainer", req, empty_pb2.Empty)

    async def stats_container(self, container_id: str) -> ContainerStats:
        """StatsContainer."""
        req = agent_pb2.StatsContainerRequest(container_id=container_id)
        return cv.stats_from_pb(await self._call("StatsContainer", req, agent_pb2.StatsContainerResponse))

    async def pause_container(self, container_id: str) -> None:
        """PauseContainer."""
        await self._call(
            "PauseContainer", agent_pb2.PauseContainerRequest(container_id=container_id), empty_pb2.Empty
        )

    async def resume_container(self, container_id: str) -> None:
        """ResumeContainer."""
        req = agent_pb2.ResumeContainerRequest(container_id=container_id)
        await self._call("ResumeContainer", req, empty_pb2.Empty)

    async def get_oom_event(self) -> str:
        """GetOOMEvent long-poll: the id of the next container the OOM killer hit."""
        return str(
            (await self._call("GetOOMEvent", agent_pb2.GetOOMEventRequest(), agent_pb2.OOMEvent)).container_id
        )

    # -- network ----------------------------------------------------------------------------------
    async def update_interface(self, interface: Interface) -> Interface:
        """UpdateInterface: the NIC as the guest now has it."""
        from kata_proto.agent import types_pb2

        req = agent_pb2.UpdateInterfaceRequest()
        req.interface.CopyFrom(cv.interface_pb(interface))
        return cv.interface_from_pb(await self._call("UpdateInterface", req, types_pb2.Interface))

    async def list_interfaces(self) -> list[Interface]:
        """ListInterfaces."""
        resp = await self._call("ListInterfaces", agent_pb2.ListInterfacesRequest(), agent_pb2.Interfaces)
        return [cv.interface_from_pb(i) for i in resp.Interfaces]

    async def update_routes(self, routes: list[Route]) -> list[Route]:
        """UpdateRoutes: the routes as the guest now has them."""
        req = agent_pb2.UpdateRoutesRequest()
        req.routes.Routes.extend(cv.route_pb(r) for r in routes)
        resp = await self._call("UpdateRoutes", req, agent_pb2.Routes)
        return [cv.route_from_pb(r) for r in resp.Routes]

    async def list_routes(self) -> list[Route]:
        """ListRoutes."""
        resp = await self._call("ListRoutes", agent_pb2.ListRoutesRequest(), agent_pb2.Routes)
        return [cv.route_from_pb(r) for r in resp.Routes]

    async def add_arp_neighbors(self, neighbors: list[ARPNeighbor]) -> None:
        """AddARPNeighbors."""
        req = agent_pb2.AddARPNeighborsRequest()
        req.neighbors.ARPNeighbors.extend(cv.neighbor_pb(n) for n in neighbors)
        await self._call("AddARPNeighbors", req, empty_pb2.Empty)

    # -- guest ------------------------------------------------------------------------------------
    async def online_cpu_mem(self, nb_cpus: int = 0, *, cpu_only: bool = False, wait: bool = False) -> None:
        """OnlineCPUMem."""
        req = agent_pb2.OnlineCPUMemRequest(wait=wait, nb_cpus=nb_cpus, cpu_only=cpu_only)
        await self._call("OnlineCPUMem", req, empty_pb2.Empty)

    async def get_guest_details(self) -> GuestDetails:
        """GetGuestDetails."""
        req = agent_pb2.GuestDetailsRequest(mem_block_size=True, mem_hotplug_probe=True)
        resp = await self._call("GetGuestDetails", req, agent_pb2.GuestDetailsResponse)
        d = resp.agent_details
        return GuestDetails(
            resp.mem_block_size_bytes,
            resp.support_mem_hotplug_probe,
            d.version,
            d.init_daemon,
            list(d.storage_handlers),
        )

    async def set_guest_date_time(self, seconds: float) -> None:
        """SetGuestDateTime: the guest's CLOCK_REALTIME to `seconds` after the epoch (`time.time()`)."""
        sec = math.floor(seconds)
        req = agent_pb2.SetGuestDateTimeRequest(Sec=sec, Usec=min(int((seconds - sec) * 1e6), 999_999))
        await self._call("SetGuestDateTime", req, empty_pb2.Empty)

    async def reseed_random_dev(self, data: bytes) -> None:
        """ReseedRandomDev: the guest kernel mixes `data` into its entropy pool and reseeds its CRNG (a clone
        of a VM template is given fresh bytes so it does not share its siblings' random state)."""
        await self._call("ReseedRandomDev", agent_pb2.ReseedRandomDevRequest(data=data), empty_pb2.Empty)

    async def copy_file(
        self,
        path: str,
        data: bytes,
        *,
        file_mode: int = 0o644,
        dir_mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
    ) -> None:
        """CopyFile, in chunks that fit a ttrpc frame."""
        chunk = 2 << 20
        offsets = range(0, max(len(data), 1), chunk)
        for offset in offsets:
            req = agent_pb2.CopyFileRequest(
                path=path,
                file_size=len(data),
                file_mode=file_mode,
                dir_mode=dir_mode,
                uid=uid,
                gid=gid,
                offset=offset,
                data=data[offset : offset + chunk],
            )
            await self._call("CopyFile", req, empty_pb2.Empty)

    async def get_metrics(self) -> str:
        """GetMetrics: Prometheus text."""
        return str((await self._call("GetMetrics", agent_pb2.GetMetricsRequest(), agent_pb2.Metrics)).metrics)

    async def call(self, method: str, request: Any, response_type: type[Any]) -> Any:
        """Any other grpc.AgentService rpc, with protobuf in and out (escape hatch)."""
        return await self._call(method, request, response_type)


def _from_json(data: Mapping[str, Any], msg: Any, where: str = "") -> None:
    try:
        oci_from_json(data, msg, where)
    except OciJsonError as err:
        raise BadSpec(str(err)) from err


async def _try_connect(
    addr: AgentAddress, stack: AsyncExitStack, call_timeout: float, deadline: float
) -> ttrpc.TtrpcClient | None:
    # Each deadline scope closes before the ttrpc client's nursery does (trio's nesting rule).
    with trio.fail_at(deadline):
        stream = await connect(addr)
    raw = await stack.enter_async_context(ttrpc.open_ttrpc_client(stream))
    with trio.fail_at(deadline):
        return raw if await AgentClient(raw, timeout=call_timeout).check() else None


class _Link:
    """Owns the agent's ttrpc connection for the client's whole life, in one task (`run`).

    The first dial has `ready_timeout`; when an established connection breaks and `reconnect_timeout`
    is positive, the link dials again within that budget and hands the new connection to the client
    (its `generation` goes up); otherwise, or when the budget runs out, the client is `lost`.
    """

    def __init__(
        self,
        addr: AgentAddress,
        label: str,
        client: AgentClient,
        *,
        ready_timeout: float,
        reconnect_timeout: float,
        retry_interval: float,
        call_timeout: float,
    ) -> None:
        self.addr = addr
        self.label = label
        self.client = client
        self.ready_timeout = ready_timeout
        self.reconnect_timeout = reconnect_timeout
        self.retry_interval = retry_interval
        self.call_timeout = call_timeout

    async def _dial(self, stack: AsyncExitStack, budget: float) -> ttrpc.TtrpcClient:
        deadline = trio.current_time() + budget
        last: BaseException | None = None
        while True:
            attempt = AsyncExitStack()
            raw: ttrpc.TtrpcClient | None = None
            try:
                raw = await _try_connect(self.addr, attempt, self.call_timeout, deadline)
            except trio.TooSlowError as err:
                await attempt.aclose()
                raise AgentTimeout(f"agent at {self.label} not ready within {budget} s: {last}") from err
            except (OSError, ttrpc.TtrpcError, trio.BrokenResourceError, AgentError) as err:
                last = err
            if raw is not None:
                stack.push_async_exit(attempt)
                return raw
            await attempt.aclose()
            if trio.current_time() + self.retry_interval >= deadline:
                raise AgentTimeout(f"agent at {self.label} not ready within {budget} s: {last}")
            await trio.sleep(self.retry_interval)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        budget = self.ready_timeout
        while True:
            async with AsyncExitStack() as stack:
                try:
                    raw = await self._dial(stack, budget)
                except AgentTimeout as err:
                    if not self.client.generation:
                        raise  # the first dial: open_agent_client raises it
                    self.client._lose(f"reconnect failed: {err}")
                    return
                first = not self.client.generation
                self.client._attach(raw)
                if first:
                    task_status.started()
                reason = await raw.wait_broken()
            if self.reconnect_timeout <= 0 or self.client.closing:
                self.client._lose(reason)
                return
            budget = self.reconnect_timeout


@asynccontextmanager
async def open_agent_client(
    address: str | AgentAddress,
    *,
    ready_timeout: float = 30.0,
    retry_interval: float = 0.05,
    call_timeout: float = DEFAULT_TIMEOUT,
    reconnect_timeout: float = 0.0,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[AgentClient]:
    """Connect to the agent, retrying until Health.Check says SERVING or `ready_timeout` passes.

    Every connection error (nothing listening yet, the hybrid vsock muxer closing because the
    guest port is not open) is retried; AgentTimeout when the deadline passes. `call_timeout`
    is the per-call timeout (upstream's 30 s; long polls have none). When the connection breaks
    later, calls in flight fail (`AgentDisconnected`); with `reconnect_timeout` > 0 the client
    dials again within that many seconds (`generation` counts connections, `wait_reconnected`),
    otherwise or after that the client is `lost` (`wait_lost`). With `clock` (seconds the guest could run,
    e.g. kata-sys-util's `GuestClock.now`), each call's `call_timeout` is guest time, within GUEST_WALL_CAP
    timeouts of wall time: a busy host slows a call down without failing it.
    """
    addr = AgentAddress.parse(address) if isinstance(address, str) else address
    client = AgentClient(None, timeout=call_timeout, clock=clock)
    link = _Link(
        addr,
        str(address) if isinstance(address, str) else f"{addr.kind}:{addr.path or addr.cid}:{addr.port}",
        client,
        ready_timeout=ready_timeout,
        reconnect_timeout=reconnect_timeout,
        retry_interval=retry_interval,
        call_timeout=call_timeout,
    )
    raised: list[BaseException] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            try:
                yield client
            except BaseException as exc:
                raised.append(exc)
                raise
            finally:
                client.closing = True
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nurseries wrap what the caller's block (or the first dial) raised: hand it back bare.
        leaves = _leaves(group)
        if raised and leaves == raised:
            raise raised[0] from None
        if len(leaves) == 1 and isinstance(leaves[0], AgentTimeout):
            raise leaves[0] from None
        raise


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for exc in group.exceptions for leaf in _leaves(exc)]
    return [group]
