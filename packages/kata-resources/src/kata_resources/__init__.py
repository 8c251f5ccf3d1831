"""Host resources for a sandbox: the shared directory, container rootfs mounts and volumes.

layout = ShareLayout("sb1")
ledger = layout.ledger(Path("/run/kata/sb1/mounts.json"))   # records what it mounts, with mount ids
exported = layout.create(ledger)      # mounts/ (host only) and shared/ (its read-only slave view)
mount_rootfs(containerd_mounts, layout.rootfs_host_path("c1"), ledger)
guest_mounts = share_volumes(spec["mounts"], layout, "c1", ledger)
...
ledger.undo(); layout.remove()        # never unmounts or deletes anything the ledger did not make
"""

from typing import TYPE_CHECKING, Any

from kata_resources.__about__ import __version__
from kata_resources._dns import MAX_RESOLV_CONF, RESOLV_CONF, dns_from_mounts
from kata_resources._errors import MountError, ResourceError, VolumeError
from kata_resources._ledger import (
    LedgerEntry,
    MountLedger,
    MountRecord,
    Recorder,
    read_mount_record,
    undo_mount_record,
    unmount_below,
    write_mount_record,
)
from kata_resources._mount import bind, mount, umount
from kata_resources._pod_shm import (
    DEFAULT_SHM_SIZE,
    GUEST_SANDBOX_SHM,
    pod_shm_mount,
    pod_shm_size,
    pod_shm_storage,
)
from kata_resources._rootfs import MountLike, mount_rootfs
from kata_resources._share_fs import (
    GUEST_SHARED_DIR,
    HOST_SHARED_ROOT,
    KATA_SHARED_TAG,
    ShareLayout,
    StorageSpec,
    remove_tree,
)
from kata_resources._sizing import (
    CONTAINER_TYPE,
    MAX_CPU_ID,
    SANDBOX_CPU_PERIOD,
    SANDBOX_CPU_QUOTA,
    SANDBOX_MEMORY,
    CpuRequest,
    MemoryPlan,
    ResourceUpdateOp,
    VcpuPlan,
    VmSize,
    parse_cpuset,
    static_vm_size,
    vcpus_required,
    workload_size,
)
from kata_resources._volumes import VolumeKind, VolumePlan, classify, share_volumes
from kata_sys_util import is_mountpoint, mounts_below, parse_options

if TYPE_CHECKING:
    from kata_resources._cgroups import (
        CGROUP_ROOT,
        CgroupError,
        CgroupLimits,
        SandboxCgroup,
        cgroup_relative_path,
        cgroup_version,
    )
    from kata_resources._netns import NetnsError, run_in_netns, to_thread_in_netns
    from kata_resources._network import (
        Endpoint,
        InterfaceSpec,
        IPAddressSpec,
        NeighborSpec,
        Network,
        NetworkError,
        NetworkModel,
        RouteSpec,
        rescan_network,
        rescan_network_sync,
        setup_network,
        setup_network_sync,
        tap_name,
        teardown_network,
        teardown_network_sync,
    )

# Network, netns and cgroup support pull in pyroute2, trio and cgroupspy (~0.4 s of imports on the host,
# seconds under emulation): imported on first use, so `containerd-shim-kata-v2 delete`, which only cleans up
# mounts, stays light enough for containerd's timeout.
_LAZY = {
    "CGROUP_ROOT": "_cgroups",
    "CgroupError": "_cgroups",
    "CgroupLimits": "_cgroups",
    "SandboxCgroup": "_cgroups",
    "cgroup_relative_path": "_cgroups",
    "cgroup_version": "_cgroups",
    "NetnsError": "_netns",
    "run_in_netns": "_netns",
    "to_thread_in_netns": "_netns",
    "Endpoint": "_network",
    "InterfaceSpec": "_network",
    "IPAddressSpec": "_network",
    "NeighborSpec": "_network",
    "Network": "_network",
    "NetworkError": "_network",
    "NetworkModel": "_network",
    "RouteSpec": "_network",
    "rescan_network": "_network",
    "rescan_network_sync": "_network",
    "setup_network": "_network",
    "setup_network_sync": "_network",
    "tap_name": "_network",
    "teardown_network": "_network",
    "teardown_network_sync": "_network",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None and name.startswith(("MS_", "MNT_")):
        # The mount flags live in kata-sys-util (one home); their old names here still import.
        import kata_sys_util

        if name in kata_sys_util.__all__:
            return getattr(kata_sys_util, name)
    if module is None:
        raise AttributeError(f"module 'kata_resources' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"kata_resources.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "CGROUP_ROOT",
    "CONTAINER_TYPE",
    "DEFAULT_SHM_SIZE",
    "GUEST_SANDBOX_SHM",
    "GUEST_SHARED_DIR",
    "HOST_SHARED_ROOT",
    "KATA_SHARED_TAG",
    "MAX_CPU_ID",
    "MAX_RESOLV_CONF",
    "RESOLV_CONF",
    "SANDBOX_CPU_PERIOD",
    "SANDBOX_CPU_QUOTA",
    "SANDBOX_MEMORY",
    "CgroupError",
    "CgroupLimits",
    "CpuRequest",
    "Endpoint",
    "IPAddressSpec",
    "InterfaceSpec",
    "LedgerEntry",
    "MemoryPlan",
    "MountError",
    "MountLedger",
    "MountLike",
    "MountRecord",
    "NeighborSpec",
    "NetnsError",
    "Network",
    "NetworkError",
    "NetworkModel",
    "Recorder",
    "ResourceError",
    "ResourceUpdateOp",
    "RouteSpec",
    "SandboxCgroup",
    "ShareLayout",
    "StorageSpec",
    "VcpuPlan",
    "VmSize",
    "VolumeError",
    "VolumeKind",
    "VolumePlan",
    "__version__",
    "bind",
    "cgroup_relative_path",
    "cgroup_version",
    "classify",
    "dns_from_mounts",
    "is_mountpoint",
    "mount",
    "mount_rootfs",
    "mounts_below",
    "parse_cpuset",
    "parse_options",
    "pod_shm_mount",
    "pod_shm_size",
    "pod_shm_storage",
    "read_mount_record",
    "remove_tree",
    "rescan_network",
    "rescan_network_sync",
    "run_in_netns",
    "setup_network",
    "setup_network_sync",
    "share_volumes",
    "static_vm_size",
    "tap_name",
    "teardown_network",
    "teardown_network_sync",
    "to_thread_in_netns",
    "umount",
    "undo_mount_record",
    "unmount_below",
    "vcpus_required",
    "workload_size",
    "write_mount_record",
]
