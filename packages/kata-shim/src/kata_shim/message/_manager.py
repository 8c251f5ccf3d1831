"""The runtime handler manager: builds the pod's `RuntimeInstance` on the first Create and owns it.

It loads the configuration (the first Create's runtime options may name the file, else those containerd
gave `start`), picks the container abstraction by `[runtime] name`, records the sandbox under
/run/kata/<sandbox id> before anything is made on the host, and undoes all of it when the sandbox fails to
start or the shim shuts down.

Two ways in, one start path (as runtime-rs): containerd 1.x's Task API makes and starts the sandbox on the
pod's first Create (`create_container`); containerd 2.x's Sandbox API makes it on CreateSandbox
(`create_sandbox`: configuration and instance, nothing started) and starts it on StartSandbox
(`start_sandbox`); a Task Create that comes first starts it then. Either way the same `Sandbox.start`
boots the VM, with the sandbox's `ContainerConfig` as its first argument.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import trio

from kata_shim.config import TomlConfig, apply_annotations, load_config
from kata_shim.persist import SandboxState, StateStore, cleanup_sandbox, process_start_time
from kata_shim.runtime._base import (
    AlreadyExists,
    ContainerConfig,
    FailedPrecondition,
    NotFound,
    Publisher,
    RuntimeHandler,
    RuntimeInstance,
)
from kata_shim.runtime._registry import runtime_handler

log = logging.getLogger("kata_shim.runtime")

ConfigLoader = Callable[[str], TomlConfig]
"""config_path from the runtime options ("" when none) -> the loaded configuration."""
HandlerFactory = Callable[[str], RuntimeHandler]
"""`[runtime] name` -> a RuntimeHandler."""


class RuntimeHandlerManager:
    """One shim process, one pod: the `RuntimeInstance` and its persisted state."""

    def __init__(
        self,
        sandbox_id: str,
        *,
        namespace: str = "",
        shim_address: str = "",
        store: StateStore | None = None,
        load: ConfigLoader = load_config,
        new_handler: HandlerFactory = runtime_handler,
        default_config_path: str = "",
    ) -> None:
        self.sandbox_id = sandbox_id
        self.default_config_path = default_config_path
        """The runtime options' config_path containerd gave `start` (for a Create whose options name none:
        the Sandbox API's CreateSandbox never does)."""
        self.namespace = namespace
        self.shim_address = shim_address
        self.store = store or StateStore()
        self._load = load
        self._new_handler = new_handler
        self._instance: RuntimeInstance | None = None
        self._created: tuple[RuntimeInstance, ContainerConfig, TomlConfig] | None = None
        """CreateSandbox's instance, its sandbox config and configuration, until the sandbox starts."""
        self.sandbox_api = False
        """Whether containerd drives this sandbox through the Sandbox API (then ShutdownSandbox, not the last
        Task Shutdown, ends the shim)."""
        self.config: TomlConfig | None = None
        self._lock = trio.Lock()

    @property
    def instance(self) -> RuntimeInstance | None:
        """The pod's instance once its first Create has started the sandbox."""
        return self._instance

    def require(self, container_id: str) -> RuntimeInstance:
        """The instance; NotFound for any container before the first Create."""
        if self._instance is None:
            raise NotFound(f"container {container_id}: not found (no container created in this shim)")
        return self._instance

    @property
    def created(self) -> RuntimeInstance | None:
        """The instance CreateSandbox made (started or not), or the one the first Task Create started."""
        return self._created[0] if self._created is not None else self._instance

    async def create_container(self, config: ContainerConfig, publish: Publisher) -> int:
        """Create a container; the first one also builds and starts the sandbox (or starts the one
        CreateSandbox made). Returns its pid."""
        async with self._lock:
            if self._instance is None:
                if self._created is not None:
                    await self._start_created()
                else:
                    instance, toml = self._new_instance(config, publish)
                    await self._start(instance, config, toml)
        assert self._instance is not None
        return await self._instance.containers.create_container(config)

    async def create_sandbox(self, sandbox: ContainerConfig, publish: Publisher) -> RuntimeInstance:
        """Sandbox API CreateSandbox: load the configuration and build the instance; nothing starts (the
        VM boots on `start_sandbox`). AlreadyExists when this shim already has its sandbox."""
        async with self._lock:
            if self._instance is not None or self._created is not None:
                raise AlreadyExists(f"sandbox {self.sandbox_id} already exists")
            instance, toml = self._new_instance(sandbox, publish)
            self._created = (instance, sandbox, toml)
            self.config = toml
            self.sandbox_api = True
            return instance

    async def start_sandbox(self) -> RuntimeInstance:
        """Sandbox API StartSandbox: boot what CreateSandbox made (nothing when it runs already).
        NotFound before CreateSandbox; a failed start is undone and forgotten, as the Task path does."""
        async with self._lock:
            if self._instance is None:
                if self._created is None:
                    raise NotFound(f"sandbox {self.sandbox_id} was not created")
                await self._start_created()
            assert self._instance is not None
            return self._instance

    async def _start_created(self) -> None:
        assert self._created is not None
        instance, first, toml = self._created
        try:
            await self._start(instance, first, toml)
        finally:
            # started: it is `instance` now; failed: torn down, and containerd creates it anew
            self._created = None

    async def stop_sandbox(self) -> None:
        """Stop the VM and release its host resources; the instance stays for the Task calls that still
        come (Delete of its containers) until `shutdown`. Idempotent. FailedPrecondition: no sandbox."""
        instance = self.created
        if instance is None:
            raise FailedPrecondition(f"sandbox {self.sandbox_id} has nothing to stop")
        with trio.CancelScope(shield=True):
            await instance.sandbox.stop()
            await instance.sandbox.cleanup()

    def _new_instance(self, first: ContainerConfig, publish: Publisher) -> tuple[RuntimeInstance, TomlConfig]:
        config = self._load(str(first.options.get("config_path") or self.default_config_path))
        config = apply_annotations(config, first.spec.get("annotations") or {})
        handler = self._new_handler(config.runtime.name)
        state = SandboxState(
            sandbox_id=self.sandbox_id,
            namespace=self.namespace,
            address=self.shim_address,
            bundle=str(first.bundle),
            shim_pid=os.getpid(),
            shim_start_time=process_start_time(os.getpid()) or 0,
            runtime=config.runtime.name,
            hypervisor=config.runtime.hypervisor_name,
            config_path=str(config.path),
        )
        # Recorded before the sandbox makes anything, so `delete` finds it after a crash mid-start.
        self.store.save(state)
        log.info(
            "sandbox %s: runtime %s, hypervisor %s, config %s",
            self.sandbox_id,
            config.runtime.name,
            config.runtime.hypervisor_name,
            config.path,
        )
        return handler.new_instance(self.sandbox_id, config, publish), config

    async def _start(self, instance: RuntimeInstance, first: ContainerConfig, config: TomlConfig) -> None:
        try:
            await instance.sandbox.start(first)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._teardown(instance)
            raise
        self.config = config
        self._instance = instance

    async def _teardown(self, instance: RuntimeInstance | None) -> None:
        if instance is not None:
            for step in (instance.sandbox.stop, instance.sandbox.cleanup):
                try:
                    await step()
                except Exception:
                    log.exception("sandbox %s: %s failed", self.sandbox_id, step.__name__)
        report = cleanup_sandbox(self.sandbox_id, self.store, kill_shim=False)
        if report.unmounted or report.errors:
            log.info("sandbox %s cleanup: %s", self.sandbox_id, report)

    def container_ids(self) -> list[str]:
        """Containers that exist now (none before the first Create)."""
        return [] if self._instance is None else self._instance.containers.container_ids()

    async def shutdown(self) -> None:
        """Stop the sandbox, release its host resources, remove its state (idempotent)."""
        instance, self._instance = self.created, None
        self._created = None
        with trio.CancelScope(shield=True):
            await self._teardown(instance)
