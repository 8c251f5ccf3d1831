"""VirtSandbox: the pod's VM, its shared directory, and the agent inside it.

`start` prepares the shared directory, boots the VM through a `Hypervisor`, connects the agent and sends
CreateSandbox. The agent connection and every background task of the pod (log forwarder, OOM long-poll,
health checker, per-process stdio copies and waits) live in one trio nursery owned by a trio *system
task*: the Sandbox protocol has no `async with`, and the pod outlives the Task.Create call that starts it.
`stop` ends that task; nothing here starts an OS thread.

The sandbox watches its VM for the VM's whole life: the VMM exiting (guest power-off, reboot, crash), the
agent connection lost past `reconnect_timeout_ms`, or `HEALTH_MAX_FAILURES` health checks in a row failing
make the sandbox *dead*: the VM is stopped, every `on_death` callback runs (the container manager ends
every process with exit code 255, so containerd gets a TaskExit for each), and the reason is logged.
Nothing that talks to the guest waits for it after that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from kata_agent_client import (
    GUEST_WALL_CAP,
    AgentClient,
    AgentError,
    AgentNotFound,
    GuestDetails,
    HealthChecker,
    Interface,
    Storage,
    forward_logs,
    guest_timed,
    open_agent_client,
)
from kata_proto.containerd import TOPIC_OOM, events_pb2
from kata_resources import (
    CGROUP_ROOT,
    GUEST_SHARED_DIR,
    HOST_SHARED_ROOT,
    CgroupLimits,
    MemoryPlan,
    Network,
    NetworkModel,
    ResourceError,
    ResourceUpdateOp,
    SandboxCgroup,
    ShareLayout,
    StorageSpec,
    VcpuPlan,
    dns_from_mounts,
    pod_shm_mount,
    pod_shm_size,
    pod_shm_storage,
    rescan_network,
    setup_network,
    teardown_network,
)
from kata_shim._ratelimit import LineRateLimit
from kata_shim.config._types import TomlConfig
from kata_shim.factory import opened, template_for
from kata_shim.hypervisor import boot_report
from kata_shim.hypervisor._base import Hypervisor, HypervisorError, NetworkDevice, ShareFsDevice
from kata_shim.persist import CGROUP_KEY, MOUNTS_FILE, NETWORK_KEY, StateStore, state_root
from kata_shim.runtime._base import ContainerConfig, FailedPrecondition, Publisher, RuntimeHandlerError
from kata_shim.virt_container._passfd import PassfdListener
from kata_shim.virt_container._pod import (
    cgroups_path,
    container_limits,
    guest_network,
    pod_netns,
    vm_size,
)
from kata_sys_util import GuestClock, Steps

log = logging.getLogger("kata_shim.virt_container")
agent_log = logging.getLogger("kata_shim.agent")
agent_log.addFilter(LineRateLimit("agent log"))  # the guest's agent decides how much it logs


#: Bytes of fresh host randomness a VM restored from a template is reseeded with (the guest CRNG's key size).
CLONE_SEED_BYTES = 32
#: Seconds between two UpdateInterface tries for a hot-plugged NIC whose link the guest has not made yet.
HOTPLUG_NIC_RETRY = 0.2
#: Health checks in a row that may fail before the agent is taken for dead.
HEALTH_MAX_FAILURES = 3
#: The least time between two GetOOMEvent answers taken from the guest (a guest answering in a loop is
#: read at this pace, not as fast as it can talk).
OOM_EVENT_MIN_INTERVAL = 0.1

HypervisorBuilder = Callable[[TomlConfig], Hypervisor]
"""Builds the pod's hypervisor back-end from the whole configuration."""


class SandboxError(RuntimeHandlerError):
    """The sandbox could not start: the VM did not boot, the agent did not answer, CreateSandbox failed."""


def default_hypervisor_factory(config: TomlConfig) -> Hypervisor:
    """The back-end `[runtime] hypervisor_name` names, from kata_shim.hypervisor's registry."""
    from kata_shim.hypervisor import new_hypervisor

    return new_hypervisor(config.runtime.hypervisor_name, config.hypervisor)


def _storage(spec: StorageSpec) -> Storage:
    return Storage(
        spec.driver,
        spec.mount_point,
        source=spec.source,
        fstype=spec.fstype,
        options=list(spec.options),
        driver_options=list(spec.driver_options),
    )


def _kernel_modules(entries: list[str]) -> list[tuple[str, list[str]]]:
    # Kata's `kernel_modules` entries are "name param=value ...".
    out = []
    for entry in entries:
        name, *params = entry.split()
        if name:
            out.append((name, params))
    return out


