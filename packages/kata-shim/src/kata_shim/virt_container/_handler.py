"""VirtContainer: the `virt_container` runtime handler (a VM per pod)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kata_resources import GUEST_SHARED_DIR, HOST_SHARED_ROOT
from kata_shim.persist import ENV_SHARED_ROOT
from kata_shim.runtime._base import Publisher, RuntimeInstance
from kata_shim.virt_container._container import VirtContainerManager
from kata_shim.virt_container._sandbox import HypervisorBuilder, VirtSandbox, default_hypervisor_factory


class VirtContainer:
    """Registered as `[runtime] name = "virt_container"`; `VirtContainer()` is what the registry builds.

    The keyword arguments exist for tests (a hypervisor factory, private share and state roots); without
    them the share root is $KATA_SHIM_SHARED_ROOT or /run/kata-containers/shared/sandboxes and the state
    root $KATA_SHIM_STATE_ROOT or /run/kata."""

    name = "virt_container"

    def __init__(
        self,
        *,
        hypervisor_factory: HypervisorBuilder = default_hypervisor_factory,
        share_root: Path | None = None,
        guest_share_dir: str = GUEST_SHARED_DIR,
        state_root: Path | None = None,
        **sandbox_options: Any,
    ) -> None:
        self.hypervisor_factory = hypervisor_factory
        self.share_root = share_root or Path(os.environ.get(ENV_SHARED_ROOT) or HOST_SHARED_ROOT)
        self.guest_share_dir = guest_share_dir
        self.state_root = state_root
        self.sandbox_options = sandbox_options

    def new_instance(self, sandbox_id: str, config: Any, publish: Publisher) -> RuntimeInstance:
        """A `VirtSandbox` and its `VirtContainerManager`; nothing starts until `sandbox.start`."""
        sandbox = VirtSandbox(
            sandbox_id,
            config,
            publish,
            hypervisor_factory=self.hypervisor_factory,
            share_root=self.share_root,
            guest_share_dir=self.guest_share_dir,
            state_dir=self.state_root / sandbox_id if self.state_root is not None else None,
            **self.sandbox_options,
        )
        return RuntimeInstance(sandbox, VirtContainerManager(sandbox))
