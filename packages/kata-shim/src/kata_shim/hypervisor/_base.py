"""The hypervisor interface every back-end implements (runtime-rs `hypervisor::Hypervisor`, trimmed).

A back-end owns one VM. The sandbox manager drives it in this order::

    hv = HYPERVISORS["dragonball"](config)          # HypervisorConfig from [hypervisor.<name>]
    await hv.prepare_vm(sandbox_id, netns)           # state dir, vsock socket path; nothing runs yet
    caps = hv.capabilities()                         # what it can do: passfd, hot-plug kinds, addressing...
    await hv.add_device(ShareFsDevice(...))          # cold-plugged devices, before start_vm
    await hv.start_vm(timeout)                       # the guest kernel runs; the agent comes up later
    address = hv.agent_address()                     # "hvsock:<uds>:1024" for kata_agent_client.connect
    await hv.add_device(BlockDevice(...))            # hot-plug, for the kinds `caps.hotplug` names
    await hv.remove_device(device)                   # hot-unplug one added earlier
    old, new = await hv.resize_vcpu(1, 3)            # vCPU hot-add/remove ("vcpu" in `caps.hotplug`)
    mib, mem = await hv.resize_memory(1024)          # memory hot-plug ("memory" in `caps.hotplug`)
    ...
    await hv.stop_vm(); await hv.cleanup()

With `capabilities().snapshot`, `save_vm(dir)` saves a running VM (the VM template) and `restore_from(dir)`
before `start_vm` makes `start_vm` restore that save and resume it instead of booting.

Every method is called from the shim's trio thread. A back-end may start OS threads (vCPUs, the VMM's event
thread) but never one per container.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

HotplugKind = Literal["block", "net", "vcpu", "memory"]
AgentTransport = Literal["hvsock", "vsock"]
DeviceAddressing = Literal["mmio", "pci"]


class HypervisorError(Exception):
    """A hypervisor back-end failed (bad config, missing kernel, VM crashed, device refused)."""


@dataclass
class HypervisorConfig:
    """`[hypervisor.<name>]` of Kata's configuration.toml (the keys the back-ends read)."""

    path: str = ""
    """The VMM binary (external back-ends); unused by dragonball."""
    kernel: Path = Path()
    image: Path | None = None
    """Guest root image, attached read-only as the first block device."""
    initrd: Path | None = None
    kernel_params: str = ""
    default_vcpus: int = 1
    default_maxvcpus: int = 0
    default_memory: int = 512
    """MiB."""
    default_maxmemory: int = 0
    """MiB the VM may grow to by memory hot-plug; 0: the host's memory (as upstream)."""
    enable_virtio_mem: bool = False
    """Memory hot-plug through virtio-mem (dragonball: a region above RAM reserved at boot, `resize_memory`
    plugs and unplugs it; the guest onlines what is plugged: ``memhp_default_state=online``)."""
    shared_fs: str = "inline-virtio-fs"
    block_device_driver: str = "virtio-mmio"
    enable_debug: bool = False

    def max_vcpus(self) -> int:
        """The most vCPUs a VM may have (hot-plug up to it): ``default_maxvcpus``, 0 meaning the host's
        CPUs (as upstream), never below ``default_vcpus``."""
        return max(self.default_maxvcpus or os.cpu_count() or 1, self.default_vcpus)

    # --- external VMMs (qemu); upstream configuration-qemu-runtime-rs.toml's names and meanings ---
    valid_hypervisor_paths: list[str] = field(default_factory=list)
    """Globs `path` must match (empty: any)."""
    machine_type: str = "q35"
    machine_accelerators: str = ""
    """Extra ``-machine`` options, comma-separated; an ``accel=`` here replaces the default ``accel=kvm``."""
    cpu_features: str = ""
    """Appended to ``-cpu host`` (``-cpu max`` without KVM), e.g. ``pmu=off``."""
    virtio_fs_daemon: str = ""
    """The virtiofsd binary (`shared_fs` = "virtio-fs")."""
    valid_virtio_fs_daemon_paths: list[str] = field(default_factory=list)
    """Globs `virtio_fs_daemon` must match (empty: any)."""
    virtio_fs_cache: str = "auto"
    virtio_fs_extra_args: list[str] = field(default_factory=list)
    virtio_fs_queue_size: int = 1024
    disable_vhost_net: bool = False
    entropy_source: str = "/dev/urandom"
    pcie_root_port: int = 0
    """q35: the pcie-root-port devices cold-plugged for PCI hot-plug (one hot-plugged device each); 0 means
    the back-end's default (qemu: 4). Upstream's key (there: ports for cold-plugged VFIO)."""
    extra: dict[str, object] = field(default_factory=dict)
    """Keys we read but do not act on yet (kept for `kata-shim config` output and errors)."""


