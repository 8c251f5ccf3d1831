"""What the external back-ends (QEMU, Cloud Hypervisor, Firecracker) share: the VMM as a supervised child
process, with a virtiofsd beside it for the shared directory, and their life cycle, one copy.

- `prepare_vm` checks the config (VMM binary, guest) and creates /run/kata/<sandbox id>/ with room for the
  back-end's sockets (`SOCKET_NAMES`).
- `start_vm` starts virtiofsd (and waits for its socket), then the back-end's `_start_vmm` (the VMM's command
  line, its API handshake, the boot), all within ``timeout``. Each child's pid and start time go to the
  sandbox's state.json (``extra["processes"]``) as soon as it exists, so `containerd-shim-kata-v2 delete`
  kills them after a shim crash. A start that fails kills and reaps every child it spawned, closes what it
  meant to pass and removes the sockets before it raises `HypervisorError` with the VMM's last output.
- Each child's output is logged (the VMM's is the guest's serial console); its exit is noticed. The VMM's
  exit is the VM's end; virtiofsd's exit is too (the guest's root share is gone: the VMM is killed), unless
  the VMM is ending anyway (it closes the vhost-user connection first).
- `stop_vm` asks the VMM to leave (`_shutdown`: QMP ``quit``, a REST shutdown), SIGKILL after `STOP_GRACE`
  seconds; then virtiofsd (SIGTERM, SIGKILL). `cleanup` stops, releases the back-end's connections
  (`_release`), removes the sockets and forgets the processes' record.

A back-end gives `_start_vmm`, `_shutdown`, `agent_address`, its capabilities and its device translation.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

import trio

from kata_shim.hypervisor._base import (
    BlockDevice,
    Capabilities,
    Device,
    HypervisorConfig,
    HypervisorError,
    MemoryConfig,
    NetworkDevice,
    ShareFsDevice,
)
from kata_shim.hypervisor._child import Child
from kata_shim.hypervisor._common import (
    ConsoleSink,
    check_guest,
    check_vmm_binary,
    disk_letters,
    guest_cmdline,
    make_state_dir,
)
from kata_shim.persist import PROCESSES_KEY, StateStore

VIRTIOFSD_NAME = "vhost-fs.sock"
SOCKET_WAIT = 30.0
"""Budget for a VMM's API socket and virtiofsd's socket to appear."""
STOP_GRACE = 10.0
"""Seconds the VMM gets to leave after its shutdown request (and virtiofsd after SIGTERM) before SIGKILL."""
VIRTIOFSD_GRACE = 2.0
"""Seconds the VMM has to exit after virtiofsd did, before virtiofsd's exit counts as the VM's death."""
START_ERRORS = (HypervisorError, OSError, KeyError, TypeError, ValueError, trio.TooSlowError)
"""What a failed start raises inside `start_vm` (a malformed answer included) before it becomes one
`HypervisorError`."""


class ExternalVmm:
    """Base of the `Hypervisor` back-ends whose VMM is a child process of the shim."""

    name = ""
    vmm_name = ""
    """The VMM child's name in messages and in state.json ("qemu", "cloud-hypervisor", "firecracker")."""
    binary_name = ""
    """The binary's name in config errors ("QEMU")."""
    vcpu_thread_prefix = ""
    """The comm prefix of the VMM's vCPU threads."""
    CAPABILITIES = Capabilities()
    SOCKET_NAMES: tuple[str, ...] = (VIRTIOFSD_NAME,)
    """The files the back-end creates in the state directory: removed by `cleanup` and a failed start."""
    SOCKET_PATH_ROOM = 0
    """Bytes a socket path may grow by (Firecracker's ``<uds>_<port>``): checked by `prepare_vm`."""

    def __init__(self, config: HypervisorConfig, *, state_root: Path | None = None) -> None:
        self.config = config
        self._state_root = state_root
        self.sandbox_id = ""
        self.state_dir: Path | None = None
        self.netns: str | None = None
        self.devices: list[Device] = []
        """Cold-plugged devices, in `add_device` order."""
        self._console = ConsoleSink(self.log)
        self._vmm: Child | None = None
        self._virtiofsd: Child | None = None
        self._death = ""
        """Why the VM ended when the back-end saw it first (virtiofsd gone, a guest reset, a failed start)."""
        self._exited = trio.Event()
        self._stopping = False
        self._cleaned = False

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"kata_shim.hypervisor.{self.name}")

    # --- set-up -------------------------------------------------------------------------------------
    def _state(self) -> Path:
        if self.state_dir is None:
            raise HypervisorError("prepare_vm() has not run")
        return self.state_dir

    @property
    def virtiofsd_socket(self) -> Path:
        """virtiofsd's vhost-user socket (valid after `prepare_vm`)."""
        return self._state() / VIRTIOFSD_NAME

    def _check_config(self) -> None:
        check_vmm_binary(self.config, self.name, self.binary_name or self.vmm_name)
        check_guest(self.config, self.name, self.CAPABILITIES)

    async def prepare_vm(self, sandbox_id: str, netns: str | None) -> None:
        """Check the config (binaries, kernel, image) and create /run/kata/<sandbox id>/; start nothing."""
        self._check_config()
        state_dir = make_state_dir(
            sandbox_id, self._state_root, self.SOCKET_NAMES, room=self.SOCKET_PATH_ROOM
        )
        self.sandbox_id = sandbox_id
        self.state_dir = state_dir
        self.netns = netns

    def capabilities(self) -> Capabilities:
        return self.CAPABILITIES

    async def save_vm(self, directory: Path) -> None:
        """No VM templates on an external back-end (`capabilities().snapshot` is False)."""
        raise HypervisorError(f"{self.name} cannot save a VM as a template (only the built-in VMM can)")

    def restore_from(self, directory: Path | None) -> None:
        """No VM templates on an external back-end: only None (boot) is accepted."""
        if directory is not None:
            raise HypervisorError(f"{self.name} cannot start a VM from a template (the built-in VMM can)")

    async def remove_device(self, device: Device) -> None:
        """No hot-unplug on this back-end (its `capabilities().hotplug` says what it can add)."""
        raise HypervisorError(f"{self.name} cannot hot-unplug a {type(device).__name__}")

    async def resize_vcpu(self, old_vcpus: int, new_vcpus: int) -> tuple[int, int]:
        """No vCPU hot-plug here (a back-end that has it overrides this)."""
        raise HypervisorError(f"{self.name} cannot resize vCPUs ({old_vcpus} -> {new_vcpus})")

    async def resize_memory(self, new_mib: int) -> tuple[int, MemoryConfig]:
        """No memory hot-plug here (a back-end that has it overrides this)."""
        raise HypervisorError(f"{self.name} cannot resize memory (to {new_mib} MiB)")

    def cmdline(self) -> str:
        """The guest kernel command line."""
        return guest_cmdline(self.config)

    def _check_cold_device(self, device: Device, *, opens_block_fd: bool = False) -> None:
        """A device the back-end can attach: one existing shared directory (with virtio-fs on), an existing
        block device, a network device. A block device with ``follow_symlinks`` False only when the caller
        opens it itself and hands its VMM the fd (``opens_block_fd``): a VMM given the path follows it."""
        if self.state_dir is None:
            raise HypervisorError("add_device() before prepare_vm()")
        if isinstance(device, ShareFsDevice):
            if not self.CAPABILITIES.fs_sharing:
                raise HypervisorError(
                    f"{self.name} cannot share a directory: it has no virtio-fs (capabilities().shared_fs is "
                    "empty) and a block-device rootfs is not built; use another hypervisor"
                )
            if self.config.shared_fs in ("none", ""):
                raise HypervisorError("shared_fs is off in the configuration; cannot share a directory")
            if any(isinstance(d, ShareFsDevice) for d in self.devices):
                raise HypervisorError(f"{self.name}: one shared directory per VM (one virtiofsd)")
            if not device.host_path.is_dir():
                raise HypervisorError(f"shared directory {device.host_path} not found")
        elif isinstance(device, BlockDevice):
            if not device.follow_symlinks and not opens_block_fd:
                raise HypervisorError(
                    f"{self.name} hands its VMM a disk's path, which it opens following symlinks: cannot "
                    f"attach {device.path}, which must be opened without (a blockfile snapshot)"
                )
            if not device.path.exists():
                raise HypervisorError(f"block device {device.path} not found")
        elif not isinstance(device, NetworkDevice):
            raise HypervisorError(f"{self.name} cannot attach a {type(device).__name__}")

    def _block_guest_path(self) -> str:
        """The guest's name of the block device just appended to `devices` (the image is /dev/vda)."""
        index = sum(isinstance(d, BlockDevice) for d in self.devices) - 1
        return "/dev/vd" + disk_letters(index + (1 if self.config.image is not None else 0))

    def virtiofsd_argv(self, share: ShareFsDevice) -> list[str]:
        """virtiofsd's command line (Debian's C virtiofsd and the Rust one take these)."""
        cfg = self.config
        return [
            cfg.virtio_fs_daemon,
            f"--socket-path={self.virtiofsd_socket}",
            "-o", f"source={str(share.host_path).replace(',', ',,')}",
            "-o", f"cache={cfg.virtio_fs_cache or 'auto'}",
            *cfg.virtio_fs_extra_args,
        ]  # fmt: skip

    # --- the children -------------------------------------------------------------------------------
    async def _spawn(self, name: str, argv: list[str], pass_fds: list[int] | None = None) -> Child:
        """Start ``argv`` as a supervised child in a session of its own (containerd's signals to the shim's
        group are not the VMM's)."""
        self.log.info("sandbox %s: starting %s: %s", self.sandbox_id, name, " ".join(argv))
        try:
            process = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds or [],
                start_new_session=True,
            )
        except OSError as err:
            raise HypervisorError(f"cannot start {name} ({argv[0]}): {err.strerror or err}") from err
        child = Child(name, process)
        trio.lowlevel.spawn_system_task(self._supervise, child, name=f"{self.name}-{name}-{self.sandbox_id}")
        return child

    async def _supervise(self, child: Child) -> None:
        """Log the child's output (the VMM's is the guest serial console); notice its exit."""
        sink = self._console if child is self._vmm or child.name == self.vmm_name else ConsoleSink(self.log)
        try:
            await child.wait_draining(sink)
        except Exception:  # a system task must not raise
            self.log.exception("sandbox %s: supervising %s failed", self.sandbox_id, child.name)
        finally:
            child.exited.set()
            if child.returncode is not None:
                await self._on_exit(child)

    def _vm_ending(self) -> bool:
        """Whether the VMM said the VM ends (QEMU's SHUTDOWN event): virtiofsd's exit is no death then."""
        return False

    async def _on_exit(self, child: Child) -> None:
        vmm = self._vmm
        if child is self._virtiofsd and not self._stopping and not self._vm_ending() and vmm is not None:
            # virtiofsd also leaves when the VMM closes the vhost-user connection (a power-off, a crash):
            # give the VMM a moment to be the one that ended before calling the share lost
            with trio.move_on_after(VIRTIOFSD_GRACE):
                await vmm.exited.wait()
        quiet = self._stopping or self._vm_ending() or (vmm is not None and vmm.exited.is_set())
        if child is vmm:
            quiet = self._stopping or self._clean_exit()
        level = logging.INFO if quiet else logging.ERROR
        self.log.log(level, "sandbox %s: %s", self.sandbox_id, child.describe_exit())
        if child is self._virtiofsd and not quiet:
            # the guest's root share is gone: the VM cannot go on; stop the VMM so wait_vm returns
            self._death = self._death or f"{child.describe_exit()} (the shared directory is gone)"
            if vmm is not None:
                vmm.kill()
            else:
                self._exited.set()
        if child is vmm:
            self._exited.set()

    def _children(self) -> list[Child]:
        return [c for c in (self._vmm, self._virtiofsd) if c is not None]

    def _persist(self) -> None:
        processes = [{"name": c.name, "pid": c.pid, "start_time": c.start_time} for c in self._children()]
        try:
            StateStore(self._state_root).update(self.sandbox_id, extra={PROCESSES_KEY: processes})
        except Exception as err:  # for crash cleanup only: never a reason to fail the VM
            self.log.warning(
                "sandbox %s: cannot record the %s processes: %s", self.sandbox_id, self.name, err
            )

    async def _wait_socket(self, child: Child, sock: Path, *, listening: bool = False) -> None:
        """Until ``child`` created ``sock`` (and, with ``listening``, accepts on it: a VMM binds its API
        socket before it listens, and a request in between is refused). Never probe a vhost-user socket
        with ``listening``: virtiofsd serves the first connection only."""
        ready = False
        with trio.move_on_after(SOCKET_WAIT):
            while not child.exited.is_set():
                if os.path.exists(sock):  # noqa: ASYNC240 (a stat of a local path)
                    ready = not listening or await _accepts(sock)
                    if ready:
                        break
                await trio.sleep(0.02)
        if not ready:
            await trio.sleep(0.1)  # its last output reaches the log
            state = "did not listen on" if os.path.exists(sock) else "did not create"  # noqa: ASYNC240
            raise HypervisorError(f"{child.name} {state} {sock} ({child.describe_exit()})")

    async def _start_virtiofsd(self, share: ShareFsDevice) -> None:
        """Start virtiofsd for ``share``, record it for crash cleanup (before the VMM exists: a shim crash
        from here on must not leave it), wait for its socket."""
        with contextlib.suppress(FileNotFoundError):
            self.virtiofsd_socket.unlink()
        self._virtiofsd = await self._spawn("virtiofsd", self.virtiofsd_argv(share))
        self._persist()
        await self._wait_socket(self._virtiofsd, self.virtiofsd_socket)

    # --- the back-end's part ------------------------------------------------------------------------
    async def _start_vmm(self) -> None:
        """Spawn the VMM (`_spawn`, into ``self._vmm``, then `_persist`), complete its handshake and let the
        guest run. Runs inside `start_vm`'s deadline; an exception in `START_ERRORS` fails the start."""
        raise NotImplementedError

    async def _shutdown(self) -> None:
        """Ask the VMM to power the VM off and leave."""
        raise NotImplementedError

    async def _release(self) -> None:
        """Close what the back-end holds besides the children (a QMP connection, fds it meant to pass)."""

    def _exit_details(self) -> list[str]:
        """What the back-end knows of the guest's end, for `exit_reason` (a panic, a shutdown reason)."""
        return []

    def agent_address(self) -> str:
        raise NotImplementedError

    # --- running ------------------------------------------------------------------------------------
    async def start_vm(self, timeout: float) -> None:  # noqa: ASYNC109 (runtime-rs signature)
        """Start virtiofsd (for a shared directory) and the VMM, then let the guest run, within ``timeout``.

        A VMM that exits, a handshake that fails or a deadline that passes raises `HypervisorError` with
        the VMM's output, after every child this call started is killed and reaped."""
        self._state()
        if self._vmm is not None:
            raise HypervisorError("start_vm() called twice")
        try:
            with trio.fail_after(max(timeout, 1.0)):
                share = next((d for d in self.devices if isinstance(d, ShareFsDevice)), None)
                if share is not None:
                    await self._start_virtiofsd(share)
                await self._start_vmm()
        except START_ERRORS as err:
            vmm = self._vmm
            budget = max(timeout, 1.0)
            message = f"{self.name}: start failed: {str(err) or f'timed out after {budget:g} s'}"
            if vmm is not None and vmm.exited.is_set() and vmm.describe_exit() not in message:
                message += f" ({vmm.describe_exit()})"
            await self._abort_start(message)
            tail = self._console.tail()
            raise HypervisorError(message + (f"; output:\n{tail}" if tail else "")) from err

    async def _abort_start(self, why: str) -> None:
        """After a failed start: kill and reap every child it spawned, release the rest, remove the
        sockets. The processes' record stays for `cleanup` (it names dead processes only now)."""
        self._stopping = True  # our kill: no error logs, no share-lost verdict
        self._death = self._death or why
        with trio.CancelScope(shield=True):
            children = self._children()
            for child in children:
                child.kill()
            for child in children:
                with trio.move_on_after(STOP_GRACE):
                    await child.exited.wait()
            await self._release()
        self._remove_sockets()
        self._exited.set()

    async def wait_vm(self) -> int:
        """Sleep until the VMM exits; 0 for a clean exit (guest power-off or our stop), else 1."""
        if self._vmm is None:
            raise HypervisorError("the VM is not running (start_vm() has not run)")
        await self._exited.wait()
        return 0 if self._clean_exit() else 1

    def _clean_exit(self) -> bool:
        if self._death:
            return False
        if self._stopping:
            return True
        return self._vmm is not None and self._vmm.returncode == 0

    def exit_reason(self) -> str:
        """How the guest ended (empty while the VMM runs)."""
        if not self._exited.is_set() or self._vmm is None:
            return self._death
        parts = (self._death, *self._exit_details(), self._vmm.describe_exit())
        return "; ".join(p for p in parts if p)

    def console_tail(self) -> str:
        """The last lines the VMM and the guest console printed."""
        return self._console.tail()

    async def stop_vm(self) -> None:
        """The VMM's shutdown request, then SIGKILL after `STOP_GRACE` seconds; virtiofsd after (SIGTERM,
        then SIGKILL). Idempotent."""
        self._stopping = True
        vmm, fsd = self._vmm, self._virtiofsd
        if vmm is not None and not vmm.exited.is_set():
            try:
                with trio.move_on_after(STOP_GRACE / 2):
                    await self._shutdown()
            except HypervisorError as err:
                self.log.info("sandbox %s: shutdown request: %s", self.sandbox_id, err)
            with trio.move_on_after(STOP_GRACE):
                await vmm.exited.wait()
            if not vmm.exited.is_set():
                self.log.warning(
                    "sandbox %s: %s did not leave within %g s: SIGKILL", self.sandbox_id, vmm.name, STOP_GRACE
                )
                vmm.kill()
                await vmm.exited.wait()
        if fsd is not None and not fsd.exited.is_set():
            fsd.kill(signal.SIGTERM)
            with trio.move_on_after(STOP_GRACE):
                await fsd.exited.wait()
            if not fsd.exited.is_set():
                fsd.kill()
                await fsd.exited.wait()
        self._exited.set()

    def set_passfd_listener_port(self, port: int) -> None:
        """No passfd (`capabilities().passfd` is False): stdio goes over ttrpc."""

    def passfd_listener(self) -> tuple[Path, int] | None:
        """Always None: stdio goes over ttrpc."""
        return None

    def pids(self) -> list[int]:
        """The VMM's pid, then virtiofsd's (those still running). Before `start_vm`: the shim itself, which
        forks both, so the sandbox cgroup the caller puts it in is theirs from their first instruction."""
        if self._vmm is None:
            return [os.getpid()]
        return [c.pid for c in self._children() if not c.exited.is_set()]

    def _threads(self) -> list[tuple[int, str]]:
        """(tid, comm) of each thread of the running VMM."""
        if self._vmm is None or self._vmm.exited.is_set():
            return []
        found = []
        try:
            tids = sorted(int(t) for t in os.listdir(f"/proc/{self._vmm.pid}/task"))
        except OSError:
            return []
        for tid in tids:
            try:
                comm = Path(f"/proc/{self._vmm.pid}/task/{tid}/comm").read_text().strip()
            except OSError:
                continue
            found.append((tid, comm))
        return found

    def thread_ids(self) -> list[int]:
        """Every thread of the VMM process."""
        return [tid for tid, _ in self._threads()]

    def vcpu_thread_ids(self) -> list[int]:
        """The VMM's threads whose name starts with `vcpu_thread_prefix`."""
        return [tid for tid, comm in self._threads() if comm.startswith(self.vcpu_thread_prefix)]

    def _remove_sockets(self) -> None:
        if self.state_dir is not None:
            for name in self.SOCKET_NAMES:
                with contextlib.suppress(OSError):
                    (self.state_dir / name).unlink()

    async def cleanup(self) -> None:
        """Stop the VMM and virtiofsd (both reaped), release the back-end's connections, remove the sockets
        and the processes' record; idempotent."""
        if self._cleaned:
            return
        self._cleaned = True
        try:
            with trio.CancelScope(shield=True):
                await self.stop_vm()
        finally:
            with trio.CancelScope(shield=True):
                await self._release()
            self._remove_sockets()
            if self.state_dir is not None and self._children():
                with contextlib.suppress(Exception):
                    StateStore(self._state_root).forget(self.sandbox_id, PROCESSES_KEY)


async def _accepts(sock: Path) -> bool:
    """Whether a unix socket accepts a connection now (refused or gone: not yet)."""
    try:
        stream = await trio.open_unix_socket(str(sock))
    except OSError:
        return False
    await stream.aclose()
    return True
