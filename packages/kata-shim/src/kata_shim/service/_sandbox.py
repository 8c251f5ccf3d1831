"""containerd.runtime.sandbox.v1.Sandbox: the Sandbox API containerd 2.x calls with ``sandboxer = "shim"``.

containerd's shim sandbox controller starts this shim for the pod (id = sandbox id), then calls
CreateSandbox -> StartSandbox -> WaitSandbox (a long-poll), SandboxStatus and Platform and SandboxMetrics
while the pod lives, StopSandbox on StopPodSandbox and ShutdownSandbox on RemovePodSandbox (or when a
Create or Start failed); the pod's containers come through the Task service on the same socket.

CreateSandbox builds the instance through the `RuntimeHandlerManager` and StartSandbox boots it through
the same `Sandbox.start` the Task service's first Create uses; the sandbox's `ContainerConfig` is made
from the request here (`sandbox_container_config`). StopSandbox stops the containers (SIGTERM, then
``timeout_secs``), the VM and its host resources; ShutdownSandbox also lets the shim exit. A VM that dies by
itself ends WaitSandbox with exit status 255. The pod's lifecycle then belongs to this API: the Task
service's Shutdown no longer ends the shim.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import platform
import signal
from pathlib import Path
from typing import Any

import trio
from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError, Message

from kata_proto import ttrpc
from kata_proto.containerd import cgroups_v1_metrics_pb2, metrics_pb2, pack_event, platform_pb2, sandbox_pb2
from kata_proto.cri import POD_SANDBOX_CONFIG_TYPE, cri_pb2
from kata_resources import CONTAINER_TYPE, SANDBOX_CPU_PERIOD, SANDBOX_CPU_QUOTA, SANDBOX_MEMORY
from kata_shim.message import MessageDispatcher
from kata_shim.runtime._base import (
    ContainerConfig,
    ExitStatus,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ProcessId,
    RootfsMount,
    RuntimeHandlerError,
    RuntimeInstance,
    Stdio,
)
from kata_shim.service._errors import status_for
from kata_shim.service._task import decode_options, load_bundle_spec

log = logging.getLogger("kata_shim.sandbox")

#: SandboxStatusResponse.state: the names of CRI's PodSandboxState, which containerd's CRI maps them to.
STATE_READY = "SANDBOX_READY"
STATE_NOTREADY = "SANDBOX_NOTREADY"
#: WaitSandbox's exit status when the VM died by itself (the status its processes end with too).
DEAD_EXIT_STATUS = 255
#: containerd's CRI annotation naming a container's sandbox (set on the sandbox's own config too).
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
# Go's GOARCH for the machines a KVM guest here runs as (the guest has the host's architecture).
_GOARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _stamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _cgroups_path(parent: str, sandbox_id: str) -> str:
    """The sandbox's ``cgroupsPath`` below the pod's cgroup parent, laid out as containerd's CRI lays out its
    sandbox container's (cgroupfs ``parent/id``; systemd ``parent.slice:cri-containerd:id``)."""
    if parent.endswith(".slice") and "/" not in parent:
        return f"{parent}:cri-containerd:{sandbox_id}"
    return f"{parent.rstrip('/')}/{sandbox_id}"