@dataclass(frozen=True)
class ShareFsDevice:
    """A host directory shared into the guest with virtio-fs under ``mount_tag``."""

    host_path: Path
    mount_tag: str = "kataShared"


@dataclass(frozen=True)
class BlockDevice:
    """A file or block device attached as virtio-blk."""

    path: Path
    read_only: bool = False
    device_id: str = ""
    follow_symlinks: bool = True
    """False: the back-end opens ``path`` with O_NOFOLLOW (a symlink there is refused, not followed), or
    refuses the device when it can only hand its VMM a path (a block snapshotter's loop file)."""


@dataclass(frozen=True)
class NetworkDevice:
    """A tap interface on the host (in the sandbox's netns) offered to the guest as virtio-net."""

    tap: str
    mac: str


Device = ShareFsDevice | BlockDevice | NetworkDevice


@dataclass(frozen=True)
class DeviceInfo:
    """Where the guest sees an added device, as the back-end's VMM assigned it (used to build agent
    Storage/Device entries). A back-end fills the address form its `Capabilities.device_addressing` names."""

    guest_path: str = ""
    """e.g. /dev/vdb for a block device; empty when not known in advance."""
    mmio_address: int = 0
    """Base address of its virtio-mmio window (the agent's `mmioblk` source is this in hex); 0 on PCI."""
    pci_path: str = ""
    """Its PCI path as upstream writes it ("bb/dd": bridge slot / device slot, hex); empty on virtio-mmio."""


@dataclass(frozen=True)
class MemoryConfig:
    """How a memory resize reached the guest (runtime-rs ``MemoryConfig``): the hot-plugged memory's slot,
    size and guest-physical address, and whether the guest must be told through its memory probe
    interface (``probe``; never with virtio-mem, whose driver plugs and onlines on its own)."""

    slot: int = 0
    size_mib: int = 0
    addr: int = 0
    probe: bool = False


@dataclass(frozen=True)
class Capabilities:
    """What a back-end can do (runtime-rs `Hypervisor::capabilities`, kata-types `CapabilityBits`).

    Callers ask this instead of checking a back-end's name. Upstream's bits map to: `block_device`
    (BlockDeviceSupport), `block_device_hotplug` (BlockDeviceHotplugSupport: "block" in `hotplug`),
    `multi_queue` (MultiQueueSupport), `fs_sharing` (FsSharingSupport: `shared_fs` not empty),
    `hybrid_vsock` (HybridVsockSupport: `agent_transport` "hvsock"), `guest_memory_probe` (GuestMemoryProbe).
    `passfd` and `device_addressing` have no upstream bit: runtime-rs decides them by back-end.
    """

    block_device: bool = False
    """Block devices can be attached."""
    hotplug: frozenset[HotplugKind] = frozenset()
    """What `add_device` (or a resize) accepts after `start_vm`."""
    multi_queue: bool = False
    """Devices (virtio-net, virtio-blk) can have several queue pairs."""
    shared_fs: frozenset[str] = frozenset()
    """The `shared_fs` values it serves ("inline-virtio-fs", "virtio-fs", ...)."""
    guest_memory_probe: bool = False
    """Hot-added memory is announced through the guest's memory probe interface."""
    agent_transport: AgentTransport = "vsock"
    """How `agent_address` reaches the agent: "hvsock" (a host unix socket, `CONNECT <port>`) or "vsock"."""
    passfd: bool = False
    """Host fds (stdio fifos) can be handed to the guest over the hybrid vsock (passfd stdio)."""
    device_addressing: DeviceAddressing = "mmio"
    """How an added device shows up in the guest: a virtio-mmio window or a PCI path (`DeviceInfo`)."""
    snapshot: bool = False
    """A running VM can be saved (`save_vm`) and a new one started from the save (`restore_from`): what a
    VM template (`[factory] enable_template`) needs. No upstream bit: runtime-rs's factory asks the
    back-end."""

    @property
    def block_device_hotplug(self) -> bool:
        """Block devices can be added after `start_vm`."""
        return "block" in self.hotplug

    @property
    def fs_sharing(self) -> bool:
        """A host directory can be shared into the guest."""
        return bool(self.shared_fs)

    @property
    def hybrid_vsock(self) -> bool:
        """The agent is reached through a hybrid vsock."""
        return self.agent_transport == "hvsock"


