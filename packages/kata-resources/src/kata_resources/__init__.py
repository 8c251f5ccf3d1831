"""Host resources for a sandbox: the shared directory, container rootfs mounts and volumes.

layout = ShareLayout("sb1"); layout.create()
ledger = MountLedger.to_file(Path("/run/kata/sb1/mounts.json"))
mount_rootfs(containerd_mounts, layout.rootfs_host_path("c1"), ledger)
guest_mounts = share_volumes(spec["mounts"], layout, "c1", ledger)
...
ledger.undo(); layout.remove()
"""

from kata_resources.__about__ import __version__
from kata_resources._cgroups import (
    CGROUP_ROOT,
    CgroupError,
    CgroupLimits,
    SandboxCgroup,
    cgroup_relative_path,
    cgroup_version,
)
from kata_resources._dns import MAX_RESOLV_CONF, RESOLV_CONF, dns_from_mounts
from kata_resources._errors import MountError, ResourceError, VolumeError
from kata_resources._ledger import (
    MountLedger,
    Recorder,
    read_mount_record,
    undo_mount_record,
    write_mount_record,
)
from kata_resources._mount import (
    MNT_DETACH,
    MS_BIND,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_SHARED,
    MS_SLAVE,
    bind,
    is_mountpoint,
    mount,
    mounts_below,
    parse_options,
    umount,
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
)
from kata_resources._sizing import (
    CONTAINER_TYPE,
    SANDBOX_CPU_PERIOD,
    SANDBOX_CPU_QUOTA,
    SANDBOX_MEMORY,
    VmSize,
    static_vm_size,
    workload_size,
)
from kata_resources._volumes import VolumeKind, VolumePlan, classify, share_volumes

__all__ = [
    "CGROUP_ROOT",
    "CONTAINER_TYPE",
    "DEFAULT_SHM_SIZE",
    "GUEST_SANDBOX_SHM",
    "GUEST_SHARED_DIR",
    "HOST_SHARED_ROOT",
    "KATA_SHARED_TAG",
    "MAX_RESOLV_CONF",
    "MNT_DETACH",
    "MS_BIND",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "MS_SHARED",
    "MS_SLAVE",
    "RESOLV_CONF",
    "SANDBOX_CPU_PERIOD",
    "SANDBOX_CPU_QUOTA",
    "SANDBOX_MEMORY",
    "CgroupError",
    "CgroupLimits",
    "Endpoint",
    "IPAddressSpec",
    "InterfaceSpec",
    "MountError",
    "MountLedger",
    "MountLike",
    "NeighborSpec",
    "NetnsError",
    "Network",
    "NetworkError",
    "NetworkModel",
    "Recorder",
    "ResourceError",
    "RouteSpec",
    "SandboxCgroup",
    "ShareLayout",
    "StorageSpec",
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
    "parse_options",
    "pod_shm_mount",
    "pod_shm_size",
    "pod_shm_storage",
    "read_mount_record",
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
    "workload_size",
    "write_mount_record",
]
