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
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
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
from kata_shim.hypervisor._common import (
    BASE_CMDLINE,
    ConsoleSink,
    check_guest,
    check_vmm_binary,
    disk_letters,
    netns_path,
)
from kata_shim.hypervisor._qmp import QmpClient, QmpError, QmpEvent
from kata_shim.hypervisor._vhost import open_vhost_net, open_vhost_vsock
from kata_shim.persist import PROCESSES_KEY, StateStore, sandbox_dir

log = logging.getLogger("kata_shim.hypervisor.qemu")

QMP_NAME = "qmp.sock"
VIRTIOFSD_NAME = "vhost-fs.sock"
FIRST_SLOT = 5
"""First PCI slot of an `add_device` device (02-04 are the image, vsock and rng)."""
IMAGE_SLOT, VSOCK_SLOT, RNG_SLOT = 2, 3, 4
MEM_ID = "mem"
MEM_BACKEND = f"memory-backend={MEM_ID}"
BLOCK_OPTS = "cache=none,aio=threads"
"""Container block devices bypass the host page cache (the guest has its own)."""
LAST_SLOT = 0x1F
QMP_TIMEOUT = 10.0
STOP_GRACE = 10.0
"""Seconds QEMU gets to leave after QMP ``quit`` before SIGKILL."""
VIRTIOFSD_GRACE = 2.0
"""Seconds QEMU has to exit after virtiofsd did, before virtiofsd's exit counts as the VM's death."""
"""Seconds a child's output may still come after it exited (its last words before a start failure)."""
SOCKET_WAIT = 30.0
"""Budget for QEMU's QMP socket and virtiofsd's vhost-user socket to appear."""
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


@dataclass
class _Slot:
    device: Device
    slot: int