def sandbox_container_config(req: sandbox_pb2.CreateSandboxRequest) -> ContainerConfig:
    """The sandbox's `ContainerConfig` (what `Sandbox.start` reads) from a CreateSandboxRequest.

    The spec is the bundle's config.json when containerd wrote one (a sandbox created with a spec), else
    made from the request: the pod's CRI `PodSandboxConfig` in ``options`` gives the hostname, the
    annotations (Kata's ``io.katacontainers.*`` ones go through ``enable_annotations`` as on the Task path),
    the cgroup parent, the DNS (`resolv_conf_lines`) and the pod's summed CPU and memory limits (as the CRI
    sandbox annotations containerd puts on a sandbox container, so the static VM sizing reads them the same
    way); ``netns_path`` is the
    network namespace; the request's own annotations go over the pod's. Runtime options (config_path) in
    ``options`` are taken as the Task path takes them."""
    if not req.sandbox_id:
        raise InvalidArgument("sandbox id is empty")
    bundle = Path(req.bundle_path)
    spec: dict[str, Any] = load_bundle_spec(bundle) if (bundle / "config.json").is_file() else {}
    options: dict[str, Any] = {}
    pod = None
    kind = req.options.type_url.rsplit("/", 1)[-1]
    if kind == POD_SANDBOX_CONFIG_TYPE:
        try:
            pod = cri_pb2.PodSandboxConfig.FromString(req.options.value)
        except DecodeError as err:
            raise InvalidArgument(f"sandbox options ({kind}) do not decode: {err}") from err
    elif kind:
        options = decode_options(req.options)
    annotations = {str(k): str(v) for k, v in (spec.get("annotations") or {}).items()}
    linux = dict(spec.get("linux") or {})
    if pod is not None:
        annotations.update(pod.annotations)
        if pod.hostname and not spec.get("hostname"):
            spec["hostname"] = pod.hostname
        if pod.linux.cgroup_parent and not linux.get("cgroupsPath"):
            linux["cgroupsPath"] = _cgroups_path(pod.linux.cgroup_parent, req.sandbox_id)
        resources = pod.linux.resources
        # containerd's own keys, over any pod annotation of the same name (as it writes them on a sandbox
        # container's spec): a pod's user cannot size the VM through them
        annotations[CONTAINER_TYPE] = "sandbox"
        annotations[SANDBOX_CPU_QUOTA] = str(resources.cpu_quota)
        annotations[SANDBOX_CPU_PERIOD] = str(resources.cpu_period)
        annotations[SANDBOX_MEMORY] = str(resources.memory_limit_in_bytes)
        if resources.cpu_quota or resources.cpu_shares:
            cpu = {
                "quota": resources.cpu_quota,
                "period": resources.cpu_period,
                "shares": resources.cpu_shares,
            }
            linux.setdefault("resources", {"cpu": {k: v for k, v in cpu.items() if v}})
    annotations.update(req.annotations)
    annotations[SANDBOX_ID_ANNOTATION] = req.sandbox_id
    if req.netns_path:
        namespaces = [ns for ns in linux.get("namespaces") or [] if ns.get("type") != "network"]
        linux["namespaces"] = [*namespaces, {"type": "network", "path": req.netns_path}]
    spec["annotations"] = annotations
    if linux:
        spec["linux"] = linux
    return ContainerConfig(
        container_id=req.sandbox_id,
        bundle=bundle,
        spec=spec,
        rootfs=[RootfsMount(m.type, m.source, m.target, tuple(m.options)) for m in req.rootfs],
        stdio=Stdio(),
        options=options,
        dns=resolv_conf_lines(pod.dns_config) if pod is not None and pod.HasField("dns_config") else None,
    )


