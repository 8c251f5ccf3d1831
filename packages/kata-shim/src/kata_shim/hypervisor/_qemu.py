"""The external back-end: QEMU as its own process, driven over QMP (runtime-rs `qemu`, trimmed).

The shim starts QEMU (and, for the shared directory, a standalone virtiofsd) and supervises both; the
process tree is shim + qemu + virtiofsd. QEMU starts paused (``-S``): once QMP is up the back-end asks for
the vCPU thread ids (``query-cpus-fast``) and lets the guest run (``cont``). Devices are cold-plugged on
the q35 root bus at fixed slots, in this order (the guest probes PCI by slot, so the image is /dev/vda):

    02  the guest image (`image`), read-only virtio-blk-pci
    03  vhost-vsock-pci, guest CID picked with VHOST_VSOCK_SET_GUEST_CID on /dev/vhost-vsock (as runtime-rs)
    04  virtio-rng-pci (`entropy_source`)
    05… the devices `add_device` was given, in that order: virtio-blk-pci, vhost-user-fs-pci (virtiofsd),
        virtio-net-pci with vhost-net on the pod's tap (opened in the pod's netns, fds passed to QEMU)
    …1e pcie-root-port ``rp0``…``rp<n-1>`` (q35 only; n = `pcie_root_port`, default 4), the top slots below
        0x1f (q35's own ICH9 functions): the root bus is not hot-pluggable, a root port's slot is

`DeviceInfo.pci_path` is the slot as upstream's PciPath writes a root-bus device ("05"). The agent is
reached over AF_VSOCK: `agent_address()` is ``vsock://<cid>:1024``. No passfd (QEMU has no hybrid vsock):
stdio goes over ttrpc.

Hot-plug (q35; microvm has none, its `capabilities()` say so), one at a time, each device on a free root
port at address 0, so its PCI path is ``<root port slot>/00`` (the agent resolves it through sysfs):

- block: ``blockdev-add`` (raw over file, read-only as asked, cache direct as the cold path's cache=none),
  ``device_add virtio-blk-pci`` (serial = device_id); a failed device_add takes the node out again. A
  device with ``follow_symlinks`` False (a blockfile snapshot) is opened by the shim with O_NOFOLLOW and
  given to QEMU with ``add-fd`` (SCM_RIGHTS), the node's file being ``/dev/fdset/<id>``; ``remove-fd``
  after its ``blockdev-del`` (or a failed add) lets QEMU close it;
- net: the tap (opened in the pod's netns) and vhost-net fds to QEMU with ``getfd`` (SCM_RIGHTS on the QMP
  socket), ``netdev_add tap`` naming them, ``device_add virtio-net-pci``; undone step by step on failure;
- removal: ``device_del``, then the DEVICE_DELETED event for that id within `UNPLUG_TIMEOUT` (the guest must
  let the device go: ACPI/pciehp eject) or `UnplugTimeout` with the device still recorded; then
  ``blockdev-del``/``netdev_del`` and the port is free;
- vCPUs: ``-smp <default_vcpus>,maxcpus=<max_vcpus()>``; `resize_vcpu` adds with ``device_add`` of the free
  CPU slots ``query-hotpluggable-cpus`` reports (its props as given) and removes the ones it added (newest
  first) with ``device_del`` + DEVICE_DELETED; the boot vCPUs stay.

The VM's end is seen three ways, whichever comes first: QEMU exits (its pid), QMP events (SHUTDOWN with its
reason, GUEST_PANICKED), or virtiofsd exits (the guest's root share is gone: QEMU is stopped). The pids and
start times of both processes are recorded in the sandbox's state.json (``extra["processes"]``), so
`containerd-shim-kata-v2 delete` kills them after a shim crash, and only if each is still the process
recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from kata_proto.agent import AGENT_VSOCK_PORT
from kata_shim.hypervisor._base import (
    BlockDevice,
    Capabilities,
    Device,
    DeviceInfo,
    HypervisorConfig,
    HypervisorError,
    NetworkDevice,
    ShareFsDevice,
)
from kata_shim.hypervisor._child import Child
from kata_shim.hypervisor._common import netns_path
from kata_shim.hypervisor._external import SOCKET_WAIT, VIRTIOFSD_NAME, ExternalVmm
from kata_shim.hypervisor._qmp import QmpClient, QmpCommandError, QmpError, QmpEvent, QmpTimeout
from kata_shim.hypervisor._vhost import open_vhost_net, open_vhost_vsock

log = logging.getLogger("kata_shim.hypervisor.qemu")

QMP_NAME = "qmp.sock"
FIRST_SLOT = 5
"""First PCI slot of an `add_device` device (02-04 are the image, vsock and rng)."""
IMAGE_SLOT, VSOCK_SLOT, RNG_SLOT = 2, 3, 4
MEM_ID = "mem"
MEM_BACKEND = f"memory-backend={MEM_ID}"
BLOCK_OPTS = "cache=none,aio=threads"
"""Container block devices bypass the host page cache (the guest has its own)."""
LAST_SLOT = 0x1E
"""Last usable root-bus slot: 0x1f holds q35's ICH9 LPC, SATA and SMBus functions."""
MAX_VCPUS = 240
"""Most vCPUs of a q35 VM (maxcpus), as upstream's amd64 ``MaxQemuVCPUs``: QEMU 7.2 refuses more than 255
without x2APIC and an IOMMU, and `max_vcpus` is the host's CPU count when `default_maxvcpus` is 0."""
DEFAULT_ROOT_PORTS = 4
"""pcie-root-port devices on q35 when `pcie_root_port` is 0: hot-plugged devices at a time."""
MAX_ROOT_PORTS = 16
QMP_TIMEOUT = 10.0
UNPLUG_TIMEOUT = 20.0
"""Seconds the guest has to release a device after ``device_del`` (the DEVICE_DELETED event)."""
UNPLUG_POLL = 1.0
"""Seconds between checks that an unplugged vCPU is gone (QEMU 7.2 sends no DEVICE_DELETED for the CPU)."""
PERIPHERAL = "/machine/peripheral/"
"""QOM path of the devices added with an id."""
CLEAN_SHUTDOWN_REASONS = frozenset(
    {"guest-shutdown", "host-qmp-quit", "host-signal", "guest-reset", "host-qmp-system-reset"}
)
CAPABILITIES = Capabilities(
    block_device=True,
    hotplug=frozenset({"block", "net", "vcpu"}),  # q35 only: QMP device_add/device_del on root ports
    multi_queue=False,
    shared_fs=frozenset({"virtio-fs"}),
    guest_memory_probe=False,
    agent_transport="vsock",
    passfd=False,
    device_addressing="pci",
)
"""What the qemu back-end does on q35: PCI devices (hot-plugged on root ports), virtiofsd, vhost-vsock."""
MICROVM_CAPABILITIES = dataclasses.replace(CAPABILITIES, hotplug=frozenset())
"""microvm: no PCI hot-plug, no vCPU hot-plug."""


