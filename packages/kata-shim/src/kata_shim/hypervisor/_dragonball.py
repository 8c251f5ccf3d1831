"""The built-in back-end: kata_vmm (our Dragonball) inside the shim process, driven from trio.

Nothing runs in another process: the VM's vCPU threads and its event thread (virtio devices, hybrid vsock,
inline virtio-fs) live in the shim. Device order on the virtio-mmio slots, which is the guest's probe order:

    0  the guest image (`[hypervisor.dragonball] image`), read-only: /dev/vda
    1  hybrid vsock, unix socket <state dir>/kata.hvsock (guest CID 3)
    2  virtio-rng (the guest's entropy at boot)
    3… the devices `add_device` was given, in that order (block devices become /dev/vdb, /dev/vdc, …)

`prepare_vm` opens a `kata_vmm.VmmBuilder`; `add_device` hands it the device's spec and answers with the slot
the builder assigned (its window is the `DeviceInfo.mmio_address`), and `start_vm` builds the VM with every
device on exactly that slot: the back-end never predicts where the VMM puts a device.

With ``enable_virtio_mem`` the VM has a memory hot-plug region (up to ``default_maxmemory``) served by a
virtio-mem device on the slot after the others, and `resize_memory` asks the guest's virtio_mem driver to
plug or unplug it (no upcall: the device's config-change interrupt is the request; the command line says
``memhp_default_state=online`` so the guest onlines what it plugs).

After `start_vm`, `add_device` hot-plugs block and network devices and `resize_vcpu` adds or removes
vCPUs, Dragonball's way: kata_vmm plugs the device (lowest free slot) or creates the vCPU, then an upcall
request (AddMmio, AddCpu...) tells the guest's `kata_upcall_srv` module. The upcall client runs over the VM's
own vsock device, opened on the first hot-plug and kept until the VM stops. Anything the guest refuses, or
leaves unanswered past `upcall_timeout`, is a `HypervisorError` naming the request, and kata_vmm has undone
the host side (the slot is free, the device and its fds closed).

A guest exit is noticed through `kata_vmm.Vmm.exit_fd()` with `trio.lowlevel.wait_readable`: no thread is
parked waiting for the VM. The console (serial) goes to this module's logger line by line, and its last
lines are kept for the error raised when the guest dies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import select
from collections.abc import Callable
from pathlib import Path

import trio

import kata_vmm
from kata_proto.agent import AGENT_VSOCK_PORT, PASSFD_CMDLINE_PARAM
from kata_resources import to_thread_in_netns
from kata_shim.hypervisor._base import (
    BlockDevice,
    Capabilities,
    Device,
    DeviceInfo,
    HypervisorConfig,
    HypervisorError,
    MemoryConfig,
    NetworkDevice,
    ShareFsDevice,
)
from kata_shim.hypervisor._common import (
    ConsoleSink,
    check_guest,
    disk_letters,
    guest_cmdline,
    make_state_dir,
    netns_path,
)
from kata_shim.hypervisor._upcall import UpcallSession
from kata_upcall import Handshake, StreamConnector, UpcallError
from kata_vmm import (
    BlockSpec,
    DeviceSpec,
    FsPolicy,
    FsSpec,
    MmioSlot,
    NetSpec,
    RngSpec,
    VirtioError,
    VmConfig,
    Vmm,
    VmmBuilder,
    VmmError,
    VmStateError,
    VsockSpec,
    hot_add_vcpus,
    hot_add_virtio,
    hot_remove_vcpus,
    hot_remove_virtio,
    open_tap,
    upcall_connector,
)

log = logging.getLogger("kata_shim.hypervisor.dragonball")

HVSOCK_NAME = "kata.hvsock"
SANDBOX_SHARE_POLICY = FsPolicy(allow_chown=True)
"""What the guest may do through the sandbox's virtio-fs share: containers own their rootfs, so chown is
theirs to do (files created through FUSE start as root's, the container's user takes them over); device
nodes, setuid/setgid bits and security./trusted./system. xattrs stay refused, and the host side of the
share is nosuid,nodev."""
STOP_TIMEOUT = 15.0
UPCALL_TIMEOUT = 60.0
"""Seconds one upcall request may take (connecting to the guest's server included): under TCG a guest
probes a new virtio-mmio device in seconds, not milliseconds."""
CAPABILITIES = Capabilities(
    block_device=True,
    hotplug=frozenset({"block", "net", "vcpu"}),  # upcall; memory (virtio-mem) not through the shim yet
    multi_queue=False,
    shared_fs=frozenset({"inline-virtio-fs", "virtio-fs"}),
    guest_memory_probe=False,
    agent_transport="hvsock",
    passfd=True,
    device_addressing="mmio",
    snapshot=True,
)
"""What the built-in VMM can do (upstream's dragonball also has multi-queue and memory hot-plug)."""

MEMORY_RESIZE_TIMEOUT = 60.0
"""Seconds `resize_memory` waits for the guest's virtio_mem driver to reach the requested size (it plugs
2 MiB blocks in batches; under TCG that takes seconds); then it returns what the guest has."""
MEMORY_POLL = 0.05
HOTPLUG_ALIGN_MIB = 128
"""The hot-plug region's size unit (the guest adds memory in 128 MiB memory blocks)."""
ONLINE_CMDLINE = "memhp_default_state=online"
"""Debian's kernel leaves hot-added memory offline; this onlines each block virtio_mem adds."""

UpcallOpener = Callable[[Vmm], tuple[StreamConnector, Handshake]]
"""How the upcall client reaches the guest's upcall server of a running VM: a stream factory and the
handshake its streams need (default: the VM's own vsock device, `kata_vmm.upcall_connector`)."""


def _vsock_upcall(vmm: Vmm) -> tuple[StreamConnector, Handshake]:
    return upcall_connector(vmm), Handshake.ACCEPT_LINE


class Dragonball:
    """`Hypervisor` back-end running kata_vmm in this process (runtime-rs `dragonball`)."""

    name = "dragonball"

    def __init__(
        self,
        config: HypervisorConfig,
        *,
        state_root: Path | None = None,
        upcall: UpcallOpener = _vsock_upcall,
        upcall_timeout: float = UPCALL_TIMEOUT,
        memory_resize_timeout: float = MEMORY_RESIZE_TIMEOUT,
    ) -> None:
        self.config = config
        self.memory_resize_timeout = memory_resize_timeout
        """Seconds `resize_memory` waits for the guest to plug or unplug what it asked."""
        self._state_root = state_root
        self._open_upcall = upcall
        self.upcall_timeout = upcall_timeout
        """Seconds an upcall request (hot-plug) may take before it fails with `HypervisorError`."""
        self._upcall: UpcallSession | None = None
        self._hotplug_lock = trio.Lock()
        self._disk_index: dict[MmioSlot, int] = {}
        """Running VM: the kernel's disk index (vda = 0) of each block device's slot."""
        self.sandbox_id = ""
        self.state_dir: Path | None = None
        self.netns: str | None = None
        self._devices: list[tuple[Device, MmioSlot]] = []
        self._builder: VmmBuilder | None = None
        self._vmm: Vmm | None = None
        self._console = ConsoleSink(log)
        self._exited = trio.Event()
        self._stopped = False
        self._cleaned = False
        self._passfd_port = 0
        self._template: Path | None = None

    # --- set-up ------------------------------------------------------------------------------------
    @property
    def hvsock_path(self) -> Path:
        """The hybrid vsock's unix socket (valid after `prepare_vm`)."""
        if self.state_dir is None:
            raise HypervisorError("prepare_vm() has not run")
        return self.state_dir / HVSOCK_NAME

    def _check_config(self) -> None:
        cfg = self.config
        check_guest(cfg, self.name, CAPABILITIES)
        if cfg.block_device_driver not in ("virtio-mmio", "virtio-blk", "virtio-blk-mmio"):
            raise HypervisorError(
                f"block_device_driver {cfg.block_device_driver!r} is not supported by dragonball"
            )

    async def prepare_vm(self, sandbox_id: str, netns: str | None) -> None:
        """Check the config (kernel, initrd, image exist) and create /run/kata/<sandbox id>/."""
        self._check_config()
        # the hybrid vsock's guest-initiated sockets are <path>_<port>
        state_dir = make_state_dir(
            sandbox_id, self._state_root, (HVSOCK_NAME,), room=len("_65535"), mode=0o777
        )
        self.sandbox_id = sandbox_id
        self.state_dir = state_dir
        self.netns = netns
        self._builder = VmmBuilder(self._vm_config())
        if cfg_image := self.config.image:
            self._builder.add_device(BlockSpec(Path(cfg_image), read_only=True))
        self._builder.add_device(VsockSpec(self.hvsock_path))
        self._builder.add_device(RngSpec())
        # the vCPU kick handler is a signal handler: install it here, on the shim's main (trio) thread
        kata_vmm.install_kick_handler()

    def capabilities(self) -> Capabilities:
        """Block devices, virtio-fs, hybrid vsock with passfd, virtio-mmio addressing; hot-plug of block
        and network devices and vCPUs through upcall; with ``enable_virtio_mem`` memory hot-plug too (and
        no snapshot: kata_vmm cannot save a VM with a virtio-mem region yet)."""
        if self.config.enable_virtio_mem:
            return dataclasses.replace(
                CAPABILITIES, hotplug=CAPABILITIES.hotplug | {"memory"}, snapshot=False
            )
        return CAPABILITIES

    def hotplug_region_mib(self) -> int:
        """MiB of the memory hot-plug region: up to ``default_maxmemory`` (0: the host's memory) above
        ``default_memory``, in 128 MiB units, at least one; 0 without ``enable_virtio_mem``."""
        cfg = self.config
        if not cfg.enable_virtio_mem:
            return 0
        top = cfg.default_maxmemory or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
        room = max(top - cfg.default_memory, HOTPLUG_ALIGN_MIB)
        return -(-room // HOTPLUG_ALIGN_MIB) * HOTPLUG_ALIGN_MIB

    def max_vcpus(self) -> int:
        """The most vCPUs the VM may have: ``default_maxvcpus`` (0: the host's CPUs, as upstream), never
        below ``default_vcpus``; the guest's MADT lists them all (the extra ones for hot-add)."""
        return self.config.max_vcpus()

    def _vm_config(self) -> VmConfig:
        cfg = self.config
        return VmConfig(
            kernel=Path(cfg.kernel),
            initrd=Path(cfg.initrd) if cfg.initrd is not None else None,
            cmdline=self.cmdline(),
            vcpus=cfg.default_vcpus,
            memory_mib=cfg.default_memory,
            console_output=self._console,
            max_vcpus=self.max_vcpus(),
            memory_hotplug_mib=self.hotplug_region_mib(),
        )

    async def add_device(self, device: Device) -> DeviceInfo:
        """Cold-plug a device before `start_vm`, hot-plug a block or network device after it; says where
        the guest sees it, from the slot the VMM (builder) assigned."""
        if self.state_dir is None or self._builder is None:
            raise HypervisorError("add_device() before prepare_vm()")
        if self._vmm is not None:
            return await self._hot_add(device)
        spec = self._spec_for(device)
        try:
            slot = self._builder.add_device(spec)
        except VmmError as err:
            raise HypervisorError(f"dragonball: {err}") from err
        self._devices.append((device, slot))
        guest_path = ""
        if isinstance(spec, BlockSpec):
            guest_path = "/dev/vd" + disk_letters(self._block_index(slot))
        return DeviceInfo(guest_path=guest_path, mmio_address=int(slot.base))

    def _block_index(self, slot: MmioSlot) -> int:
        """The kernel names virtio-blk disks in probe (slot) order: count the ones before ``slot``."""
        assert self._builder is not None
        return sum(isinstance(spec, BlockSpec) for s, spec in self._builder.devices if s.index < slot.index)

    # one function per device kind: checks it, and says which kata_vmm spec serves it
    @functools.singledispatchmethod
    def _spec_for(self, device: object) -> DeviceSpec:
        raise HypervisorError(f"dragonball cannot attach a {type(device).__name__}")

    @_spec_for.register
    def _share_fs_spec(self, device: ShareFsDevice) -> DeviceSpec:
        if self.config.shared_fs in ("none", ""):
            raise HypervisorError("shared_fs is off in the configuration; cannot share a directory")
        if not device.host_path.is_dir():
            raise HypervisorError(f"shared directory {device.host_path} not found")
        if any(isinstance(d, ShareFsDevice) and d.mount_tag == device.mount_tag for d, _ in self._devices):
            raise HypervisorError(f"virtio-fs tag {device.mount_tag!r} is already in use")
        return FsSpec(device.mount_tag, device.host_path, policy=SANDBOX_SHARE_POLICY)

    @_spec_for.register
    def _block_spec(self, device: BlockDevice) -> DeviceSpec:
        if not device.path.exists():
            raise HypervisorError(f"block device {device.path} not found")
        return BlockSpec(device.path, read_only=device.read_only, follow_symlinks=device.follow_symlinks)

    @_spec_for.register
    def _network_spec(self, device: NetworkDevice) -> DeviceSpec:
        # the tap is opened in the pod's netns by start_vm, which puts the open fd in this slot's spec
        return NetSpec(device.tap, device.mac or None)

    def cmdline(self) -> str:
        """The guest kernel command line."""
        passfd = [f"{PASSFD_CMDLINE_PARAM}={self._passfd_port}"] if self._passfd_port else []
        online = [ONLINE_CMDLINE] if self.config.enable_virtio_mem else []
        return guest_cmdline(self.config, *online, *passfd)

    def device_specs(self) -> list[DeviceSpec]:
        """The kata_vmm device specs in slot order, as the VMM builder holds them."""
        return [spec for _slot, spec in self._builder.devices] if self._builder is not None else []

    # --- running -----------------------------------------------------------------------------------
    async def _open_tap(self, device: NetworkDevice) -> int:
        """Open the device's tap inside the pod's netns (a thread of its own enters it, so no trio worker
        ever runs there)."""
        try:
            if self.netns is None:
                return await trio.to_thread.run_sync(open_tap, device.tap)
            return await to_thread_in_netns(netns_path(self.netns), open_tap, device.tap)
        except (VirtioError, OSError) as err:
            where = f" in network namespace {self.netns}" if self.netns else ""
            raise HypervisorError(f"dragonball: tap {device.tap}{where}: {err}") from err

    async def _open_taps(self) -> dict[MmioSlot, int]:
        """Open each network device's tap (`_open_tap`), by slot; on failure the taps opened so far are
        closed."""
        fds: dict[MmioSlot, int] = {}
        try:
            for device, slot in self._devices:
                if isinstance(device, NetworkDevice):
                    fds[slot] = await self._open_tap(device)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return fds

    def _give_taps(self, builder: VmmBuilder, tap_fds: dict[MmioSlot, int]) -> None:
        """Put each open tap in its slot's spec: from here the builder (then the device) owns the fd."""
        specs = dict(builder.devices)
        for slot, fd in tap_fds.items():
            spec = specs[slot]
            assert isinstance(spec, NetSpec)
            builder.replace_device(slot, dataclasses.replace(spec, fd=fd))

    def _boot(self, builder: VmmBuilder) -> Vmm:
        """Build the VM (every device on the slot `add_device` reported) and start it, on a worker thread:
        reading the kernel and images blocks."""
        builder.config = self._vm_config()  # the command line (passfd port) and size as they are now
        try:
            return builder.start()
        except VmmError as err:
            raise HypervisorError(f"dragonball: {err}") from err
        except OSError as err:
            raise HypervisorError(f"dragonball: {err}") from err

    def _restore(self, builder: VmmBuilder, directory: Path) -> Vmm:
        """Restore the save in `directory` with this sandbox's devices (each on the slot the save has,
        which is the slot the builder gave: same kinds in the same order) and resume it, on a worker
        thread (the memory files are opened and mapped)."""
        specs = [spec for _slot, spec in builder.devices]
        if any(isinstance(spec, NetSpec) for spec in specs):
            # the caller cold-boots a pod with a NIC (a template has none): never reached from the sandbox
            raise HypervisorError("dragonball: a VM with a network device cannot start from a template")
        config = dataclasses.replace(self._vm_config(), devices=specs)
        builder.close()  # spent: Vmm.restore builds the devices from the specs (none holds an fd here)
        try:
            vmm = Vmm.restore(directory, config)
        except VmmError as err:
            raise HypervisorError(f"dragonball: restoring template {directory}: {err}") from err
        try:
            vmm.resume()
        except BaseException:
            vmm.close()
            raise
        return vmm

    def restore_from(self, directory: Path | None) -> None:
        """`start_vm` restores the save in `directory` (a `save_vm` of a VM with this config and these device
        kinds) and resumes it instead of booting; None boots."""
        if self._vmm is not None:
            raise HypervisorError("restore_from() after start_vm()")
        self._template = directory

    async def save_vm(self, directory: Path) -> None:
        """Pause the VM and write it into `directory` (new): kata_vmm's snapshot, memory files read-only.
        The VM stays paused."""
        vmm = self._require_vmm()
        try:
            vmm.pause()
            await trio.to_thread.run_sync(vmm.snapshot, directory)
        except VmmError as err:
            raise HypervisorError(f"dragonball: saving the VM to {directory}: {err}") from err

    async def start_vm(self, timeout: float) -> None:  # noqa: ASYNC109 (runtime-rs signature)
        """Configure and start the VM; the guest kernel then boots on the vCPU threads (or, after
        `restore_from`, the saved VM is restored and resumed: its guest runs on from where it was saved).

        Returns once the vCPUs run; a guest that dies before that raises `HypervisorError` with the console
        tail. Waiting for the agent is the caller's (it dials the vsock with its own timeout)."""
        if self.state_dir is None:
            raise HypervisorError("start_vm() before prepare_vm()")
        if self._vmm is not None:
            raise HypervisorError("start_vm() called twice")
        # set-up is bounded work (mmap, read the kernel and initrd); `timeout` is the caller's budget for
        # the agent, which it spends dialling the vsock
        builder = self._builder
        assert builder is not None
        # the kernel's disk index of each cold-plugged disk (hot-plug takes the lowest free one)
        self._disk_index = {
            slot: self._block_index(slot) for slot, spec in builder.devices if isinstance(spec, BlockSpec)
        }
        template = self._template
        if template is not None:
            self._vmm = await trio.to_thread.run_sync(self._restore, builder, template)
        else:
            tap_fds = await self._open_taps()
            self._give_taps(builder, tap_fds)
            self._vmm = await trio.to_thread.run_sync(self._boot, builder)
        # one watcher per VM (trio lets one task wait on an fd); wait_vm and stop_vm wait on its Event
        trio.lowlevel.spawn_system_task(
            self._watch_exit, self._vmm, name=f"dragonball-exit-{self.sandbox_id}"
        )
        log.info(
            "sandbox %s: VM %s (%d vCPU, %d MiB, cmdline %r)",
            self.sandbox_id,
            f"restored from template {template}" if template is not None else "started",
            self.config.default_vcpus,
            self.config.default_memory,
            self.cmdline(),
        )
        if self._exited_nowait():
            raise HypervisorError(self._crash_message())

    # --- hot-plug (upcall) ----------------------------------------------------------------------------
    def _upcall_session(self) -> UpcallSession:
        """The VM's upcall session (made on first use; call with the hot-plug lock held)."""
        vmm = self._require_vmm()
        if self._upcall is None:
            if self._stopped:
                raise HypervisorError("dragonball: the VM is stopping; no hot-plug")
            self._upcall = UpcallSession(self.sandbox_id, lambda: self._open_upcall(vmm), self.upcall_timeout)
        return self._upcall

    async def _hot_add(self, device: Device) -> DeviceInfo:
        """Plug a block or network device into the running VM and have the guest register it (upcall
        AddMmio). On any failure kata_vmm has taken it out again (slot free, fds closed)."""
        vmm = self._require_vmm()
        if isinstance(device, ShareFsDevice):
            raise HypervisorError("dragonball cannot hot-plug a ShareFsDevice (virtio-fs is cold-plugged)")
        spec = self._spec_for(device)
        async with self._hotplug_lock:
            session = self._upcall_session()
            upcall = await session.client()
            if isinstance(spec, NetSpec) and isinstance(device, NetworkDevice):
                spec = dataclasses.replace(spec, fd=await self._open_tap(device))
            try:
                virtio = await trio.to_thread.run_sync(spec.build)
            except (VmmError, VirtioError, OSError) as err:
                spec.release()
                raise HypervisorError(f"dragonball: {type(device).__name__}: {err}") from err
            what = f"hot-adding {type(device).__name__} {device}"
            try:
                slot = await hot_add_virtio(vmm, virtio, upcall)  # owns ``virtio`` from here
            except (UpcallError, VmmError, trio.ClosedResourceError) as err:
                raise session.error(what, err) from err
            self._devices.append((device, slot))
            guest_path = ""
            if isinstance(device, BlockDevice):
                used = set(self._disk_index.values())
                index = next(i for i in range(len(used) + 1) if i not in used)  # the kernel's lowest free
                self._disk_index[slot] = index
                guest_path = "/dev/vd" + disk_letters(index)
        log.info("sandbox %s: hot-added %s on virtio-mmio slot %d", self.sandbox_id, device, slot.index)
        return DeviceInfo(guest_path=guest_path, mmio_address=int(slot.base))

    async def remove_device(self, device: Device) -> None:
        """Hot-unplug a block or network device `add_device` added: the guest lets it go (upcall DelMmio),
        then kata_vmm takes it out and closes it. A refusal leaves it plugged and raises."""
        vmm = self._require_vmm()
        async with self._hotplug_lock:
            found = next((i for i, (d, _) in enumerate(self._devices) if d == device), None)
            if found is None:
                raise HypervisorError(f"dragonball: {device} is not attached")
            if isinstance(device, ShareFsDevice):
                raise HypervisorError("dragonball cannot hot-unplug a ShareFsDevice")
            slot = self._devices[found][1]
            session = self._upcall_session()
            upcall = await session.client()
            try:
                await hot_remove_virtio(vmm, slot, upcall)
            except (UpcallError, VmmError, trio.ClosedResourceError) as err:
                raise session.error(f"removing {type(device).__name__} {device}", err) from err
            del self._devices[found]
            self._disk_index.pop(slot, None)
        log.info("sandbox %s: removed %s from virtio-mmio slot %d", self.sandbox_id, device, slot.index)

    async def resize_vcpu(self, old_vcpus: int, new_vcpus: int) -> tuple[int, int]:
        """Bring the guest to ``new_vcpus`` online vCPUs (capped at `max_vcpus`, as runtime-rs does, with a
        warning): vCPUs are created (or reused) and onlined with upcall AddCpu, or taken offline with
        DelCpu. Returns (vCPUs the guest ran, vCPUs it runs now); ``old_vcpus`` is only logged, the VMM's
        count is the truth."""
        vmm = self._require_vmm()
        if new_vcpus < 1:
            raise HypervisorError(f"dragonball: cannot resize to {new_vcpus} vCPUs")
        top = self.max_vcpus()
        if new_vcpus > top:
            log.warning(
                "sandbox %s: %d vCPUs asked, default_maxvcpus allows %d", self.sandbox_id, new_vcpus, top
            )
            new_vcpus = top
        async with self._hotplug_lock:
            current = len(vmm.guest_vcpus)
            if new_vcpus == current:
                return current, current
            session = self._upcall_session()
            upcall = await session.client()
            try:
                if new_vcpus > current:
                    await hot_add_vcpus(vmm, new_vcpus - current, upcall)
                else:
                    await hot_remove_vcpus(vmm, current - new_vcpus, upcall)
            except (UpcallError, VmmError, trio.ClosedResourceError) as err:
                raise session.error(f"resizing vCPUs {current} -> {new_vcpus}", err) from err
            now = len(vmm.guest_vcpus)
        log.info(
            "sandbox %s: vCPUs %d -> %d (asked %d -> %d)", self.sandbox_id, current, now, old_vcpus, new_vcpus
        )
        return current, now

    async def resize_memory(self, new_mib: int) -> tuple[int, MemoryConfig]:
        """Bring the guest to ``new_mib`` MiB: the boot memory plus what the virtio-mem device asks the
        guest to plug (2 MiB blocks, capped at the hot-plug region with a warning; less than the boot
        memory unplugs everything hot-plugged). Waits up to ``memory_resize_timeout`` for the guest's
        driver to get there and returns (boot + plugged MiB, the region's `MemoryConfig`): a guest that
        plugs less than asked (or nothing) is logged, not an error, as the memory it has is what counts."""
        vmm = self._require_vmm()
        if not self.config.enable_virtio_mem:
            raise HypervisorError("dragonball: memory hot-plug is off (enable_virtio_mem = false)")
        if new_mib < 0:
            raise HypervisorError(f"dragonball: cannot resize memory to {new_mib} MiB")
        boot = vmm.config.memory_mib if vmm.config is not None else self.config.default_memory
        async with self._hotplug_lock:
            try:
                region = vmm.hotplug_memory()
                want = min(-(-max(new_mib - boot, 0) // 2) * 2, region.region_mib)
                if boot + want < new_mib:
                    log.warning(
                        "sandbox %s: %d MiB asked, the VM can grow to %d MiB (default_maxmemory)",
                        self.sandbox_id,
                        new_mib,
                        boot + region.region_mib,
                    )
                vmm.set_hotplug_memory(want)
                with trio.move_on_after(self.memory_resize_timeout):
                    # the device counts what the guest plugged; nothing signals it to trio: look
                    while vmm.hotplug_memory().plugged_mib != want:  # noqa: ASYNC110
                        await trio.sleep(MEMORY_POLL)
                plugged = vmm.hotplug_memory().plugged_mib
            except VmmError as err:
                raise HypervisorError(f"dragonball: resizing memory to {new_mib} MiB: {err}") from err
        if plugged != want:
            log.warning(
                "sandbox %s: the guest plugged %d of %d hot-plug MiB after %g s",
                self.sandbox_id,
                plugged,
                want,
                self.memory_resize_timeout,
            )
        log.info(
            "sandbox %s: memory %d MiB (asked %d; %d hot-plugged)",
            self.sandbox_id,
            boot + plugged,
            new_mib,
            plugged,
        )
        regions = vmm.memory.regions if vmm.memory is not None else []
        # the KVM memory slot is the region's index (kata_vmm registers regions in order)
        slot, addr = next(((i, r.guest_addr) for i, r in enumerate(regions) if r.hotplug), (0, 0))
        return boot + plugged, MemoryConfig(slot=slot, size_mib=plugged, addr=addr, probe=False)

    async def _watch_exit(self, vmm: Vmm) -> None:
        try:
            await trio.lowlevel.wait_readable(vmm.exit_fd())
        except (trio.ClosedResourceError, VmStateError):
            pass  # closed by cleanup(): the VM is gone either way
        finally:
            self._exited.set()

    def _require_vmm(self) -> Vmm:
        if self._vmm is None:
            raise HypervisorError("the VM is not running (start_vm() has not run)")
        return self._vmm

    def _exited_nowait(self) -> bool:
        vmm = self._vmm
        if vmm is None:
            return False
        try:
            fd = vmm.exit_fd()
        except VmStateError:  # closed
            return True
        return bool(select.select([fd], [], [], 0)[0])

    def _crash_message(self) -> str:
        status = self._vmm.exit_status if self._vmm is not None else None
        what = (status.detail or status.kind.value) if status is not None else "unknown"
        tail = self._console.tail()
        return f"dragonball: the guest stopped ({what})" + (f"; console:\n{tail}" if tail else "")

    async def wait_vm(self) -> int:
        """Sleep (no thread) until the guest stops; 0 for power-off, reboot or a host stop, else 1."""
        vmm = self._require_vmm()
        await self._exited.wait()
        status = vmm.exit_status
        if status is None:  # closed under us by cleanup(): treated as a host stop
            return 0
        if not status.clean:
            log.error("%s", self._crash_message())
            return 1
        return 0

    def exit_reason(self) -> str:
        """How the guest ended (empty while it runs)."""
        status = self._vmm.exit_status if self._vmm is not None else None
        return f"{status.kind.value}: {status.detail}" if status is not None else ""

    def console_tail(self) -> str:
        """The last lines the guest printed on its console."""
        return self._console.tail()

    async def stop_vm(self) -> None:
        """Pull the plug on the guest and join its vCPU threads; idempotent."""
        if self._vmm is None or self._stopped:
            return
        self._stopped = True
        if self._upcall is not None:
            await self._upcall.aclose()
        vmm = self._vmm
        if log.isEnabledFor(logging.DEBUG):
            with contextlib.suppress(VmmError):
                log.debug("sandbox %s: %s", self.sandbox_id, vmm.statistics().summary())
        vmm.stop_nowait()
        try:
            with trio.move_on_after(STOP_TIMEOUT):
                await self._exited.wait()
            await trio.to_thread.run_sync(vmm.wait, STOP_TIMEOUT)
        except VmStateError:  # already closed
            return
        except VmmError as err:
            raise HypervisorError(f"dragonball: stopping the VM: {err}") from err

    async def pause_vm(self) -> None:
        """Freeze every vCPU (devices keep their state; the event thread idles)."""
        vmm = self._require_vmm()
        try:
            vmm.pause()
        except VmmError as err:
            raise HypervisorError(f"dragonball: pause: {err}") from err

    async def resume_vm(self) -> None:
        """Undo `pause_vm`."""
        vmm = self._require_vmm()
        try:
            vmm.resume()
        except VmmError as err:
            raise HypervisorError(f"dragonball: resume: {err}") from err

    def agent_address(self) -> str:
        """``hvsock:<state dir>/kata.hvsock:1024``."""
        return f"hvsock:{self.hvsock_path}:{AGENT_VSOCK_PORT}"

    def set_passfd_listener_port(self, port: int) -> None:
        """Passfd stdio on `port` (0 = off): the guest kernel command line tells the agent."""
        if self._vmm is not None:
            raise HypervisorError("the passfd port must be set before start_vm()")
        self._passfd_port = port

    def passfd_listener(self) -> tuple[Path, int] | None:
        """(hybrid vsock socket, agent passfd port) when passfd stdio is on, else None."""
        if not self._passfd_port or self.state_dir is None:
            return None
        return self.hvsock_path, self._passfd_port

    def pids(self) -> list[int]:
        """The shim itself: the VM has no process of its own."""
        return [os.getpid()]

    def thread_ids(self) -> list[int]:
        """Native ids of the vCPU threads and the VMM's event thread (alive ones)."""
        if self._vmm is None:
            return []
        return [t.native_id for t in self._vmm.threads() if t.native_id is not None and t.is_alive()]

    def vcpu_thread_ids(self) -> list[int]:
        """Native ids of the alive vCPU threads (``kata-vcpu-N``)."""
        if self._vmm is None:
            return []
        return [
            t.native_id
            for t in self._vmm.threads()
            if t.native_id is not None and t.is_alive() and t.name.startswith("kata-vcpu")
        ]

    async def cleanup(self) -> None:
        """Stop the VM, close every fd and mapping, remove the vsock sockets; idempotent."""
        if self._cleaned:
            return
        self._cleaned = True
        try:
            await self.stop_vm()
        finally:
            if self._builder is not None:
                self._builder.close()  # a VM never built: its specs' fds (taps) go back
            vmm = self._vmm
            if vmm is not None:
                with contextlib.suppress(VmStateError):
                    # wake any task still in wait_readable on the exit fd before it is closed
                    trio.lowlevel.notify_closing(vmm.exit_fd())
                await trio.to_thread.run_sync(vmm.close)
            if self.state_dir is not None:
                for sock in self.state_dir.glob(HVSOCK_NAME + "*"):
                    with contextlib.suppress(OSError):
                        sock.unlink()
