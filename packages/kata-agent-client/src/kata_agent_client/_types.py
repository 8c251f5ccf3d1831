"""Typed requests and results of the agent API: callers build these, never protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeVar


class _StdioPortFields(Protocol):
    stdin_port: int
    stdout_port: int
    stderr_port: int


_R = TypeVar("_R", bound=_StdioPortFields)


@dataclass(frozen=True)
class StdioPorts:
    """Passfd stdio: the host ports of the streams the VMM bridged from the shim's fds (0 = none)."""

    stdin: int = 0
    stdout: int = 0
    stderr: int = 0

    def set_on(self, request: _R) -> _R:
        """Set a CreateContainerRequest's or ExecProcessRequest's stdin/stdout/stderr_port; returns it."""
        request.stdin_port, request.stdout_port, request.stderr_port = self.stdin, self.stdout, self.stderr
        return request


@dataclass
class Process:
    """A process to run: the container's init or an exec."""

    args: list[str]
    env: list[str] = field(
        default_factory=lambda: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    )
    cwd: str = "/"
    terminal: bool = False
    uid: int = 0
    gid: int = 0
    console_rows: int = 0
    console_columns: int = 0
    no_new_privileges: bool = True


@dataclass
class Mount:
    """An OCI mount inside the container."""

    destination: str
    type: str
    source: str
    options: list[str] = field(default_factory=list)


def default_mounts() -> list[Mount]:
    """The usual /proc, /dev, /dev/pts, /dev/shm, /dev/mqueue and /sys mounts of a container."""
    return [
        Mount("/proc", "proc", "proc"),
        Mount("/dev", "tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        Mount(
            "/dev/pts", "devpts", "devpts", ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
        ),
        Mount("/dev/shm", "tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
        Mount("/dev/mqueue", "mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
        Mount("/sys", "sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
    ]


@dataclass
class Storage:
    """A storage the agent mounts before the container starts.

    `driver` is one of virtio-fs, blk, ephemeral, local, shm (upstream names).
    """

    driver: str
    mount_point: str
    source: str = ""
    fstype: str = ""
    options: list[str] = field(default_factory=list)
    driver_options: list[str] = field(default_factory=list)


@dataclass
class Device:
    """A guest block device (`vm_path`: a /dev node or PCI/MMIO path) shown at `container_path`."""

    vm_path: str
    container_path: str
    type: str = "blk"
    id: str = ""
    options: list[str] = field(default_factory=list)


@dataclass
class ContainerSpec:
    """What CreateContainer needs: the rootfs path in the guest and the init process, plus limits."""

    root: str
    process: Process
    hostname: str = ""
    readonly_root: bool = False
    mounts: list[Mount] = field(default_factory=default_mounts)
    annotations: dict[str, str] = field(default_factory=dict)
    memory_limit: int = 0
    cpu_shares: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    pids_limit: int = 0
    cgroups_path: str = ""
    namespaces: list[str] = field(default_factory=lambda: ["pid", "ipc", "uts", "mount"])
    masked_paths: list[str] = field(default_factory=lambda: ["/proc/kcore", "/proc/keys", "/sys/firmware"])
    readonly_paths: list[str] = field(default_factory=lambda: ["/proc/sys", "/proc/sysrq-trigger"])


@dataclass
class Resources:
    """Limits for UpdateContainer (0 = leave unchanged)."""

    memory_limit: int = 0
    cpu_shares: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    pids_limit: int = 0


@dataclass(frozen=True)
class MemoryEntry:
    """One memory counter of a cgroup (usage, swap or kernel)."""

    usage: int = 0
    max_usage: int = 0
    limit: int = 0
    failcnt: int = 0


@dataclass(frozen=True)
class BlkioEntry:
    """One line of a blkio list (`op` is Read, Write, Sync, Async, Total...)."""

    op: str
    major: int
    minor: int
    value: int


@dataclass(frozen=True)
class HugetlbStats:
    """Hugetlb usage of one page size."""

    usage: int
    max_usage: int
    failcnt: int


@dataclass(frozen=True)
class NetworkStats:
    """Counters of one guest network interface."""

    name: str
    rx_bytes: int = 0
    rx_packets: int = 0
    rx_errors: int = 0
    rx_dropped: int = 0
    tx_bytes: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0


#: The blkio lists of StatsContainer, by their agent.proto names.
BLKIO_LISTS = (
    "io_service_bytes_recursive",
    "io_serviced_recursive",
    "io_queued_recursive",
    "io_service_time_recursive",
    "io_wait_time_recursive",
    "io_merged_recursive",
    "io_time_recursive",
    "sectors_recursive",
)


@dataclass
class ContainerStats:
    """Everything StatsContainer answers: the container's cgroup (memory, CPU, pids, blkio, hugetlb) and
    the guest's network interfaces."""

    memory_usage: int
    memory_max_usage: int
    memory_limit: int
    memory_cache: int
    cpu_total_ns: int
    cpu_user_ns: int
    cpu_kernel_ns: int
    pids_current: int
    pids_limit: int
    memory_stats: dict[str, int] = field(default_factory=dict)
    memory_failcnt: int = 0
    memory_swap: MemoryEntry = field(default_factory=MemoryEntry)
    memory_kernel: MemoryEntry = field(default_factory=MemoryEntry)
    cpu_per_cpu_ns: list[int] = field(default_factory=list)
    throttling_periods: int = 0
    throttled_periods: int = 0
    throttled_time_ns: int = 0
    hugetlb: dict[str, HugetlbStats] = field(default_factory=dict)
    """page size (e.g. "2MB") -> usage"""
    blkio: dict[str, list[BlkioEntry]] = field(default_factory=dict)
    """one of BLKIO_LISTS -> its entries"""
    network: list[NetworkStats] = field(default_factory=list)


@dataclass
class GuestDetails:
    """GetGuestDetails."""

    mem_block_size_bytes: int
    support_mem_hotplug_probe: bool
    agent_version: str
    init_daemon: bool
    storage_handlers: list[str]


@dataclass
class AgentVersion:
    """Health.Version."""

    grpc_version: str
    agent_version: str