class Qemu:
    """`Hypervisor` back-end running QEMU as a child process (runtime-rs `qemu`)."""

    name = "qemu"

    def __init__(
        self,
        config: HypervisorConfig,
        *,
        state_root: Path | None = None,
        open_vsock: VsockOpener | None = open_vhost_vsock,
    ) -> None:
        """``open_vsock=None`` leaves the vsock device out (tests that run QEMU without /dev/vhost-vsock)."""
        self.config = config
        self._state_root = state_root
        self._open_vsock = open_vsock
        self.sandbox_id = ""
        self.state_dir: Path | None = None
        self.netns: str | None = None
        self._devices: list[_Slot] = []
        self._next_slot = FIRST_SLOT
        self.cid = 0
        self._console = ConsoleSink(log)
        self._qemu: Child | None = None
        self._virtiofsd: Child | None = None
        self._qmp: QmpClient | None = None
        self._vcpu_tids: list[int] = []
        self._events: list[QmpEvent] = []
        self._shutdown_reason = ""
        self._panicked = False
        self._death = ""
        """Why the VM ended when the back-end saw it first (virtiofsd gone, start failure)."""
        self._exited = trio.Event()
        self._stopping = False
        self._cleaned = False
        self._pass_fds: list[int] = []

    # --- set-up ------------------------------------------------------------------------------------
    @property
    def qmp_path(self) -> Path:
        """QEMU's QMP socket (valid after `prepare_vm`)."""
        return self._state() / QMP_NAME

    @property
    def virtiofsd_socket(self) -> Path:
        """virtiofsd's vhost-user socket (valid after `prepare_vm`)."""
        return self._state() / VIRTIOFSD_NAME

    def _state(self) -> Path:
        if self.state_dir is None:
            raise HypervisorError("prepare_vm() has not run")
        return self.state_dir

    def _check_config(self) -> None:
        check_vmm_binary(self.config, self.name, "QEMU")
        check_guest(self.config, self.name, CAPABILITIES)

    async def prepare_vm(self, sandbox_id: str, netns: str | None) -> None:
        """Check the config (binaries, kernel, image) and create /run/kata/<sandbox id>/; start nothing."""
        self._check_config()
        try:
            state_dir = sandbox_dir(sandbox_id, self._state_root)
        except Exception as err:
            raise HypervisorError(str(err)) from err
        longest = max(len(str(state_dir / name)) for name in (QMP_NAME, VIRTIOFSD_NAME))
        if longest >= 108:
            raise HypervisorError(f"state directory {state_dir} is too long for a unix socket path")
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise HypervisorError(f"cannot create {state_dir}: {err.strerror}") from err
        self.sandbox_id = sandbox_id
        self.state_dir = state_dir
        self.netns = netns

    def capabilities(self) -> Capabilities:
        """Block devices, virtio-fs through virtiofsd, vsock, PCI addressing; no passfd, no hot-plug yet."""
        return CAPABILITIES

    async def add_device(self, device: Device) -> DeviceInfo:
        """Cold-plug a device (before `start_vm`) on the next free root-bus slot; its PCI path says where."""
        if self.state_dir is None:
            raise HypervisorError("add_device() before prepare_vm()")
        if self._qemu is not None:
            raise HypervisorError(f"qemu cannot hot-plug a {type(device).__name__} (no hot-plug yet)")
        if isinstance(device, ShareFsDevice):
            if self.config.shared_fs in ("none", ""):
                raise HypervisorError("shared_fs is off in the configuration; cannot share a directory")
            if any(isinstance(s.device, ShareFsDevice) for s in self._devices):
                raise HypervisorError("qemu: one shared directory per VM (one virtiofsd)")
            if not device.host_path.is_dir():
                raise HypervisorError(f"shared directory {device.host_path} not found")
        elif isinstance(device, BlockDevice):
            if not device.path.exists():
                raise HypervisorError(f"block device {device.path} not found")
        elif not isinstance(device, NetworkDevice):
            raise HypervisorError(f"qemu cannot attach a {type(device).__name__}")
        if self._next_slot > LAST_SLOT:
            raise HypervisorError("qemu: no free PCI slot on the root bus")
        slot = self._next_slot
        self._next_slot += 1
        self._devices.append(_Slot(device, slot))
        guest_path = ""
        if isinstance(device, BlockDevice):
            index = sum(isinstance(s.device, BlockDevice) for s in self._devices) - 1
            guest_path = "/dev/vd" + disk_letters(index + (1 if self.config.image is not None else 0))
        return DeviceInfo(guest_path=guest_path, pci_path=f"{slot:02x}")

    def cmdline(self) -> str:
        """The guest kernel command line."""
        parts = [BASE_CMDLINE]
        if not self.config.enable_debug:
            parts.append("quiet")
        if self.config.kernel_params.strip():
            parts.append(self.config.kernel_params.strip())
        return " ".join(parts)

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
        for n, entry in enumerate(self._devices):
            argv += self._device_args(n, entry, (net_fds or {}).get(entry.slot))
        return argv

    def _device_args(self, n: int, entry: _Slot, net: tuple[int, int | None] | None) -> list[str]:
        device, addr = entry.device, f"bus=pcie.0,addr={entry.slot:#x}"
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

    def virtiofsd_argv(self, share: ShareFsDevice) -> list[str]:
        """virtiofsd's command line (Debian's C virtiofsd and the Rust one take these)."""
        cfg = self.config
        return [
            cfg.virtio_fs_daemon,
            f"--socket-path={self.virtiofsd_socket}",
            "-o", f"source={_escape(share.host_path)}",
            "-o", f"cache={cfg.virtio_fs_cache or 'auto'}",
            *cfg.virtio_fs_extra_args,
        ]  # fmt: skip

    # --- running -----------------------------------------------------------------------------------
    async def _spawn(self, name: str, argv: list[str], pass_fds: list[int]) -> Child:
        log.info("sandbox %s: starting %s: %s", self.sandbox_id, name, " ".join(argv))
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                start_new_session=True,  # containerd's signals to the shim's group are not QEMU's
            )
        except OSError as err:
            raise HypervisorError(f"cannot start {name} ({argv[0]}): {err.strerror or err}") from err
        child = Child(name, process)
        trio.lowlevel.spawn_system_task(self._supervise, child, name=f"qemu-{name}-{self.sandbox_id}")
        return child

    async def _supervise(self, child: Child) -> None:
        """Log the child's output (the guest console for QEMU); notice its exit (`Child.wait_draining`)."""
        sink = self._console if child.name == "qemu" else ConsoleSink(log)
        try:
            await child.wait_draining(sink)
        except Exception:  # a system task must not raise
            log.exception("sandbox %s: supervising %s failed", self.sandbox_id, child.name)
        finally:
            child.exited.set()
            if child.returncode is not None:
                await self._on_exit(child)

    async def _on_exit(self, child: Child) -> None:
        qemu = self._qemu
        if child is self._virtiofsd and not self._stopping and not self._shutdown_reason and qemu is not None:
            # virtiofsd also leaves when QEMU closes the vhost-user connection (a power-off, a crash):
            # give QEMU a moment to be the one that ended before calling the share lost
            with trio.move_on_after(VIRTIOFSD_GRACE):
                await qemu.exited.wait()
        quiet = self._stopping or bool(self._shutdown_reason) or (qemu is not None and qemu.exited.is_set())
        if child is self._qemu:
            quiet = self._stopping or self._clean_exit()
        log.log(
            logging.INFO if quiet else logging.ERROR, "sandbox %s: %s", self.sandbox_id, child.describe_exit()
        )
        if child is self._virtiofsd and not quiet:
            # the guest's root share is gone: the VM cannot go on; stop QEMU so wait_vm returns
            self._death = self._death or f"{child.describe_exit()} (the shared directory is gone)"
            if qemu is not None:
                qemu.kill()
            else:
                self._exited.set()
        if child is self._qemu:
            self._exited.set()

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
            log.error("sandbox %s: the guest panicked (%s)", self.sandbox_id, action)
            if self._qemu is not None and action != "poweroff":
                self._qemu.kill()  # a paused panicked guest would never end on its own
        elif name in ("RESET", "STOP", "RESUME"):
            log.info("sandbox %s: QMP event %s", self.sandbox_id, name)

    async def _start_virtiofsd(self, share: ShareFsDevice) -> None:
        sock = self.virtiofsd_socket
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        self._virtiofsd = await self._spawn("virtiofsd", self.virtiofsd_argv(share), [])
        self._persist()  # before QEMU exists: a shim crash from here on must not leave virtiofsd
        with trio.move_on_after(SOCKET_WAIT):
            while not sock.exists():
                if self._virtiofsd.exited.is_set():
                    break
                await trio.sleep(0.02)
        if not sock.exists():
            await trio.sleep(0.1)  # let its last output reach the log
            raise HypervisorError(f"virtiofsd did not create {sock} ({self._virtiofsd.describe_exit()})")

    async def _open_taps(self) -> dict[int, tuple[int, int | None]]:
        """Open each network device's tap inside the pod's netns (a thread of its own enters it) and a
        vhost-net fd for it (unless `disable_vhost_net` or there is no /dev/vhost-net)."""
        from kata_resources import to_thread_in_netns
        from kata_vmm import VirtioError, open_tap

        fds: dict[int, tuple[int, int | None]] = {}
        for entry in self._devices:
            if not isinstance(entry.device, NetworkDevice):
                continue
            tap = entry.device.tap
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
                    log.warning("sandbox %s: no vhost-net (%s): virtio-net without it", self.sandbox_id, err)
            fds[entry.slot] = (tap_fd, vhost_fd)
        return fds

    def _close_passed_fds(self) -> None:
        for fd in self._pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pass_fds.clear()

    def _persist(self) -> None:
        processes = [
            {"name": c.name, "pid": c.pid, "start_time": c.start_time}
            for c in (self._qemu, self._virtiofsd)
            if c is not None
        ]
        try:
            StateStore(self._state_root).update(self.sandbox_id, extra={PROCESSES_KEY: processes})
        except Exception as err:  # the state file is for crash cleanup: never a reason to fail the VM
            log.warning("sandbox %s: cannot record the qemu processes for cleanup: %s", self.sandbox_id, err)

    async def start_vm(self, timeout: float) -> None:  # noqa: ASYNC109 (runtime-rs signature)
        """Start virtiofsd and QEMU (paused), negotiate QMP, read the vCPU thread ids, then ``cont``.

        A QEMU that exits or a QMP that fails during start raises `HypervisorError` with QEMU's output."""
        self._state()
        if self._qemu is not None:
            raise HypervisorError("start_vm() called twice")
        try:
            share = next((s.device for s in self._devices if isinstance(s.device, ShareFsDevice)), None)
            if share is not None:
                assert isinstance(share, ShareFsDevice)
                await self._start_virtiofsd(share)
            vsock = None
            if self._open_vsock is not None:
                vsock = await trio.to_thread.run_sync(self._open_vsock)
                self.cid = vsock[0]
                self._pass_fds.append(vsock[1])
            net_fds = await self._open_taps()
            with contextlib.suppress(FileNotFoundError):
                self.qmp_path.unlink()
            argv = self.qemu_argv(vsock=vsock, net_fds=net_fds)
            self._qemu = await self._spawn("qemu", argv, list(self._pass_fds))
            self._close_passed_fds()  # QEMU has its own copies
            self._persist()
            await self._connect_qmp()
            assert self._qmp is not None
            cpus = await self._qmp.execute("query-cpus-fast", timeout=QMP_TIMEOUT)
            self._vcpu_tids = [int(c["thread-id"]) for c in cpus if isinstance(c, dict) and "thread-id" in c]
            await self._qmp.execute("cont", timeout=QMP_TIMEOUT)
        except (HypervisorError, OSError, KeyError, TypeError, ValueError) as err:
            self._close_passed_fds()
            message = f"qemu: start failed: {err}"
            if self._qemu is not None and self._qemu.exited.is_set():
                message = f"qemu: start failed: {self._qemu.describe_exit()}"
            await trio.lowlevel.checkpoint()
            tail = self._console.tail()
            raise HypervisorError(message + (f"; output:\n{tail}" if tail else "")) from err
        log.info(
            "sandbox %s: QEMU %d started (%d vCPU, %d MiB, vsock CID %d)",
            self.sandbox_id,
            self._qemu.pid,
            self.config.default_vcpus,
            self.config.default_memory,
            self.cid,
        )

    async def _connect_qmp(self) -> None:
        """Dial QMP until QEMU listens (it creates the socket early) or exits."""
        assert self._qemu is not None
        with trio.move_on_after(SOCKET_WAIT):
            while True:
                if self._qemu.exited.is_set():
                    raise HypervisorError(self._qemu.describe_exit())
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
        if self._qmp is None or self._qemu is None:
            raise HypervisorError("the VM is not running (start_vm() has not run)")
        return self._qmp

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a QMP command on this VM's QEMU."""
        return await self._require_qmp().execute(command, arguments, timeout=QMP_TIMEOUT)

    async def wait_vm(self) -> int:
        """Sleep until QEMU exits; 0 for a guest power-off, reboot or a host stop, else 1."""
        self._require_qmp()
        await self._exited.wait()
        return 0 if self._clean_exit() else 1

    def _clean_exit(self) -> bool:
        if self._panicked or self._death:
            return False
        if self._stopping:
            return True
        code = self._qemu.returncode if self._qemu is not None else None
        return code == 0 and self._shutdown_reason in CLEAN_SHUTDOWN_REASONS

    def exit_reason(self) -> str:
        """How the guest ended (empty while QEMU runs)."""
        if not self._exited.is_set() or self._qemu is None:
            return self._death
        parts = []
        if self._death:
            parts.append(self._death)
        if self._panicked:
            parts.append("guest panicked")
        if self._shutdown_reason:
            parts.append(f"shutdown: {self._shutdown_reason}")
        parts.append(self._qemu.describe_exit())
        return "; ".join(parts)

    def console_tail(self) -> str:
        """The last lines QEMU and the guest console printed."""
        return self._console.tail()

    def events(self) -> list[QmpEvent]:
        """The first QMP events of this VM (name and data; at most 64), for tests and diagnosis."""
        return list(self._events)

    async def stop_vm(self) -> None:
        """QMP ``quit``, then SIGKILL after `STOP_GRACE` seconds; virtiofsd after QEMU. Idempotent."""
        self._stopping = True
        qemu, fsd = self._qemu, self._virtiofsd
        if qemu is not None and not qemu.exited.is_set():
            if self._qmp is not None:
                with contextlib.suppress(QmpError):
                    await self._qmp.execute("quit", timeout=QMP_TIMEOUT / 2)
            with trio.move_on_after(STOP_GRACE):
                await qemu.exited.wait()
            if not qemu.exited.is_set():
                log.warning("sandbox %s: QEMU did not quit within %g s: SIGKILL", self.sandbox_id, STOP_GRACE)
                qemu.kill()
                await qemu.exited.wait()
        if fsd is not None and not fsd.exited.is_set():
            fsd.kill(signal.SIGTERM)
            with trio.move_on_after(STOP_GRACE):
                await fsd.exited.wait()
            if not fsd.exited.is_set():
                fsd.kill()
                await fsd.exited.wait()
        self._exited.set()

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

    async def save_vm(self, directory: Path) -> None:
        """No VM templates on this back-end (`capabilities().snapshot` is False)."""
        raise HypervisorError(f"{self.name} cannot save a VM as a template (only the built-in VMM can)")

    def restore_from(self, directory: Path | None) -> None:
        """No VM templates on this back-end: only None (boot) is accepted."""
        if directory is not None:
            raise HypervisorError(
                f"{self.name} cannot start a VM from a template (only the built-in VMM can)"
            )

    def agent_address(self) -> str:
        """``vsock://<guest CID>:1024``."""
        return f"vsock://{self.cid}:{AGENT_VSOCK_PORT}"

    def set_passfd_listener_port(self, port: int) -> None:
        """QEMU has no hybrid vsock: passfd stays off (`capabilities().passfd` is False)."""

    def passfd_listener(self) -> tuple[Path, int] | None:
        """Always None: stdio goes over ttrpc."""
        return None

    def pids(self) -> list[int]:
        """QEMU's pid, then virtiofsd's (those still running). Before `start_vm`: the shim itself, which
        forks both, so the sandbox cgroup the caller puts it in is theirs from their first instruction
        (on cgroup v2 QEMU's vCPU threads can then move to the vCPU cgroup of that domain)."""
        if self._qemu is None:
            return [os.getpid()]
        return [c.pid for c in (self._qemu, self._virtiofsd) if c is not None and not c.exited.is_set()]

    def thread_ids(self) -> list[int]:
        """Every thread of the QEMU process."""
        if self._qemu is None or self._qemu.exited.is_set():
            return []
        try:
            return sorted(int(t) for t in os.listdir(f"/proc/{self._qemu.pid}/task"))
        except OSError:
            return []

    def vcpu_thread_ids(self) -> list[int]:
        """The vCPU threads, as QMP ``query-cpus-fast`` named them at start."""
        return [] if self._qemu is None or self._qemu.exited.is_set() else list(self._vcpu_tids)

    async def cleanup(self) -> None:
        """Stop QEMU and virtiofsd (both reaped), close the QMP connection, remove the sockets and the
        processes' record in state.json; idempotent."""
        if self._cleaned:
            return
        self._cleaned = True
        try:
            with trio.CancelScope(shield=True):
                await self.stop_vm()
        finally:
            self._close_passed_fds()
            if self._qmp is not None:
                await self._qmp.aclose()
            if self.state_dir is not None:
                for name in (QMP_NAME, VIRTIOFSD_NAME):
                    with contextlib.suppress(OSError):
                        (self.state_dir / name).unlink()
                if self._qemu is not None or self._virtiofsd is not None:
                    with contextlib.suppress(Exception):
                        StateStore(self._state_root).forget(self.sandbox_id, PROCESSES_KEY)
