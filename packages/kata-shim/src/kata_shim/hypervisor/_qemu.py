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

`DeviceInfo.pci_path` is the slot as upstream's PciPath writes a root-bus device ("05"). The agent is
reached over AF_VSOCK: `agent_address()` is ``vsock://<cid>:1024``. No passfd (QEMU has no hybrid vsock):
stdio goes over ttrpc. No hot-plug yet (`capabilities()` says so).

The VM's end is seen three ways, whichever comes first: QEMU exits (its pid), QMP events (SHUTDOWN with its
reason, GUEST_PANICKED), or virtiofsd exits (the guest's root share is gone: QEMU is stopped). The pids and
start times of both processes are recorded in the sandbox's state.json (``extra["processes"]``), so
`containerd-shim-kata-v2 delete` kills them after a shim crash, and only if each is still the process
recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
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
from kata_shim.hypervisor._qmp import QmpClient, QmpError, QmpEvent
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
LAST_SLOT = 0x1F
QMP_TIMEOUT = 10.0
CLEAN_SHUTDOWN_REASONS = frozenset(
    {"guest-shutdown", "host-qmp-quit", "host-signal", "guest-reset", "host-qmp-system-reset"}
)
CAPABILITIES = Capabilities(
    block_device=True,
    hotplug=frozenset(),  # QMP device_add/device_del not built yet
    multi_queue=False,
    shared_fs=frozenset({"virtio-fs"}),
    guest_memory_probe=False,
    agent_transport="vsock",
    passfd=False,
    device_addressing="pci",
)
"""What the qemu back-end does today: cold-plugged PCI devices, virtiofsd, vhost-vsock; no hot-plug."""

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

    @property
    def _qemu(self) -> Child | None:
        """The QEMU child (`_vmm`)."""
        return self._vmm

    # --- set-up ------------------------------------------------------------------------------------
    @property
    def qmp_path(self) -> Path:
        """QEMU's QMP socket (valid after `prepare_vm`)."""
        return self._state() / QMP_NAME

    def capabilities(self) -> Capabilities:
        """Block devices, virtio-fs through virtiofsd, vsock, PCI addressing; no passfd, no hot-plug yet."""
        return CAPABILITIES

    async def add_device(self, device: Device) -> DeviceInfo:
        """Cold-plug a device (before `start_vm`) on the next free root-bus slot; its PCI path says where."""
        if self.state_dir is None:
            raise HypervisorError("add_device() before prepare_vm()")
        if self._vmm is not None:
            raise HypervisorError(f"qemu cannot hot-plug a {type(device).__name__} (no hot-plug yet)")
        self._check_cold_device(device)
        if self._next_slot > LAST_SLOT:
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
            "-smp", str(cfg.default_vcpus),
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
        for n, (device, slot) in enumerate(zip(self.devices, self._slots, strict=True)):
            argv += self._device_args(n, device, slot, (net_fds or {}).get(slot))
        return argv

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
        elif name in ("RESET", "STOP", "RESUME"):
            self.log.info("sandbox %s: QMP event %s", self.sandbox_id, name)

    async def _open_taps(self) -> dict[int, tuple[int, int | None]]:
        """Open each network device's tap inside the pod's netns (a thread of its own enters it) and a
        vhost-net fd for it (unless `disable_vhost_net` or there is no /dev/vhost-net)."""
        from kata_resources import to_thread_in_netns
        from kata_vmm import VirtioError, open_tap

        fds: dict[int, tuple[int, int | None]] = {}
        for device, slot in zip(self.devices, self._slots, strict=True):
            if not isinstance(device, NetworkDevice):
                continue
            tap = device.tap
            try:
                if self.netns is None:
                    tap_fd = await trio.to_thread.run_sync(open_tap, tap)
                else:
                    tap_fd = await to_thread_in_netns(netns_path(self.netns), open_tap, tap)
            except (VirtioError, OSError) as err:
                where = f" in network namespace {self.netns}" if self.netns else ""
                raise HypervisorError(f"qemu: tap {tap}{where}: {err}") from err
            self._pass_fds.append(tap_fd)
            vhost_fd: int | None = None
            if not self.config.disable_vhost_net:
                try:
                    vhost_fd = open_vhost_net()
                    self._pass_fds.append(vhost_fd)
                except OSError as err:
                    self.log.warning(
                        "sandbox %s: no vhost-net (%s): virtio-net without it", self.sandbox_id, err
                    )
            fds[slot] = (tap_fd, vhost_fd)
        return fds

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
        """The vCPU threads, as QMP ``query-cpus-fast`` named them at start."""
        return [] if self._vmm is None or self._vmm.exited.is_set() else list(self._vcpu_tids)
