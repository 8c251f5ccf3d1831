"""Boot guests inside the lab VM from tests: a `MicroVM` per guest, a back-end per VMM.

Like Firecracker's tests/framework/microvm.py: a test asks a factory for a guest (kernel, initrd,
command line, vCPUs, memory), spawns it, waits for a marker on its serial console, and the fixture
kills whatever is left at teardown. Back-ends turn the same `GuestConfig` into a VMM command line:

- `QemuBackend`: qemu-system-x86_64 -enable-kvm (the peer every benchmark compares against);
- `KataVmmBackend`: our VMM's CLI, `kata-vmm run --kernel K --initrd I --cmdline S --vcpus N --memory MiB`.

Add a back-end by implementing `Backend.command()` and naming it in `BACKENDS`.
"""

from framework.assets import GuestAssets, LabAssetError, in_labvm, initrd_with_files
from framework.microvm import (
    BACKENDS,
    Backend,
    GuestConfig,
    KataVmmBackend,
    MicroVM,
    MicroVMFactory,
    MicroVMTimeout,
    QemuBackend,
)
from framework.vsock import build_vsock_helper, vsock_echo

__all__ = [
    "BACKENDS",
    "Backend",
    "GuestAssets",
    "GuestConfig",
    "KataVmmBackend",
    "LabAssetError",
    "MicroVM",
    "MicroVMFactory",
    "MicroVMTimeout",
    "QemuBackend",
    "build_vsock_helper",
    "in_labvm",
    "initrd_with_files",
    "vsock_echo",
]
