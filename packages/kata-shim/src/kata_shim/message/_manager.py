"""The runtime handler manager: builds the pod's `RuntimeInstance` on the first Create and owns it.

It loads the configuration (the first Create's runtime options may name the file), picks the container
abstraction by `[runtime] name`, records the sandbox under /run/kata/<sandbox id> before anything is
made on the host, and undoes all of it when the sandbox fails to start or the shim shuts down.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import trio

from kata_shim.config import TomlConfig, apply_annotations, load_config
from kata_shim.persist import SandboxState, StateStore, cleanup_sandbox, process_start_time
from kata_shim.runtime._base import ContainerConfig, NotFound, Publisher, RuntimeHandler, RuntimeInstance
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
    ) -> None:
        self.sandbox_id = sandbox_id
        self.namespace = namespace
        self.shim_address = shim_address
        self.store = store or StateStore()
        self._load = load
        self._new_handler = new_handler
        self._instance: RuntimeInstance | None = None
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

    async def create_container(self, config: ContainerConfig, publish: Publisher) -> int:
        """Create a container; the first one also builds and starts the sandbox. Returns its pid."""
        async with self._lock:
            if self._instance is None:
                self._instance = await self._start_sandbox(config, publish)
        return await self._instance.containers.create_container(config)

    async def _start_sandbox(self, first: ContainerConfig, publish: Publisher) -> RuntimeInstance:
        config = self._load(str(first.options.get("config_path") or ""))
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
        instance = handler.new_instance(self.sandbox_id, config, publish)
        try:
            await instance.sandbox.start(first)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._teardown(instance)
            raise
        self.config = config
        return instance

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
        instance, self._instance = self._instance, None
        with trio.CancelScope(shield=True):
            await self._teardown(instance)
