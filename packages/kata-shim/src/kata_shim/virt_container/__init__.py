"""virt_container: every pod in a VM (runtime-rs `virt_container`).

handler = VirtContainer()                       # looked up by [runtime] name = "virt_container"
pod = handler.new_instance("sb1", toml_config, publish)
await pod.sandbox.start(first_container)        # shared dir, VM, agent, CreateSandbox
pid = await pod.containers.create_container(first_container)
await pod.containers.start_process(ProcessId("sb1"))
status = await pod.containers.wait_process(ProcessId("sb1"))
await pod.sandbox.stop(); await pod.sandbox.cleanup()
"""

from kata_shim.virt_container._container import LOST_EXIT_CODE, VirtContainerManager
from kata_shim.virt_container._handler import VirtContainer
from kata_shim.virt_container._metrics import metrics_from_stats
from kata_shim.virt_container._oci import guest_spec
from kata_shim.virt_container._sandbox import (
    MOUNTS_FILE,
    HypervisorBuilder,
    SandboxError,
    VirtSandbox,
    default_hypervisor_factory,
)

__all__ = [
    "LOST_EXIT_CODE",
    "MOUNTS_FILE",
    "HypervisorBuilder",
    "SandboxError",
    "VirtContainer",
    "VirtContainerManager",
    "VirtSandbox",
    "default_hypervisor_factory",
    "guest_spec",
    "metrics_from_stats",
]