class VirtSandbox:
    """One VM per pod (runtime-rs `VirtSandbox`)."""

    def __init__(
        self,
        sandbox_id: str,
        config: TomlConfig,
        publish: Publisher,
        *,
        hypervisor_factory: HypervisorBuilder = default_hypervisor_factory,
        share_root: Path = HOST_SHARED_ROOT,
        guest_share_dir: str = GUEST_SHARED_DIR,
        state_dir: Path | None = None,
        health_interval: float = 30.0,
        destroy_timeout: float = 10.0,
        cgroup_root: Path | None = Path(CGROUP_ROOT),
    ) -> None:
        self.sandbox_id = sandbox_id
        self.config = config
        self.publish = publish
        self.layout = ShareLayout(sandbox_id, host_root=share_root, guest_dir=guest_share_dir)
        self.state_dir = state_dir if state_dir is not None else state_root() / sandbox_id
        self.ledger = self.layout.ledger(self.state_dir / MOUNTS_FILE)
        self.hypervisor: Hypervisor | None = None
        self.health_interval = health_interval
        self.destroy_timeout = destroy_timeout
        self._hypervisor_factory = hypervisor_factory
        self._agent: AgentClient | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_requested = trio.Event()
        self._service_scope = trio.CancelScope()
        self._service_done = trio.Event()
        self._started = False
        self._spawned = False
        self._stopping = False
        self._stopped = False
        self._stop_steps: Steps | None = None  # stop's and cleanup's step times, one debug line
        self._cleaned = False
        self._on_stop: list[Callable[[], Any]] = []
        self._on_death: list[Callable[[str], Any]] = []
        self.guest_clock: GuestClock | None = None
        """The VM's run-able time (wall less its boot vCPU's wait for a host CPU), from the VM's start: the
        clock of every budget on the guest (the agent's dial, its calls, passfd handshakes)."""
        self.restored = False
        """Whether the VM was restored from a VM template (`[factory] enable_template`) rather than booted."""
        self.dead: str | None = None
        """Why the VM died under the sandbox (None while it lives or after a requested stop)."""
        self.container_known: Callable[[str], bool] = lambda _cid: True
        """Whether a container id the guest names (OOM events) is ours; set by the container manager."""
        self.health: HealthChecker | None = None
        self.cgroup_root = cgroup_root
        """Where the host cgroup hierarchies are mounted; None: no host cgroup (tests)."""
        self.network: Network | None = None
        """The pod's network (veths, taps and what the guest was told), None when the pod has none."""
        self.cgroup: SandboxCgroup | None = None
        """The sandbox's host cgroup (vCPU threads, and the shim as `sandbox_cgroup_only` says)."""
        self.shm_size = 0
        """Bytes of the pod's one /dev/shm (0: the sandbox spec mounts none, containers keep their own)."""
        self._limits: dict[str, CgroupLimits] = {}
        self._store = StateStore(self.state_dir.parent)
        self.vcpu_plan: VcpuPlan | None = None
        """Dynamic sizing (`static_sandbox_resource_mgmt = false` and a back-end that hot-plugs vCPUs): the
        VM's vCPUs follow the containers' CPU quotas. None: the VM keeps its boot size."""
        self.memory_plan: MemoryPlan | None = None
        """Dynamic sizing with a back-end that hot-plugs memory: the VM's memory follows the containers'
        memory limits (``default_memory`` plus their sum). None: the VM keeps its boot memory."""
        self._resize_lock = trio.Lock()
        self._guest_nics: set[str] = set()
        """Names of the pod's interfaces the guest has a NIC for (cold- and hot-plugged)."""

    # -- what the container manager uses ----------------------------------------------------------
    @property
    def agent(self) -> AgentClient:
        """The connected agent; FailedPrecondition before `start` or after `stop`."""
        if self._agent is None or self._stopped:
            raise FailedPrecondition(f"sandbox {self.sandbox_id} is not running")
        return self._agent

    @property
    def nursery(self) -> trio.Nursery:
        """Where the pod's background tasks run (until `stop`)."""
        if self._nursery is None or self._stopped:
            raise FailedPrecondition(f"sandbox {self.sandbox_id} is not running")
        return self._nursery

    def require_hypervisor(self) -> Hypervisor:
        """The pod's hypervisor back-end; FailedPrecondition before `start`."""
        if self.hypervisor is None:
            raise FailedPrecondition(f"sandbox {self.sandbox_id} has no VM")
        return self.hypervisor

    @property
    def agent_or_none(self) -> AgentClient | None:
        """The agent while connected (also during `stop`), else None."""
        return self._agent

    def pid(self) -> int:
        """The pid containerd sees for every process of the pod: the VMM's (runtime-rs reports the VMM
        master thread id; in built-in mode that is the shim)."""
        pids = self.hypervisor.pids() if self.hypervisor is not None else []
        return pids[0] if pids else os.getpid()

    def on_stop(self, callback: Callable[[], Any]) -> None:
        """Run `callback` (sync or async) in `stop`, after DestroySandbox, before the VM stops."""
        self._on_stop.append(callback)

    def on_death(self, callback: Callable[[str], Any]) -> None:
        """Run `callback(reason)` (sync or async) when the VM dies under the sandbox, after it is stopped."""
        self._on_death.append(callback)

    # -- Sandbox protocol ------------------------------------------------------------------------
    async def start(self, first: ContainerConfig) -> None:
        """Shared dir, VM, agent, CreateSandbox; on any failure everything made so far is undone."""
        if self._started:
            raise FailedPrecondition(f"sandbox {self.sandbox_id} already started")
        self._started = True
        try:
            await self._start(first)
        except BaseException as err:
            with trio.CancelScope(shield=True):
                await self._teardown()
            if isinstance(err, BaseExceptionGroup):
                # From the VM watcher's nursery: cancellation passes through, an error is reported bare.
                _, rest = err.split((trio.Cancelled, KeyboardInterrupt))
                if rest is None:
                    raise
                err = _first_leaf(rest)
            if isinstance(err, (RuntimeHandlerError, trio.Cancelled, KeyboardInterrupt)):
                raise err
            raise SandboxError(f"sandbox {self.sandbox_id}: {str(err) or type(err).__name__}") from err

    def _passfd_wanted(self, hv: Hypervisor) -> bool:
        """use_passfd_io and a back-end that can pass fds (its `capabilities().passfd`)."""
        return self.config.runtime.use_passfd_io and hv.capabilities().passfd

    def passfd_listener(self) -> PassfdListener | None:
        """Where stdio fifos go for passfd I/O; None: copy stdio over ttrpc (off, or the VMM cannot)."""
        if self.hypervisor is None or not self._passfd_wanted(self.hypervisor):
            return None
        found = self.hypervisor.passfd_listener()
        if found is None:
            return None
        return PassfdListener(*found, clock=self.guest_clock.now if self.guest_clock is not None else None)

    async def _start(self, first: ContainerConfig) -> None:
        steps = Steps()  # each step's wall time, one debug line at the end (issue 16's lean start path)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            shared = self.layout.create(self.ledger)
        except (OSError, ResourceError) as err:
            raise SandboxError(f"shared directory for {self.sandbox_id}: {err}") from err
        steps.mark("shared-dir")
        netns = pod_netns(first.spec)
        if netns is not None:
            await self._setup_network(netns)
            steps.mark("network")
        if self.cgroup_root is not None:
            await self._setup_cgroup(cgroups_path(first.spec))
            steps.mark("cgroup")
        self._limits[first.container_id] = container_limits(first.spec)
        hv = self._hypervisor_factory(self.config)
        self.hypervisor = hv
        size = vm_size(hv.config, first.spec)
        if not self.config.runtime.static_sandbox_resource_mgmt:
            hotplug = hv.capabilities().hotplug
            if "vcpu" in hotplug:
                # runtime-rs's dynamic path: boot with default_vcpus, grow with the containers
                self.vcpu_plan = VcpuPlan(hv.config.default_vcpus)
                size = dataclasses.replace(size, vcpus=hv.config.default_vcpus)
            if "memory" in hotplug:
                # and with default_memory, grown by the containers' memory limits (runtime-rs MemResource)
                self.memory_plan = MemoryPlan(hv.config.default_memory)
                size = dataclasses.replace(size, memory_mib=hv.config.default_memory)
            static = [kind for kind in ("vcpu", "memory") if kind not in hotplug]
            if static:
                log.info(
                    "sandbox %s: hypervisor %s cannot hot-plug %s; sized statically",
                    self.sandbox_id,
                    hv.name,
                    " or ".join(static),
                )
        hv.config = dataclasses.replace(hv.config, default_vcpus=size.vcpus, default_memory=size.memory_mib)
        await hv.prepare_vm(self.sandbox_id, netns)
        if self._passfd_wanted(hv):
            hv.set_passfd_listener_port(self.config.runtime.passfd_listener_port)
        elif self.config.runtime.use_passfd_io:
            log.info(
                "sandbox %s: use_passfd_io is set but hypervisor %s cannot pass fds; stdio goes over ttrpc",
                self.sandbox_id,
                hv.name,
            )
        await hv.add_device(ShareFsDevice(shared, self.layout.mount_tag))
        endpoints = self.network.endpoints if self.network is not None else []
        nics = [NetworkDevice(e.tap, e.hw_addr) for e in endpoints if e.tap]
        # a VM restored from a template (which has no NIC) gets the pod's NICs hot-plugged after the restore
        # when the back-end hot-plugs NICs; otherwise they are cold-plugged (and a template cannot serve)
        hot_nics = "net" in hv.capabilities().hotplug
        agent_cfg = self.config.agent
        # as upstream: reconnect_timeout_ms (at least 10 s) is the budget, dial_timeout_ms the retry pause
        dial_timeout = agent_cfg.connect_budget_s
        if self.cgroup is not None:
            await self._join_cgroup(hv, vcpus=False)  # the shim first: the VM's threads start there
        steps.mark("prepare-vm")
        started = time.monotonic()
        self.restored = False
        with contextlib.ExitStack() as held:
            template = None
            if self.config.factory.enable_template:
                found = await template_for(
                    self.config,
                    hv,
                    self._hypervisor_factory,
                    vcpus=size.vcpus,
                    memory_mib=size.memory_mib,
                    nics=0 if hot_nics else len(nics),
                )
                template = held.enter_context(opened(found, self.config, hv)) if found is not None else None
            if template is not None:
                hv.restore_from(template)
            else:
                for nic in nics:
                    await hv.add_device(nic)
            booted = time.monotonic()
            await hv.start_vm(dial_timeout)
            self.restored = template is not None
            if self.restored:
                for nic in nics:
                    await hv.add_device(nic)  # hot-plugged
        steps.mark("restore-vm" if self.restored else "start-vm")
        if self.restored:
            took = time.monotonic() - booted
            log.info("sandbox %s: restored from template %s in %.2f s", self.sandbox_id, template, took)
        if self.cgroup is not None:
            await self._join_cgroup(hv, vcpus=True)
            await self._apply_limits()
        address = hv.agent_address()
        log.info("sandbox %s: VM started, agent at %s", self.sandbox_id, address)
        # The agent's budgets are guest time: wall time less what the boot vCPU waited for a host CPU, so
        # ten sandboxes booting at once on a small host do not all run out of them together; a wall
        # deadline of GUEST_WALL_CAP budgets stays on the dial itself and on every call (guest_timed).
        vcpus = hv.vcpu_thread_ids()
        clock = self.guest_clock = GuestClock(vcpus[0] if vcpus else None)
        ready: dict[str, BaseException | None] = {}
        ready_event = trio.Event()
        self._spawned = True
        trio.lowlevel.spawn_system_task(
            self._serve,
            address,
            dial_timeout * GUEST_WALL_CAP,
            clock,
            ready,
            ready_event,
            name=f"kata-sandbox-{self.sandbox_id}",
        )
        vm_exit: list[int] = []
        out_of_budget: list[float] = []

        async def watch_vm() -> None:
            # A guest that dies while we dial must fail the start now, not after the dial timeout.
            vm_exit.append(await hv.wait_vm())
            self._service_scope.cancel()

        async def watch_budget() -> None:
            with contextlib.suppress(trio.TooSlowError):
                await guest_timed(clock.now, dial_timeout, trio.sleep_forever)
            out_of_budget.append(time.monotonic() - clock.started)
            self._service_scope.cancel()

        async with trio.open_nursery() as watcher:
            watcher.start_soon(watch_vm)
            watcher.start_soon(watch_budget)
            await ready_event.wait()
            watcher.cancel_scope.cancel()
        if vm_exit:
            reason = hv.exit_reason() or f"wait_vm returned {vm_exit[0]}"
            message = f"the VM of sandbox {self.sandbox_id} stopped before its agent answered: {reason}"
            raise SandboxError(f"{message}\n{boot_report(hv.vcpu_thread_ids(), hv.console_tail(), started)}")
        if out_of_budget:
            message = (
                f"agent at {address} not ready within {dial_timeout:g} s of guest time"
                f" ({out_of_budget[0]:.0f} s wall, of which the boot vCPU waited {clock.waited():.0f} s for a"
                " host CPU)"
            )
            raise SandboxError(f"{message}\n{boot_report(hv.vcpu_thread_ids(), hv.console_tail(), started)}")
        failure = ready.get("error")
        if failure is not None:
            text = str(failure)
            text = text if address in text else f"agent at {address}: {text}"
            report = boot_report(hv.vcpu_thread_ids(), hv.console_tail(), started)
            raise SandboxError(f"{text}\n{report}") from failure
        steps.mark("agent-ready")
        agent = self.agent
        hostname = str(first.spec.get("hostname", "") or "")
        mounts = [m for m in first.spec.get("mounts") or [] if isinstance(m, dict)]
        storages = [_storage(self.layout.sandbox_storage())]
        if any(m.get("destination") == "/dev/shm" for m in mounts):
            self.shm_size = pod_shm_size(mounts)
            storages.append(_storage(pod_shm_storage(self.shm_size)))
        budget = agent_cfg.request_timeout_ms / 1000

        async def set_up() -> GuestDetails:
            if self.restored:
                await self._set_clone_identity(agent)
                steps.mark("clone-identity")
            # hot-plugged NICs of a restored VM may not be in the guest yet: UpdateInterface is retried
            await self._configure_guest_network(agent, hot=self.restored)
            steps.mark("guest-network")
            await agent.create_sandbox(
                self.sandbox_id,
                hostname=hostname,
                dns=first.dns if first.dns is not None else dns_from_mounts(mounts),
                storages=storages,
                kernel_modules=_kernel_modules(agent_cfg.kernel_modules),
            )
            steps.mark("create-sandbox")
            return await agent.get_guest_details()

        try:
            details = await guest_timed(clock.now, budget, set_up)
        except trio.TooSlowError as err:
            raise SandboxError(
                f"sandbox {self.sandbox_id}: the agent did not set up the sandbox (network, CreateSandbox)"
                f" {err} (request_timeout_ms), {steps.elapsed():.0f} s into the start"
            ) from err
        steps.mark("guest-details")
        log.info("sandbox %s: guest agent %s", self.sandbox_id, details.agent_version)
        log.debug("sandbox %s: started, %s", self.sandbox_id, steps)
        self.nursery.start_soon(self._oom_events)
        self.health = HealthChecker(
            agent,
            self._unhealthy,
            interval=self.health_interval,
            timeout=agent_cfg.health_check_request_timeout_ms / 1000,
            max_failures=HEALTH_MAX_FAILURES,
        )
        self.nursery.start_soon(self._watch_health, self.health)
        self.nursery.start_soon(self._watch_vm, hv)
        self.nursery.start_soon(self._watch_agent, agent)

    async def _set_clone_identity(self, agent: AgentClient) -> None:
        """A VM restored from a template has the template's clock and random state: the guest clock is set
        to now and its CRNG reseeded with 32 fresh bytes from the host's, before anything runs in it (the
        hostname goes with CreateSandbox, as on a cold boot)."""
        await agent.set_guest_date_time(time.time())
        await agent.reseed_random_dev(os.urandom(CLONE_SEED_BYTES))
        log.info("sandbox %s: clone identity set (guest clock, RNG reseeded)", self.sandbox_id)

    # -- the pod's host resources ----------------------------------------------------------------
    def _persist(self, key: str, value: dict[str, Any]) -> None:
        try:
            self._store.update(self.sandbox_id, extra={key: value})
        except Exception as err:  # the state file is for crash cleanup: never a reason to fail the pod
            log.warning("sandbox %s: cannot record %s for cleanup: %s", self.sandbox_id, key, err)

    def _forget(self, key: str) -> None:
        with contextlib.suppress(Exception):
            self._store.forget(self.sandbox_id, key)

    async def _setup_network(self, netns: str) -> None:
        """Connect a tap to each veth of the pod's netns (the model `internetworking_model` names)."""
        try:
            model = NetworkModel(self.config.runtime.internetworking_model or "tcfilter")
        except ValueError as err:
            raise SandboxError(f"internetworking_model: {err}") from err
        try:
            self.network = await setup_network(netns, model)
        except (ResourceError, OSError) as err:
            raise SandboxError(f"network of sandbox {self.sandbox_id} in {netns}: {err}") from err
        self._persist(NETWORK_KEY, self.network.to_dict())
        log.info(
            "sandbox %s: network %s (%s): %s",
            self.sandbox_id,
            netns,
            model.value,
            ", ".join(f"{e.veth}<->{e.tap or '-'}" for e in self.network.endpoints) or "no veth",
        )

    async def _configure_guest_network(
        self, agent: AgentClient, *, only: set[str] | None = None, hot: bool = False
    ) -> None:
        """UpdateInterface for each NIC (``only``: just those, hot-plugged; ``hot``: all were hot-plugged,
        into a VM restored from a template), then UpdateRoutes (every route of the NICs the guest has: the
        agent replaces them) and AddARPNeighbors (as runtime-rs does)."""
        if self.network is None:
            return
        interfaces, routes, neighbors = guest_network(self.network)
        if only is None:
            self._guest_nics = {i.name for i in interfaces}
        for interface in interfaces:
            if only is None or interface.name in only:
                await self._update_interface(agent, interface, hot=hot or only is not None)
        routes = [r for r in routes if r.device in self._guest_nics]
        if routes:
            await agent.update_routes(routes)
        neighbors = [n for n in neighbors if only is None or n.device in only]
        if neighbors:
            await agent.add_arp_neighbors(neighbors)

    @staticmethod
    async def _update_interface(agent: AgentClient, interface: Interface, *, hot: bool) -> None:
        """UpdateInterface; a hot-plugged NIC's link may not be in the guest yet (its driver still
        probing): NotFound is tried again until the caller's deadline."""
        while True:
            try:
                await agent.update_interface(interface)
                return
            except AgentNotFound:
                if not hot:
                    raise
            await trio.sleep(HOTPLUG_NIC_RETRY)

    async def rescan_network(self) -> None:
        """Look at the pod's netns again (upstream does on Start): veths that appeared since the VM booted
        are connected and recorded, and, on a back-end that hot-plugs NICs, given to the guest: a
        virtio-net on the new tap (`Hypervisor.add_device`), then UpdateInterface, UpdateRoutes and
        AddARPNeighbors as at boot. Without NIC hot-plug they are only logged. Failures are logged: the
        pod keeps the network it had."""
        if self.network is None:
            return
        try:
            added = await rescan_network(self.network)
        except (ResourceError, OSError) as err:
            log.warning("sandbox %s: network rescan: %s", self.sandbox_id, err)
            return
        if not added:
            return
        self._persist(NETWORK_KEY, self.network.to_dict())
        hv = self.hypervisor
        if hv is None or "net" not in hv.capabilities().hotplug:
            log.warning(
                "sandbox %s: %s appeared after boot; hypervisor %s cannot hot-plug a NIC",
                self.sandbox_id,
                ", ".join(e.veth for e in added),
                hv.name if hv is not None else "-",
            )
            return
        plugged = []
        for endpoint in added:
            if not endpoint.tap:
                continue  # model none: nothing for the guest
            try:
                await hv.add_device(NetworkDevice(endpoint.tap, endpoint.hw_addr))
            except HypervisorError as err:
                log.warning("sandbox %s: hot-plugging a NIC for %s: %s", self.sandbox_id, endpoint.veth, err)
                continue
            plugged.append(endpoint.veth)
            self._guest_nics.add(endpoint.veth)
        if plugged:
            try:
                with trio.fail_after(self.config.agent.request_timeout_ms / 1000):
                    await self._configure_guest_network(self.agent, only=set(plugged))
            except (AgentError, trio.TooSlowError, FailedPrecondition) as err:
                log.warning("sandbox %s: configuring %s in the guest: %r", self.sandbox_id, plugged, err)
                return
            log.info("sandbox %s: hot-plugged NICs for %s", self.sandbox_id, ", ".join(plugged))

    async def _setup_cgroup(self, path: str) -> None:
        assert self.cgroup_root is not None
        create = functools.partial(
            SandboxCgroup.create,
            self.sandbox_id,
            path,
            sandbox_cgroup_only=self.config.runtime.sandbox_cgroup_only,
            root=self.cgroup_root,
        )
        try:
            self.cgroup = await trio.to_thread.run_sync(create)
        except (ResourceError, OSError) as err:
            raise SandboxError(f"host cgroup of sandbox {self.sandbox_id}: {err}") from err
        self._persist(CGROUP_KEY, self.cgroup.to_dict())

    async def _join_cgroup(self, hv: Hypervisor, *, vcpus: bool) -> None:
        """Before boot: the VMM's processes (the shim itself when built in) into the sandbox cgroup with
        ``sandbox_cgroup_only``, else into the overhead one. After boot: the vCPU threads into the
        sandbox cgroup (upstream's split: only vCPUs count against the pod's CPU limits)."""
        cg = self.cgroup
        assert cg is not None
        try:
            if vcpus:
                await trio.to_thread.run_sync(cg.add_threads, hv.vcpu_thread_ids())
            else:
                await trio.to_thread.run_sync(cg.add_processes, hv.pids())
        except (ResourceError, OSError) as err:
            raise SandboxError(f"host cgroup of sandbox {self.sandbox_id}: {err}") from err

    async def _apply_limits(self) -> None:
        if self.cgroup is None:
            return
        limits = CgroupLimits.sandbox(self._limits.values())
        try:
            await trio.to_thread.run_sync(self.cgroup.set_limits, limits)
        except (ResourceError, OSError) as err:
            raise SandboxError(f"host cgroup limits of sandbox {self.sandbox_id}: {err}") from err

    async def container_resources(self, container_id: str, resources: dict[str, Any] | None) -> None:
        """A container's OCI ``linux.resources`` (Create or Update; None: the container is gone): the
        sandbox cgroup's CPU limits become the sum over the containers."""
        if resources is None:
            self._limits.pop(container_id, None)
        else:
            self._limits[container_id] = container_limits(resources, resources=True)
        try:
            await self._apply_limits()
        except SandboxError as err:  # the guest's cgroups still hold the container: logged, not fatal
            log.warning("%s", err)

    async def resize_for(
        self, container_id: str, resources: dict[str, Any] | None, op: ResourceUpdateOp
    ) -> None:
        """Dynamic sizing (runtime-rs ``CpuResource::update_cpu_resources``): with the container's OCI
        ``linux.resources`` (None: its CPU request is unchanged) the pod's vCPU need is computed again, the
        VM resized (`Hypervisor.resize_vcpu`) and, when it grew, the agent asked to online the new CPUs
        (OnlineCPUMem). Memory likewise with a `memory_plan` (`Hypervisor.resize_memory`, then
        OnlineCPUMem with memory). Nothing with static sizing. `SandboxError` when the VM or the guest
        refuses; `ValueError` for a bad cpuset."""
        await self._resize_vcpus_for(container_id, resources, op)
        await self._resize_memory_for(container_id, resources, op)

    def _forgotten_on_the_way_out(
        self, plan: VcpuPlan | MemoryPlan, container_id: str, op: ResourceUpdateOp
    ) -> bool:
        """A container removed while the VM is going away: ``plan`` forgets it, nothing is resized."""
        if op is ResourceUpdateOp.DEL and (self._stopping or self.dead is not None):
            plan.requests.pop(container_id, None)
            return True
        return False

    async def _resize_memory_for(
        self, container_id: str, resources: dict[str, Any] | None, op: ResourceUpdateOp
    ) -> None:
        plan, hv = self.memory_plan, self.hypervisor
        if plan is None or hv is None or self._forgotten_on_the_way_out(plan, container_id, op):
            return
        async with self._resize_lock:
            target = plan.update(container_id, _resources_part(resources, "memory"), op)
            if target is None:
                return
            old = plan.current
            try:
                now, _how = await hv.resize_memory(target)
            except HypervisorError as err:
                raise SandboxError(
                    f"sandbox {self.sandbox_id}: resizing the VM to {target} MiB for container "
                    f"{container_id}: {err}"
                ) from err
            plan.resized(now)
            log.info(
                "sandbox %s: memory %d -> %d MiB (container %s)", self.sandbox_id, old, now, container_id
            )
            if old < now:
                vcpus = self.vcpu_plan.current if self.vcpu_plan is not None else 0
                try:  # online what the guest added and did not online itself (upstream does the same)
                    await self.agent.online_cpu_mem(vcpus, cpu_only=False)
                except AgentError as err:
                    raise SandboxError(f"sandbox {self.sandbox_id}: OnlineCPUMem (memory): {err}") from err

    async def _resize_vcpus_for(
        self, container_id: str, resources: dict[str, Any] | None, op: ResourceUpdateOp
    ) -> None:
        plan, hv = self.vcpu_plan, self.hypervisor
        if plan is None or hv is None or self._forgotten_on_the_way_out(plan, container_id, op):
            return
        async with self._resize_lock:
            target = plan.update(container_id, _resources_part(resources, "cpu"), op)
            if target is None:
                return
            try:
                old, new = await hv.resize_vcpu(plan.current, target)
            except HypervisorError as err:
                raise SandboxError(
                    f"sandbox {self.sandbox_id}: resizing the VM to {target} vCPUs for container "
                    f"{container_id}: {err}"
                ) from err
            plan.resized(new)
            log.info("sandbox %s: vCPUs %d -> %d (container %s)", self.sandbox_id, old, new, container_id)
            if old < new and self.cgroup is not None:
                # a new vCPU thread starts in its creator's cgroup: the pod's CPU limits must hold it too
                try:
                    await self._join_cgroup(hv, vcpus=True)
                except SandboxError as err:
                    log.warning("%s", err)
            if old < new:
                try:
                    await self.agent.online_cpu_mem(new, cpu_only=True)
                except AgentError as err:
                    raise SandboxError(f"sandbox {self.sandbox_id}: OnlineCPUMem({new}): {err}") from err

    def guest_mounts(self, mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A container's guest mounts with its /dev/shm on the pod's one (when the pod has one)."""
        if not self.shm_size:
            return mounts
        return [pod_shm_mount() if m.get("destination") == "/dev/shm" else m for m in mounts]

    async def _release_host_resources(self) -> list[str]:
        """Tear down the network and remove the cgroup (after the VM is gone); the errors, as text."""
        errors = []
        if self.network is not None:
            try:
                await teardown_network(self.network)
                self.network = None
                self._forget(NETWORK_KEY)
            except (ResourceError, OSError) as err:
                errors.append(f"network: {err}")
        if self.cgroup is not None:
            try:
                await trio.to_thread.run_sync(self.cgroup.delete)
                self.cgroup = None
                self._forget(CGROUP_KEY)
            except (ResourceError, OSError) as err:
                errors.append(f"cgroup: {err}")
        return errors

    async def _serve(
        self,
        address: str,
        dial_timeout: float,
        clock: GuestClock,
        ready: dict[str, BaseException | None],
        ready_event: trio.Event,
    ) -> None:
        # A system task: nothing may escape it (an exception here would crash trio.run).
        try:
            with self._service_scope:
                async with (
                    open_agent_client(
                        address,
                        ready_timeout=dial_timeout,
                        retry_interval=self.config.agent.dial_interval_s,
                        call_timeout=self.config.agent.request_timeout_ms / 1000,
                        reconnect_timeout=self.config.agent.connect_budget_s,
                        clock=clock.now,
                    ) as agent,
                    trio.open_nursery() as nursery,
                ):
                    self._agent, self._nursery = agent, nursery
                    nursery.start_soon(self._forward_logs, address)
                    ready["error"] = None
                    ready_event.set()
                    await self._stop_requested.wait()
                    nursery.cancel_scope.cancel()
            if not ready_event.is_set():
                ready["error"] = SandboxError("stopped before the agent answered")
        except BaseException as err:  # reported to start() or logged
            if not ready_event.is_set():
                ready["error"] = err
            elif not isinstance(err, trio.Cancelled):
                log.error("sandbox %s: service task failed: %r", self.sandbox_id, err)
        finally:
            self._agent = None
            self._nursery = None
            ready_event.set()
            self._service_done.set()

    async def _forward_logs(self, address: str) -> None:
        try:
            await forward_logs(address, agent_log)
        except Exception as err:  # the log stream is best effort, as upstream's
            log.debug("sandbox %s: agent log stream ended: %r", self.sandbox_id, err)

    async def _oom_events(self) -> None:
        while True:
            try:
                container_id = await self.agent.get_oom_event()
            except (AgentError, OSError) as err:
                log.debug("sandbox %s: OOM long-poll ends: %r", self.sandbox_id, err)
                return
            except FailedPrecondition:
                return
            if container_id and self.container_known(container_id):
                await self.publish(TOPIC_OOM, events_pb2.TaskOOM(container_id=container_id))
            elif container_id:
                log.debug("sandbox %s: OOM event for unknown container %.64r", self.sandbox_id, container_id)
            await trio.sleep(OOM_EVENT_MIN_INTERVAL)

    async def _unhealthy(self, error: BaseException | None) -> None:
        log.warning("sandbox %s: agent health check failed: %r", self.sandbox_id, error)

    # -- liveness ---------------------------------------------------------------------------------
    async def _watch_vm(self, hv: Hypervisor) -> None:
        code = await hv.wait_vm()
        await self._die(f"the VM stopped ({hv.exit_reason() or f'exit {code}'})")

    async def _watch_agent(self, agent: AgentClient) -> None:
        reason = await agent.wait_lost()
        await self._die(f"the agent connection was lost ({reason})")

    async def _watch_health(self, checker: HealthChecker) -> None:
        await checker.run()
        await self._die(f"{checker.streak} agent health checks failed in a row ({checker.last_error!r})")

    async def _die(self, reason: str) -> None:
        """The VM is gone or unusable: stop it, end everything that waits on it, tell the callbacks."""
        if self._stopping or self.dead is not None:
            return  # a stop we asked for, or already handled
        self.dead = reason
        log.error("sandbox %s is dead: %s", self.sandbox_id, reason)
        with trio.CancelScope(shield=True):
            if self.hypervisor is not None:
                try:
                    await self.hypervisor.stop_vm()  # closes every connection into the guest
                except Exception as err:
                    log.warning("sandbox %s: stop_vm: %r", self.sandbox_id, err)
            for callback in self._on_death:
                try:
                    result = callback(reason)
                    if hasattr(result, "__await__"):
                        with trio.move_on_after(self.destroy_timeout):
                            await result
                except Exception as err:
                    log.warning("sandbox %s: death callback: %r", self.sandbox_id, err)

    async def stop(self) -> None:
        """DestroySandbox (bounded), end the background tasks, stop the VM; idempotent."""
        if self._stopped:
            return
        self._stopping = True
        steps = self._stop_steps = Steps()
        with trio.CancelScope(shield=True):
            agent = self._agent
            if agent is not None and self.dead is None:
                with trio.move_on_after(self.destroy_timeout):
                    try:
                        await agent.destroy_sandbox()
                    except Exception as err:
                        log.warning("sandbox %s: DestroySandbox: %r", self.sandbox_id, err)
            steps.mark("destroy-sandbox")
            for callback in self._on_stop:
                try:
                    result = callback()
                    if hasattr(result, "__await__"):
                        with trio.move_on_after(self.destroy_timeout):
                            await result
                except Exception as err:
                    log.warning("sandbox %s: stop callback: %r", self.sandbox_id, err)
            steps.mark("stop-callbacks")
            self._stopped = True
            self._stop_requested.set()
            if self._agent is None:
                self._service_scope.cancel()  # still dialling the agent: give up now
            if self._spawned:
                await self._service_done.wait()
            steps.mark("services")
            if self.hypervisor is not None:
                try:
                    await self.hypervisor.stop_vm()
                except Exception as err:
                    log.warning("sandbox %s: stop_vm: %r", self.sandbox_id, err)
            steps.mark("stop-vm")

    async def cleanup(self) -> None:
        """Release the hypervisor's resources, unmount everything, remove the shared dir; idempotent."""
        await self.stop()
        if self._cleaned:
            return
        steps = self._stop_steps or Steps()
        with trio.CancelScope(shield=True):
            if self.hypervisor is not None:
                try:
                    await self.hypervisor.cleanup()
                except Exception as err:
                    log.warning("sandbox %s: hypervisor cleanup: %r", self.sandbox_id, err)
            steps.mark("hypervisor-cleanup")
            errors = await self._release_host_resources()
            steps.mark("host-resources")
            try:
                self.ledger.undo()
            except ResourceError as err:
                errors.append(str(err))
            try:
                self.layout.remove()
            except ResourceError as err:
                errors.append(str(err))
            steps.mark("mounts-and-share")
            if not errors:
                with contextlib.suppress(FileNotFoundError):
                    (self.state_dir / MOUNTS_FILE).unlink()
            self._cleaned = True
            log.debug("sandbox %s: stopped, %s", self.sandbox_id, steps)
            if errors:
                raise SandboxError(f"sandbox {self.sandbox_id} cleanup: {'; '.join(errors)}")

    async def _teardown(self) -> None:
        # After a failed start: same as stop + cleanup, never raising over the original error.
        try:
            await self.cleanup()
        except Exception as err:
            log.warning("sandbox %s: cleanup after failed start: %r", self.sandbox_id, err)

    def thread_ids(self) -> list[int]:
        """The hypervisor's threads (vCPUs, event thread); the sandbox itself adds none."""
        return self.hypervisor.thread_ids() if self.hypervisor is not None else []


def _resources_part(resources: dict[str, Any] | None, part: str) -> dict[str, Any] | None:
    """``linux.resources[part]`` (``cpu``, ``memory``) when it is an object, else None (unchanged)."""
    value = (resources or {}).get(part)
    return value if isinstance(value, dict) else None


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group