class UnplugTimeout(HypervisorError):
    """The guest did not release a device (no DEVICE_DELETED) within `UNPLUG_TIMEOUT` of ``device_del``."""


@dataclasses.dataclass(frozen=True)
class HotPlugged:
    """A device `add_device` hot-plugged: its qdev id, root port and back-end (block node, netdev)."""

    device: Device
    qdev_id: str
    port: int
    backend: str
    fdset: int | None = None
    """The ``add-fd`` set holding the disk's fd (a device not opened by path), removed with the node."""


VsockOpener = Callable[[], tuple[int, int]]
"""Returns (guest CID, vhost-vsock fd with that CID set); the fd goes to QEMU as ``vhostfd``."""


def _escape(value: str | Path) -> str:
    """A value inside a QEMU option list: commas are doubled."""
    return str(value).replace(",", ",,")


class Qemu(ExternalVmm):
    """`Hypervisor` back-end running QEMU as a child process (runtime-rs `qemu`)."""

    name = "qemu"
    vmm_name = "qemu"
    binary_name = "QEMU"
    CAPABILITIES = CAPABILITIES
    SOCKET_NAMES = (QMP_NAME, VIRTIOFSD_NAME)

    def __init__(
        self,
        config: HypervisorConfig,
        *,
        state_root: Path | None = None,
        open_vsock: VsockOpener | None = open_vhost_vsock,
    ) -> None:
        """``open_vsock=None`` leaves the vsock device out (tests that run QEMU without /dev/vhost-vsock)."""
        super().__init__(config, state_root=state_root)
        self._open_vsock = open_vsock
        self._slots: list[int] = []
        """The PCI slot of each of `devices`."""
        self._next_slot = FIRST_SLOT
        self.cid = 0
        self._qmp: QmpClient | None = None
        self._vcpu_tids: list[int] = []
        self._events: list[QmpEvent] = []
        self._shutdown_reason = ""
        self._panicked = False
        self._pass_fds: list[int] = []
        self._hot: list[HotPlugged] = []
        """Hot-plugged devices QEMU has, in `add_device` order."""
        self._hot_cpus: list[str] = []
        """qdev ids of the vCPUs `resize_vcpu` added, oldest first."""
        self._hot_ids = itertools.count()
        self._hotplug_lock = trio.Lock()
        self._deleted: set[str] = set()
        """Ids of our hot-plugged devices whose DEVICE_DELETED came (the guest let them go)."""
        self._unplug_waits: dict[str, trio.Event] = {}

    @property
    def _qemu(self) -> Child | None:
        """The QEMU child (`_vmm`)."""
        return self._vmm

    # --- set-up ------------------------------------------------------------------------------------
    @property
    def qmp_path(self) -> Path:
        """QEMU's QMP socket (valid after `prepare_vm`)."""
        return self._state() / QMP_NAME

    def _q35(self) -> bool:
        machine = self.config.machine_type or "q35"
        return machine == "q35" or machine.startswith("pc-q35")

    def capabilities(self) -> Capabilities:
        """Block devices, virtio-fs through virtiofsd, vsock, PCI addressing, no passfd; hot-plug of block,
        net and vCPUs on q35 (none on microvm)."""
        return CAPABILITIES if self._q35() else MICROVM_CAPABILITIES

    def root_ports(self) -> int:
        """How many pcie-root-port devices the VM has (0 on microvm)."""
        if not self._q35():
            return 0
        wanted = self.config.pcie_root_port or DEFAULT_ROOT_PORTS
        if not 1 <= wanted <= MAX_ROOT_PORTS:
            raise HypervisorError(
                f"qemu: pcie_root_port = {wanted}: 1..{MAX_ROOT_PORTS} (0: {DEFAULT_ROOT_PORTS})"
            )
        return wanted

    def root_port_slot(self, port: int) -> int:
        """The root-bus slot of root port ``rp<port>`` (the top slots, below 0x1f)."""
        return LAST_SLOT + 1 - self.root_ports() + port

    async def prepare_vm(self, sandbox_id: str, netns: str | None) -> None:
        """Check the config (binaries, kernel, image, `pcie_root_port`) and create the state directory."""
        self.root_ports()
        await super().prepare_vm(sandbox_id, netns)

    async def add_device(self, device: Device) -> DeviceInfo:
        """Cold-plug a device (before `start_vm`) on the next free root-bus slot, or hot-plug one (after)
        on a free root port; its PCI path says where."""
        if self.state_dir is None:
            raise HypervisorError("add_device() before prepare_vm()")
        if self._vmm is not None:
            return await self._hot_add(device)
        self._check_cold_device(device)
        if self._next_slot > LAST_SLOT - self.root_ports():
            raise HypervisorError("qemu: no free PCI slot on the root bus")
        slot = self._next_slot
        self._next_slot += 1
        self.devices.append(device)
        self._slots.append(slot)
        guest_path = self._block_guest_path() if isinstance(device, BlockDevice) else ""
        return DeviceInfo(guest_path=guest_path, pci_path=f"{slot:02x}")

    def _accel(self) -> tuple[str, list[str]]:
        """(accelerator, other -machine options) from `machine_accelerators`."""
        accel = "kvm"
        others = []
        for item in (i.strip() for i in self.config.machine_accelerators.split(",")):
            if item.startswith("accel="):
                accel = item.removeprefix("accel=")
            elif item:
                others.append(item)
        return accel, others

    def qemu_argv(
        self,
        *,
        vsock: tuple[int, int] | None = None,
        net_fds: dict[int, tuple[int, int | None]] | None = None,
    ) -> list[str]:
        """QEMU's command line. ``vsock`` is (CID, vhost fd); ``net_fds`` maps a slot to (tap fd, vhost-net fd
        or None); both fds are inherited by QEMU."""
        cfg = self.config
        accel, machine_extra = self._accel()
        mem = f"{cfg.default_memory}M"
        cpu = ["host" if accel == "kvm" else "max"] + [f for f in cfg.cpu_features.split(",") if f.strip()]
        argv = [
            cfg.path,
            "-name", f"sandbox-{self.sandbox_id},debug-threads=on",
            "-machine", ",".join([cfg.machine_type or "q35", f"accel={accel}", *machine_extra, MEM_BACKEND]),
            "-cpu", ",".join(cpu),
            "-smp", self._smp(),
            "-m", mem,
            "-object", f"memory-backend-memfd,id={MEM_ID},size={mem},share=on",
            "-nodefaults", "-nographic", "-no-user-config", "-no-reboot",
            "-S",
            "-qmp", f"unix:{_escape(self.qmp_path)},server=on,wait=off",
            "-serial", "stdio",
            "-kernel", str(cfg.kernel),
        ]  # fmt: skip
        if cfg.initrd is not None:
            argv += ["-initrd", str(cfg.initrd)]
        argv += ["-append", self.cmdline()]
        if cfg.image is not None:
            argv += [
                "-drive", f"if=none,id=image,file={_escape(cfg.image)},format=raw,readonly=on",
                "-device", f"virtio-blk-pci,drive=image,bus=pcie.0,addr={IMAGE_SLOT:#x}",
            ]  # fmt: skip
        if vsock is not None:
            cid, fd = vsock
            argv += [
                "-device",
                f"vhost-vsock-pci,id=vsock,guest-cid={cid},vhostfd={fd},bus=pcie.0,addr={VSOCK_SLOT:#x}",
            ]
        if cfg.entropy_source:
            argv += [
                "-object", f"rng-random,id=rng,filename={_escape(cfg.entropy_source)}",
                "-device", f"virtio-rng-pci,rng=rng,bus=pcie.0,addr={RNG_SLOT:#x}",
            ]  # fmt: skip
        for port in range(self.root_ports()):
            # (chassis, slot) must be unique per port: one chassis each
            addr = f"addr={self.root_port_slot(port):#x}"
            argv += ["-device", f"pcie-root-port,id=rp{port},bus=pcie.0,chassis={port + 1},{addr}"]
        for n, (device, slot) in enumerate(zip(self.devices, self._slots, strict=True)):
            argv += self._device_args(n, device, slot, (net_fds or {}).get(slot))
        return argv

    def max_vcpus(self) -> int:
        """The config's `max_vcpus`, capped at `MAX_VCPUS` (never below ``default_vcpus``)."""
        return max(min(self.config.max_vcpus(), MAX_VCPUS), self.config.default_vcpus)

    def _smp(self) -> str:
        """``-smp``: the boot vCPUs, and on q35 room for hot-plugged ones up to `max_vcpus`."""
        boot = str(self.config.default_vcpus)
        return f"{boot},maxcpus={self.max_vcpus()}" if self._q35() else boot

    def _device_args(
        self, n: int, device: Device, slot: int, net: tuple[int, int | None] | None
    ) -> list[str]:
        addr = f"bus=pcie.0,addr={slot:#x}"
        if isinstance(device, BlockDevice):
            drive = f"if=none,id=blk{n},file={_escape(device.path)},format=raw"
            ro = "on" if device.read_only else "off"
            serial = f",serial={_escape(device.device_id[:20])}" if device.device_id else ""
            return [
                "-drive", f"{drive},readonly={ro},{BLOCK_OPTS}",
                "-device", f"virtio-blk-pci,drive=blk{n}{serial},{addr}",
            ]  # fmt: skip
        if isinstance(device, ShareFsDevice):
            return [
                "-chardev",
                f"socket,id=fs{n},path={_escape(self.virtiofsd_socket)}",
                "-device",
                f"vhost-user-fs-pci,chardev=fs{n},tag={_escape(device.mount_tag)},"
                f"queue-size={self.config.virtio_fs_queue_size},{addr}",
            ]
        assert isinstance(device, NetworkDevice)
        if net is None:
            raise HypervisorError(f"qemu: tap {device.tap} was not opened")
        tap_fd, vhost_fd = net
        vhost = f"vhost=on,vhostfd={vhost_fd}" if vhost_fd is not None else "vhost=off"
        mac = f",mac={device.mac}" if device.mac else ""
        return [
            "-netdev", f"tap,id=net{n},fd={tap_fd},{vhost}",
            "-device", f"virtio-net-pci,netdev=net{n}{mac},{addr}",
        ]  # fmt: skip

    # --- running -----------------------------------------------------------------------------------
    def _vm_ending(self) -> bool:
        return bool(self._shutdown_reason)

    def _on_event(self, event: QmpEvent) -> None:
        name = event.get("event")
        raw = event.get("data")
        data: dict[str, Any] = raw if isinstance(raw, dict) else {}
        if len(self._events) < 64:
            self._events.append({"event": name, "data": data})
        if name == "SHUTDOWN":
            self._shutdown_reason = str(data.get("reason", "")) or "shutdown"
        elif name == "GUEST_PANICKED":
            self._panicked = True
            action = data.get("action", "")
            self.log.error("sandbox %s: the guest panicked (%s)", self.sandbox_id, action)
            if self._vmm is not None and action != "poweroff":
                self._vmm.kill()  # a paused panicked guest would never end on its own
        elif name == "DEVICE_DELETED":
            # {"device": id, "path"} for the device itself; {"path": ".../<id>/<child>"} for its parts (a
            # vCPU unplug in QEMU 7.2 sends only its lapic's): those wake the waiter, which confirms
            ident, path = data.get("device"), data.get("path")
            target = ident if isinstance(ident, str) else None
            if target is None and isinstance(path, str) and path.startswith(PERIPHERAL):
                target = path.removeprefix(PERIPHERAL).split("/")[0]
            if target is not None and (target in self._unplug_waits or self._is_hot_id(target)):
                if target == ident:
                    self._deleted.add(target)
                if target in self._unplug_waits:
                    self._unplug_waits[target].set()
        elif name in ("RESET", "STOP", "RESUME"):
            self.log.info("sandbox %s: QMP event %s", self.sandbox_id, name)

    async def _open_taps(self) -> dict[int, tuple[int, int | None]]:
        """Open each network device's tap inside the pod's netns (a thread of its own enters it) and a
        vhost-net fd for it (unless `disable_vhost_net` or there is no /dev/vhost-net)."""
        fds: dict[int, tuple[int, int | None]] = {}
        for device, slot in zip(self.devices, self._slots, strict=True):
            if isinstance(device, NetworkDevice):
                fds[slot] = await self._open_tap(device, self._pass_fds)
        return fds

    async def _open_tap(self, device: NetworkDevice, opened: list[int]) -> tuple[int, int | None]:
        """(tap fd, vhost-net fd or None) for ``device``, each appended to ``opened`` as it opens."""
        from kata_resources import to_thread_in_netns
        from kata_vmm import VirtioError, open_tap

        tap = device.tap
        try:
            if self.netns is None:
                tap_fd = await trio.to_thread.run_sync(open_tap, tap)
            else:
                tap_fd = await to_thread_in_netns(netns_path(self.netns), open_tap, tap)
        except (VirtioError, OSError) as err:
            where = f" in network namespace {self.netns}" if self.netns else ""
            raise HypervisorError(f"qemu: tap {tap}{where}: {err}") from err
        opened.append(tap_fd)
        vhost_fd: int | None = None
        if not self.config.disable_vhost_net:
            try:
                vhost_fd = open_vhost_net()
                opened.append(vhost_fd)
            except OSError as err:
                self.log.warning("sandbox %s: no vhost-net (%s): virtio-net without it", self.sandbox_id, err)
        return tap_fd, vhost_fd

    def _close_passed_fds(self) -> None:
        for fd in self._pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pass_fds.clear()

    async def _start_vmm(self) -> None:
        """QEMU (paused, with the vsock and tap fds it inherits), QMP, the vCPU thread ids, then ``cont``."""
        vsock = None
        if self._open_vsock is not None:
            vsock = await trio.to_thread.run_sync(self._open_vsock)
            self.cid = vsock[0]
            self._pass_fds.append(vsock[1])
        net_fds = await self._open_taps()
        with contextlib.suppress(FileNotFoundError):
            self.qmp_path.unlink()
        argv = self.qemu_argv(vsock=vsock, net_fds=net_fds)
        self._vmm = await self._spawn(self.vmm_name, argv, list(self._pass_fds))
        self._close_passed_fds()  # QEMU has its own copies
        self._persist()
        await self._connect_qmp()
        assert self._qmp is not None
        cpus = await self._qmp.execute("query-cpus-fast", timeout=QMP_TIMEOUT)
        self._vcpu_tids = [int(c["thread-id"]) for c in cpus if isinstance(c, dict) and "thread-id" in c]
        await self._qmp.execute("cont", timeout=QMP_TIMEOUT)
        self.log.info(
            "sandbox %s: QEMU %d started (%d vCPU, %d MiB, vsock CID %d)",
            self.sandbox_id,
            self._vmm.pid,
            self.config.default_vcpus,
            self.config.default_memory,
            self.cid,
        )

    async def _connect_qmp(self) -> None:
        """Dial QMP until QEMU listens (it creates the socket early) or exits."""
        assert self._vmm is not None
        with trio.move_on_after(SOCKET_WAIT):
            while True:
                if self._vmm.exited.is_set():
                    raise HypervisorError(self._vmm.describe_exit())
                if self.qmp_path.exists():
                    try:
                        self._qmp = await QmpClient.connect(self.qmp_path, self._on_event, QMP_TIMEOUT)
                        break
                    except QmpError as err:
                        if "cannot connect" not in str(err):
                            raise
                await trio.sleep(0.02)
        if self._qmp is None:
            raise HypervisorError(f"QMP socket {self.qmp_path} did not come up within {SOCKET_WAIT:g} s")
        trio.lowlevel.spawn_system_task(self._qmp.run, name=f"qemu-qmp-{self.sandbox_id}")

    def _require_qmp(self) -> QmpClient:
        if self._qmp is None or self._vmm is None:
            raise HypervisorError("the VM is not running (start_vm() has not run)")
        return self._qmp

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a QMP command on this VM's QEMU."""
        return await self._require_qmp().execute(command, arguments, timeout=QMP_TIMEOUT)

    async def wait_vm(self) -> int:
        """Sleep until QEMU exits; 0 for a guest power-off, reboot or a host stop, else 1."""
        self._require_qmp()
        return await super().wait_vm()

    def _clean_exit(self) -> bool:
        if self._panicked:
            return False
        clean = super()._clean_exit()
        return clean and (self._stopping or self._shutdown_reason in CLEAN_SHUTDOWN_REASONS)

    def _exit_details(self) -> list[str]:
        parts = ["guest panicked"] if self._panicked else []
        if self._shutdown_reason:
            parts.append(f"shutdown: {self._shutdown_reason}")
        return parts

    def events(self) -> list[QmpEvent]:
        """The first QMP events of this VM (name and data; at most 64), for tests and diagnosis."""
        return list(self._events)

    async def _shutdown(self) -> None:
        """QMP ``quit`` (nothing to ask before QMP is up)."""
        if self._qmp is not None:
            await self._qmp.execute("quit", timeout=QMP_TIMEOUT / 2)

    async def _release(self) -> None:
        """Close the fds meant for QEMU and the QMP connection."""
        self._close_passed_fds()
        if self._qmp is not None:
            await self._qmp.aclose()

    async def pause_vm(self) -> None:
        """QMP ``stop``: every vCPU halts."""
        await self.execute("stop")

    async def resume_vm(self) -> None:
        """QMP ``cont``."""
        await self.execute("cont")

    async def query_status(self) -> str:
        """QMP ``query-status``'s ``status`` ("running", "paused", "prelaunch", ...)."""
        answer = await self.execute("query-status")
        return str(answer.get("status", "")) if isinstance(answer, dict) else ""

    def agent_address(self) -> str:
        """``vsock://<guest CID>:1024``."""
        return f"vsock://{self.cid}:{AGENT_VSOCK_PORT}"

    def vcpu_thread_ids(self) -> list[int]:
        """The vCPU threads, as QMP ``query-cpus-fast`` named them (at start and after each resize)."""
        return [] if self._vmm is None or self._vmm.exited.is_set() else list(self._vcpu_tids)

    # --- hot-plug ----------------------------------------------------------------------------------
    def _is_hot_id(self, ident: str) -> bool:
        return ident in self._hot_cpus or any(h.qdev_id == ident for h in self._hot)

    def _require_hotplug(self, kind: str, what: str) -> QmpClient:
        qmp = self._require_qmp()
        if kind not in self.capabilities().hotplug:
            machine = self.config.machine_type or "q35"
            raise HypervisorError(f"qemu cannot hot-plug a {what} on machine {machine} (q35 only)")
        return qmp

    async def _hot_add(self, device: Device) -> DeviceInfo:
        """Hot-plug a block or network device on the first free root port. On a QMP failure what was
        added for it is taken out again and nothing is recorded."""
        if isinstance(device, ShareFsDevice):
            raise HypervisorError("qemu cannot hot-plug a ShareFsDevice (virtio-fs is cold-plugged)")
        kind = "block" if isinstance(device, BlockDevice) else "net"
        qmp = self._require_hotplug(kind, type(device).__name__)
        self._check_cold_device(device, opens_block_fd=True)
        async with self._hotplug_lock:
            if any(h.device == device for h in self._hot) or device in self.devices:
                raise HypervisorError(f"qemu: {device} is already attached")
            used = {h.port for h in self._hot}
            port = next((p for p in range(self.root_ports()) if p not in used), None)
            if port is None:
                raise HypervisorError(
                    f"qemu: no free hot-plug root port (all {self.root_ports()} in use; pcie_root_port)"
                )
            n = next(self._hot_ids)
            if isinstance(device, BlockDevice):
                hot = await self._hot_add_block(qmp, device, n, port)
            else:
                assert isinstance(device, NetworkDevice)
                hot = await self._hot_add_net(qmp, device, n, port)
            self._hot.append(hot)
        pci_path = f"{self.root_port_slot(port):02x}/00"
        self.log.info(
            "sandbox %s: hot-added %s as %s at PCI path %s", self.sandbox_id, device, hot.qdev_id, pci_path
        )
        # the guest names disks in probe order, which hot-plug does not fix: the PCI path is the address
        return DeviceInfo(pci_path=pci_path)

    async def _undo(self, qmp: QmpClient, command: str, arguments: dict[str, Any]) -> None:
        """Best effort, after a failed hot-add: QEMU may be gone already."""
        try:
            await qmp.execute(command, arguments, timeout=QMP_TIMEOUT)
        except QmpError as err:
            self.log.warning("sandbox %s: undoing a failed hot-add: %s: %s", self.sandbox_id, command, err)

    async def _hot_add_block(self, qmp: QmpClient, device: BlockDevice, n: int, port: int) -> HotPlugged:
        node, qdev = f"drive-hp{n}", f"blk-hp{n}"
        fdset = None
        if device.follow_symlinks:
            filename = str(device.path)
            block = await trio.to_thread.run_sync(_is_block_device, device.path)
        else:
            fd, block = await trio.to_thread.run_sync(_open_disk_nofollow, device.path, device.read_only)
            try:
                added = await qmp.execute("add-fd", {"opaque": node}, timeout=QMP_TIMEOUT, fds=[fd])
            finally:
                os.close(fd)  # QEMU has its own copy
            fdset = int(added["fdset-id"])
            filename = f"/dev/fdset/{fdset}"
        # raw over the file (host_device for a block device: QEMU's "file" driver takes regular files only);
        # cache direct and aio threads are the cold path's cache=none,aio=threads
        blockdev = {
            "driver": "raw",
            "node-name": node,
            "read-only": device.read_only,
            "cache": {"direct": True, "no-flush": False},
            "file": {
                "driver": "host_device" if block else "file",
                "filename": filename,
                "aio": "threads",
                "read-only": device.read_only,
            },
        }
        try:
            try:
                await qmp.execute("blockdev-add", blockdev, timeout=QMP_TIMEOUT)
            except QmpError as err:
                if not isinstance(err, QmpCommandError):  # no answer: QEMU may have made it
                    await self._undo(qmp, "blockdev-del", {"node-name": node})
                raise
            args: dict[str, Any] = {"driver": "virtio-blk-pci", "id": qdev, "drive": node}
            if device.device_id:
                args["serial"] = device.device_id[:20]
            await self._device_add_on_port(qmp, args, port, ("blockdev-del", {"node-name": node}))
        except QmpError:
            if fdset is not None:
                await self._undo(qmp, "remove-fd", {"fdset-id": fdset})
            raise
        return HotPlugged(device, qdev, port, node, fdset)

    async def _device_add_on_port(
        self, qmp: QmpClient, args: dict[str, Any], port: int, undo: tuple[str, dict[str, Any]]
    ) -> None:
        """`_device_add` of ``args`` on root port ``port``; when QEMU refuses it, ``undo`` (the command that
        takes its back-end out) runs before the error goes on."""
        try:
            await self._device_add(qmp, args | {"bus": f"rp{port}", "addr": "0x0"})
        except QmpError:
            await self._undo(qmp, *undo)
            raise

    async def _device_add(self, qmp: QmpClient, args: dict[str, Any]) -> None:
        """``device_add``; when QEMU does not answer in time, it counts as done if QEMU has the device
        (``qom-list /machine/peripheral``), so that what QEMU has is what is recorded."""
        try:
            await qmp.execute("device_add", args, timeout=QMP_TIMEOUT)
        except QmpTimeout:
            try:
                peripherals = await qmp.execute(
                    "qom-list", {"path": PERIPHERAL.rstrip("/")}, timeout=QMP_TIMEOUT
                )
            except QmpError as err:
                self.log.warning("sandbox %s: after device_add timed out: qom-list: %s", self.sandbox_id, err)
                raise QmpTimeout(f"QMP device_add {args['id']}: no answer") from None
            names = (
                {p.get("name") for p in peripherals if isinstance(p, dict)}
                if isinstance(peripherals, list)
                else set()
            )
            if args["id"] not in names:
                raise
            self.log.warning(
                "sandbox %s: device_add %s answered late; QEMU has it", self.sandbox_id, args["id"]
            )

    async def _hot_add_net(self, qmp: QmpClient, device: NetworkDevice, n: int, port: int) -> HotPlugged:
        netdev, qdev = f"netdev-hp{n}", f"net-hp{n}"
        opened: list[int] = []
        passed: list[str] = []
        try:
            tap_fd, vhost_fd = await self._open_tap(device, opened)
            args: dict[str, Any] = {"type": "tap", "id": netdev, "fd": f"fd-hp{n}"}
            await qmp.pass_fd(args["fd"], tap_fd, QMP_TIMEOUT)
            passed.append(args["fd"])
            args["vhost"] = vhost_fd is not None
            if vhost_fd is not None:
                args["vhostfd"] = f"vhostfd-hp{n}"
                await qmp.pass_fd(args["vhostfd"], vhost_fd, QMP_TIMEOUT)
                passed.append(args["vhostfd"])
            await qmp.execute("netdev_add", args, timeout=QMP_TIMEOUT)
        except QmpError as err:
            if passed and not isinstance(err, QmpCommandError):  # no answer: QEMU may have made it
                await self._undo(qmp, "netdev_del", {"id": netdev})
            for name in passed:  # netdev_add takes the named fds; unused ones would stay in QEMU
                await self._undo(qmp, "closefd", {"fdname": name})
            raise
        finally:
            for fd in opened:  # QEMU has its own copies
                with contextlib.suppress(OSError):
                    os.close(fd)
        args = {"driver": "virtio-net-pci", "id": qdev, "netdev": netdev}
        if device.mac:
            args["mac"] = device.mac
        await self._device_add_on_port(qmp, args, port, ("netdev_del", {"id": netdev}))
        return HotPlugged(device, qdev, port, netdev)

    async def _unplug(
        self, qmp: QmpClient, qdev_id: str, gone: Callable[[QmpClient, str], Awaitable[bool]] | None = None
    ) -> None:
        """``device_del`` and wait for its DEVICE_DELETED, or (with ``gone``) until ``gone`` says QEMU has
        it no more, checked on each DEVICE_DELETED of its parts and every `UNPLUG_POLL` s; `UnplugTimeout`
        after `UNPLUG_TIMEOUT`. A retry after a timeout waits again for the unplug QEMU still has pending,
        or is done if it came since."""
        if qdev_id not in self._deleted:
            self._unplug_waits[qdev_id] = trio.Event()
            try:
                with trio.move_on_after(UNPLUG_TIMEOUT):
                    try:
                        await qmp.execute("device_del", {"id": qdev_id}, timeout=QMP_TIMEOUT)
                    except QmpCommandError as err:
                        if err.error_class == "DeviceNotFound":
                            self._deleted.add(qdev_id)  # QEMU has it no more
                        elif "already in the process of unplug" not in err.desc:
                            raise
                    while qdev_id not in self._deleted and not qmp.closed.is_set():
                        woke = self._unplug_waits[qdev_id]
                        with trio.move_on_after(UNPLUG_POLL if gone is not None else UNPLUG_TIMEOUT):
                            await _first_of(woke, qmp.closed)
                        if woke.is_set():
                            self._unplug_waits[qdev_id] = trio.Event()
                        if gone is not None and not qmp.closed.is_set() and await gone(qmp, qdev_id):
                            self._deleted.add(qdev_id)
            finally:
                self._unplug_waits.pop(qdev_id, None)
            if qdev_id not in self._deleted and qmp.closed.is_set():
                raise HypervisorError(f"qemu: QMP closed (QEMU gone?) while {qdev_id} was being unplugged")
            if qdev_id not in self._deleted:
                raise UnplugTimeout(
                    f"qemu: the guest did not release {qdev_id} within {UNPLUG_TIMEOUT:g} s of device_del "
                    "(it stays attached)"
                )
        self._deleted.discard(qdev_id)

    async def remove_device(self, device: Device) -> None:
        """Hot-unplug a device `add_device` hot-plugged: ``device_del``, the guest lets it go
        (DEVICE_DELETED), then its back-end goes (``blockdev-del``, ``netdev_del``) and its root port is
        free. `UnplugTimeout` (the device stays recorded) when the guest does not let it go."""
        qmp = self._require_qmp()
        async with self._hotplug_lock:
            hot = next((h for h in self._hot if h.device == device), None)
            if hot is None:
                if device in self.devices:
                    raise HypervisorError(
                        f"qemu cannot hot-unplug {device}: it is cold-plugged on the root bus"
                    )
                raise HypervisorError(f"qemu: {device} is not attached")
            await self._unplug(qmp, hot.qdev_id)
            self._hot.remove(hot)  # the guest and QEMU let it go: the port is free
            command, arguments = (
                ("blockdev-del", {"node-name": hot.backend})
                if isinstance(device, BlockDevice)
                else ("netdev_del", {"id": hot.backend})
            )
            try:
                await qmp.execute(command, arguments, timeout=QMP_TIMEOUT)
                if hot.fdset is not None:  # QEMU closes the disk's fd
                    await qmp.execute("remove-fd", {"fdset-id": hot.fdset}, timeout=QMP_TIMEOUT)
            except QmpError as err:
                raise HypervisorError(f"qemu: {hot.qdev_id} removed but not its back-end: {err}") from err
        self.log.info("sandbox %s: removed %s (%s)", self.sandbox_id, device, hot.qdev_id)

    async def resize_vcpu(self, old_vcpus: int, new_vcpus: int) -> tuple[int, int]:
        """Bring the guest to ``new_vcpus`` vCPUs (capped at `max_vcpus`, as runtime-rs, with a warning):
        ``device_add`` on the free CPU slots ``query-hotpluggable-cpus`` names, or ``device_del`` of the
        vCPUs added before, newest first (the boot vCPUs stay). Returns (vCPUs before, vCPUs now), as QEMU
        counts them; ``old_vcpus`` is only logged. The agent onlines added vCPUs (OnlineCPUMem)."""
        qmp = self._require_hotplug("vcpu", "vCPU")
        if new_vcpus < 1:
            raise HypervisorError(f"qemu: cannot resize to {new_vcpus} vCPUs")
        top = self.max_vcpus()
        if new_vcpus > top:
            self.log.warning("sandbox %s: %d vCPUs asked, maxcpus is %d", self.sandbox_id, new_vcpus, top)
            new_vcpus = top
        async with self._hotplug_lock:
            slots = await self._cpu_slots(qmp)
            current = sum(1 for _, plugged in slots if plugged)
            try:
                if new_vcpus > current:
                    free = [props for props, plugged in slots if not plugged]
                    for props in free[: new_vcpus - current]:
                        qdev = f"cpu-hp{next(self._hot_ids)}"
                        await self._device_add(qmp, {**props, "id": qdev})
                        self._hot_cpus.append(qdev)
                elif new_vcpus < current:
                    removable = min(current - new_vcpus, len(self._hot_cpus))
                    if removable < current - new_vcpus:
                        self.log.warning(
                            "sandbox %s: %d vCPUs asked; the %d boot vCPUs stay",
                            self.sandbox_id,
                            new_vcpus,
                            self.config.default_vcpus,
                        )
                    for _ in range(removable):
                        await self._unplug(qmp, self._hot_cpus[-1], _cpu_gone)
                        self._hot_cpus.pop()
            finally:
                with trio.CancelScope(shield=True):
                    now = await self._refresh_vcpus(qmp)
        self.log.info(
            "sandbox %s: vCPUs %d -> %d (asked %d -> %d)", self.sandbox_id, current, now, old_vcpus, new_vcpus
        )
        return current, now

    async def _cpu_slots(self, qmp: QmpClient) -> list[tuple[dict[str, Any], bool]]:
        """``query-hotpluggable-cpus`` as (device_add arguments, plugged), lowest topology ids first."""
        answer = await qmp.execute("query-hotpluggable-cpus", timeout=QMP_TIMEOUT)
        slots = []
        for entry in answer if isinstance(answer, list) else []:
            props = entry.get("props") if isinstance(entry, dict) else None
            driver = entry.get("type") if isinstance(entry, dict) else None
            if not isinstance(props, dict) or not isinstance(driver, str):
                raise QmpError(f"QMP query-hotpluggable-cpus: malformed entry {str(entry)[:120]}")
            ids = {k: v for k, v in props.items() if isinstance(v, int) and not isinstance(v, bool)}
            slots.append(({"driver": driver, **ids}, "qom-path" in entry))
        if not slots:
            raise QmpError("QMP query-hotpluggable-cpus: no CPU slots")
        keys = ("node-id", "socket-id", "die-id", "core-id", "thread-id")
        return sorted(slots, key=lambda s: tuple(int(s[0].get(k, 0)) for k in keys))

    async def _refresh_vcpus(self, qmp: QmpClient) -> int:
        """The vCPU thread ids again (``query-cpus-fast``); returns how many vCPUs QEMU runs."""
        try:
            cpus = await qmp.execute("query-cpus-fast", timeout=QMP_TIMEOUT)
        except QmpError as err:
            self.log.warning("sandbox %s: query-cpus-fast: %s", self.sandbox_id, err)
            return len(self._vcpu_tids)
        cpus = cpus if isinstance(cpus, list) else []
        self._vcpu_tids = [int(c["thread-id"]) for c in cpus if isinstance(c, dict) and "thread-id" in c]
        return len(cpus)


def _is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(path.stat().st_mode)
    except OSError:
        return False  # QEMU says why it cannot open it


def _open_disk_nofollow(path: Path, read_only: bool) -> tuple[int, bool]:
    """(fd, is a block device) of the disk at ``path``, opened without following a symlink there."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as err:
        why = err.strerror
        raise HypervisorError(f"qemu: cannot open disk {path} (symlinks not followed): {why}") from err
    return fd, stat.S_ISBLK(os.fstat(fd).st_mode)


async def _cpu_gone(qmp: QmpClient, qdev_id: str) -> bool:
    """Whether QEMU runs the vCPU ``qdev_id`` no more (``query-cpus-fast``)."""
    cpus = await qmp.execute("query-cpus-fast", timeout=QMP_TIMEOUT)
    path = PERIPHERAL + qdev_id
    return not any(isinstance(c, dict) and c.get("qom-path") == path for c in cpus or [])


async def _first_of(*events: trio.Event) -> None:
    """Return once any of ``events`` is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)