class Hypervisor(Protocol):
    """One VM driven by the shim."""

    name: str
    config: HypervisorConfig

    def capabilities(self) -> Capabilities:
        """What this back-end can do (constant for its life; callable before `prepare_vm`)."""

    async def prepare_vm(self, sandbox_id: str, netns: str | None) -> None:
        """Validate the config (kernel and image exist...), create per-sandbox state; start nothing."""

    async def add_device(self, device: Device) -> DeviceInfo:
        """Cold-plug a device before `start_vm` (hot-plug after it, for the kinds `capabilities().hotplug`
        names); returns where the guest sees it, from what the VMM assigned."""

    async def remove_device(self, device: Device) -> None:
        """Hot-unplug a device `add_device` added (the guest lets it go first); `HypervisorError` when the
        back-end cannot (no such device, no hot-plug of its kind, the guest refused)."""

    async def resize_vcpu(self, old_vcpus: int, new_vcpus: int) -> tuple[int, int]:
        """Grow or shrink the running guest's vCPUs towards ``new_vcpus`` (capped at ``default_maxvcpus``,
        as runtime-rs does); returns (vCPUs before, vCPUs now). `HypervisorError` without "vcpu" hot-plug."""

    async def resize_memory(self, new_mib: int) -> tuple[int, MemoryConfig]:
        """Grow or shrink the running guest's memory towards ``new_mib`` MiB (capped at what the VM can
        hold: ``default_maxmemory``); returns (MiB the guest has now, how the change reached it), as
        runtime-rs's ``resize_memory``. `HypervisorError` without "memory" hot-plug."""

    async def start_vm(self, timeout: float) -> None:  # noqa: ASYNC109 (runtime-rs signature)
        """Boot the guest; raise `HypervisorError` (with the console tail) if it dies or times out."""

    async def stop_vm(self) -> None:
        """Stop the guest now; idempotent."""

    async def wait_vm(self) -> int:
        """Return when the guest has stopped, with 0 for a clean power-off."""

    def exit_reason(self) -> str:
        """How the guest ended, for the log and the error a dead sandbox reports (empty while it runs)."""

    def console_tail(self) -> str:
        """The guest's last console lines (empty when it printed none), for errors about the guest."""

    async def pause_vm(self) -> None:
        """Freeze every vCPU."""

    async def resume_vm(self) -> None:
        """Undo `pause_vm`."""

    async def save_vm(self, directory: Path) -> None:
        """Pause the running VM and save it into `directory` (new) as a template; the VM stays paused
        (`stop_vm`/`cleanup` it). Only when `capabilities().snapshot`; else `HypervisorError`."""

    def restore_from(self, directory: Path | None) -> None:
        """Before `start_vm`: start the VM by restoring the save in `directory` (a `save_vm` of a VM with
        the same config and device kinds, in the same order) and resuming it, instead of booting; None
        boots. Only when `capabilities().snapshot`; else `HypervisorError`."""

    def agent_address(self) -> str:
        """Where `kata_agent_client.connect` reaches the agent.

        e.g. ``hvsock:/run/kata/<id>/kata.hvsock:1024``."""

    def set_passfd_listener_port(self, port: int) -> None:
        """Before `start_vm`: turn on passfd stdio with the agent listening on guest vsock `port` (0 = off).

        Only called when `capabilities().passfd`; a back-end that cannot pass fds ignores it (its
        `passfd_listener` stays None)."""

    def passfd_listener(self) -> tuple[Path, int] | None:
        """Where passfd fds go: (hybrid vsock socket, guest port), or None when passfd stdio is off."""

    def pids(self) -> list[int]:
        """Host processes this VM owns (the shim itself in built-in mode)."""

    def thread_ids(self) -> list[int]:
        """Native thread ids of the VMM's threads (vCPUs, event thread)."""

    def vcpu_thread_ids(self) -> list[int]:
        """Native thread ids of the vCPU threads only (they go into the sandbox cgroup)."""

    async def cleanup(self) -> None:
        """Release everything `prepare_vm` and later calls created (idempotent; used after a crash too)."""


HypervisorFactory = Callable[[HypervisorConfig], Hypervisor]