def resolv_conf_lines(dns: cri_pb2.DNSConfig) -> list[str]:
    """The CRI DNSConfig as resolv.conf lines (what the agent's CreateSandbox ``dns`` takes): containerd
    leaves the pod's resolv.conf to a shim sandboxer, so the guest gets it from here."""
    lines = [f"nameserver {server}" for server in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return lines


def merge_metrics(parts: list[Message]) -> cgroups_v1_metrics_pb2.Metrics:
    """The pod's cgroups v1 Metrics as the sum of its containers' (their cgroups are siblings in the
    guest): counters, usages and limits add up, per-CPU usage adds per CPU, block I/O and hugetlb entries
    are listed together; the network is the VM's, the same in each container's, so it is taken once."""
    out = cgroups_v1_metrics_pb2.Metrics()
    for part in parts:
        if not isinstance(part, cgroups_v1_metrics_pb2.Metrics):
            continue
        if not out.network:
            out.network.extend(part.network)
        _add(out, part, skip=frozenset({"network"}))
    return out


def _add(dst: Message, src: Message, skip: frozenset[str] = frozenset()) -> None:
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        target = getattr(dst, field.name)
        if field.type == field.TYPE_MESSAGE:
            if field.is_repeated:
                target.extend(value)
            else:
                _add(target, value)
        elif field.is_repeated:
            for i, item in enumerate(value):
                if i < len(target):
                    target[i] += item
                else:
                    target.append(item)
        elif isinstance(value, int) and not isinstance(value, bool):
            setattr(dst, field.name, getattr(dst, field.name) + value)


class SandboxService:
    """The Sandbox service a shim serves on its socket, beside the Task service.

    Register it with ``server.register(SANDBOX_SERVICE, SandboxService(dispatcher))`` (kata_proto.containerd)
    with the Task service's dispatcher: both drive the same `RuntimeHandlerManager`."""

    def __init__(self, dispatcher: MessageDispatcher) -> None:
        self.dispatcher = dispatcher
        self.manager = dispatcher.manager
        self.created_at: dt.datetime | None = None
        """When StartSandbox had the sandbox running."""
        self.exit: ExitStatus | None = None
        """How the sandbox ended: StopSandbox (0) or the VM's death (255); None while it lives."""
        self.dead: str | None = None
        self._stopped = trio.Event()
        self._stop_lock = trio.Lock()

    # -- helpers ------------------------------------------------------------------------------------
    def _call(self, method: str, sandbox_id: str, detail: str = "") -> None:
        log.info("Sandbox.%s %s%s", method, sandbox_id, f" ({detail})" if detail else "")
        if sandbox_id != self.manager.sandbox_id:
            raise NotFound(f"sandbox {sandbox_id!r} not found: this shim serves {self.manager.sandbox_id!r}")

    def _instance(self) -> RuntimeInstance:
        instance = self.manager.created
        if instance is None:
            raise NotFound(f"sandbox {self.manager.sandbox_id} was not created")
        return instance

    def _record_exit(self, code: int) -> None:
        if self.exit is None:
            self.exit = ExitStatus(code, _now())
            self._stopped.set()

    async def _on_death(self, reason: str) -> None:
        self.dead = reason
        log.error("sandbox %s died: %s", self.manager.sandbox_id, reason)
        self._record_exit(DEAD_EXIT_STATUS)

    async def _stop(self, grace: float) -> None:
        """Containers first (SIGTERM, up to ``grace`` seconds to exit; 0: none), then the VM (which ends
        whatever still runs) and the sandbox's host resources."""
        async with self._stop_lock:
            instance = self.manager.created
            if instance is None:
                self._record_exit(0)
                return
            if self.exit is None and self.manager.instance is not None and grace > 0:
                await self._stop_containers(instance, grace)
            await self.manager.stop_sandbox()
            self._record_exit(0)

    async def _stop_containers(self, instance: RuntimeInstance, grace: float) -> None:
        cm = instance.containers
        running = []
        for cid in cm.container_ids():
            try:
                await cm.kill_process(ProcessId(cid), signal.SIGTERM)
                running.append(cid)
            except RuntimeHandlerError as err:  # already stopped, or not started
                log.debug("sandbox %s: SIGTERM to %s: %s", self.manager.sandbox_id, cid, err)
        with trio.move_on_after(grace) as scope:
            for cid in running:
                with contextlib.suppress(RuntimeHandlerError):
                    await cm.wait_process(ProcessId(cid))
        if scope.cancelled_caught:
            log.info(
                "sandbox %s: containers still running after %g s: the VM stop ends them",
                self.manager.sandbox_id,
                grace,
            )

    # -- the rpcs -----------------------------------------------------------------------------------
    async def CreateSandbox(
        self, req: sandbox_pb2.CreateSandboxRequest, ctx: ttrpc.CallContext
    ) -> sandbox_pb2.CreateSandboxResponse:
        with status_for("CreateSandbox"):
            self._call(
                "CreateSandbox", req.sandbox_id, f"bundle {req.bundle_path}, netns {req.netns_path or '-'}"
            )
            config = sandbox_container_config(req)
            if config.rootfs:
                log.info("sandbox %s: rootfs mounts ignored (no sandbox container runs)", req.sandbox_id)
            instance = await self.manager.create_sandbox(config, self.dispatcher.handler_publish)
            instance.sandbox.on_death(self._on_death)
        return sandbox_pb2.CreateSandboxResponse()

    async def StartSandbox(
        self, req: sandbox_pb2.StartSandboxRequest, ctx: ttrpc.CallContext
    ) -> sandbox_pb2.StartSandboxResponse:
        with status_for("StartSandbox"):
            self._call("StartSandbox", req.sandbox_id)
            if self.exit is not None:
                raise FailedPrecondition(f"sandbox {req.sandbox_id} is stopped")
            await self.manager.start_sandbox()
            if self.created_at is None:
                self.created_at = _now()
        # the shim's pid, as runtime-rs answers (the VM runs in it when built in)
        return sandbox_pb2.StartSandboxResponse(pid=os.getpid(), created_at=_stamp(self.created_at))

    async def Platform(
        self, req: sandbox_pb2.PlatformRequest, ctx: ttrpc.CallContext
    ) -> sandbox_pb2.PlatformResponse:
        with status_for("Platform"):
            self._call("Platform", req.sandbox_id)
            machine = platform.machine()
        return sandbox_pb2.PlatformResponse(
            platform=platform_pb2.Platform(os="linux", architecture=_GOARCH.get(machine, machine))
        )

    async def StopSandbox(
        self, req: sandbox_pb2.StopSandboxRequest, ctx: ttrpc.CallContext
    ) -> sandbox_pb2.StopSandboxResponse:
        with status_for("StopSandbox"):
            self._call("StopSandbox", req.sandbox_id, f"timeout {req.timeout_secs} s")
            self._instance()
            await self._stop(float(req.timeout_secs))
        return sandbox_pb2.StopSandboxResponse()

    async def WaitSandbox(
        self, req: sandbox_pb2.WaitSandboxRequest, ctx: ttrpc.CallContext
    ) -> sandbox_pb2.WaitSandboxResponse:
        with status_for("WaitSandbox"):
            self._call("WaitSandbox", req.sandbox_id)
            if self.exit is None:
                self._instance()
            await self._stopped.wait()
            assert self.exit is not None
        return sandbox_pb2.WaitSandboxResponse(exit_status=self.exit.code, exited_at=self.exit.timestamp())

    async def SandboxStatus(
        self, req: sandbox_pb2.SandboxStatusRequest, ctx: ttrpc.CallContext
    ) -> sandbox_pb2.SandboxStatusResponse:
        with status_for("SandboxStatus"):
            self._call("SandboxStatus", req.sandbox_id)
            instance = self._instance()
            ready = self.manager.instance is not None and self.exit is None
            resp = sandbox_pb2.SandboxStatusResponse(
                sandbox_id=req.sandbox_id, pid=os.getpid(), state=STATE_READY if ready else STATE_NOTREADY
            )
            if self.created_at is not None:
                resp.created_at.CopyFrom(_stamp(self.created_at))
            if self.exit is not None:
                resp.exited_at.CopyFrom(self.exit.timestamp())
            if req.verbose:
                # Not under the key "info": containerd's CRI reads that one as its own SandboxInfo JSON.
                config = self.manager.config
                info = {
                    "runtime": config.runtime.name if config is not None else "",
                    "hypervisor": config.runtime.hypervisor_name if config is not None else "",
                    "containers": ",".join(instance.containers.container_ids()),
                    "threads": ",".join(str(t) for t in instance.sandbox.thread_ids()),
                }
                if self.dead is not None:
                    info["dead"] = self.dead
                resp.info.update(info)
        return resp

    async def PingSandbox(
        self, req: sandbox_pb2.PingRequest, ctx: ttrpc.CallContext
    ) -> sandbox_pb2.PingResponse:
        with status_for("PingSandbox"):
            self._call("PingSandbox", req.sandbox_id)
        return sandbox_pb2.PingResponse()

    async def ShutdownSandbox(
        self, req: sandbox_pb2.ShutdownSandboxRequest, ctx: ttrpc.CallContext
    ) -> sandbox_pb2.ShutdownSandboxResponse:
        with status_for("ShutdownSandbox"):
            self._call("ShutdownSandbox", req.sandbox_id)
            try:
                await self._stop(0)
            finally:
                # The run loop then tears down what is left, removes the state and exits (as after the
                # last Task Shutdown); containerd waits for the connection to close.
                self.dispatcher.shutdown_requested.set()
        return sandbox_pb2.ShutdownSandboxResponse()

    async def SandboxMetrics(
        self, req: sandbox_pb2.SandboxMetricsRequest, ctx: ttrpc.CallContext
    ) -> sandbox_pb2.SandboxMetricsResponse:
        with status_for("SandboxMetrics"):
            self._call("SandboxMetrics", req.sandbox_id)
            self._instance()
            instance = self.manager.instance
            if instance is None or self.exit is not None:
                raise FailedPrecondition(f"sandbox {req.sandbox_id} is not running")
            parts = []
            for cid in instance.containers.container_ids():
                try:
                    parts.append(await instance.containers.stats_container(cid))
                except RuntimeHandlerError as err:  # gone meanwhile, or not running
                    log.debug("sandbox %s: stats of %s: %s", req.sandbox_id, cid, err)
            metric = metrics_pb2.Metric(id=req.sandbox_id, data=pack_event(merge_metrics(parts)))
            metric.timestamp.GetCurrentTime()
        return sandbox_pb2.SandboxMetricsResponse(metrics=metric)
