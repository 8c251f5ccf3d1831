"""What the REST-driven external back-ends (Cloud Hypervisor, Firecracker) share: the VMM as a supervised
child started in the pod's network namespace (it opens the tap by name there, as runtime-rs has it), its API
socket and hybrid vsock socket in the sandbox's state directory, its output as the guest console, its pid and
start time (and virtiofsd's) in state.json for crash cleanup, its exit as the VM's end.

A subclass gives the VMM's argv, the requests that create and boot the VM (`_boot`), the one that powers it
off (`_shutdown`), and its capabilities.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
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
from kata_shim.hypervisor._rest import REST_TIMEOUT, RestResponse, expect, request
from kata_shim.persist import PROCESSES_KEY, StateStore, sandbox_dir

API_NAME = "api.sock"
HVSOCK_NAME = "kata.hvsock"
VIRTIOFSD_NAME = "vhost-fs.sock"
GUEST_CID = 3
"""The guest's vsock CID: a hybrid vsock is private to its VM, so every guest can have the first free one."""
SOCKET_WAIT = 30.0
"""Budget for the API socket and virtiofsd's socket to appear."""
STOP_GRACE = 10.0
"""Seconds the VMM gets to leave after its shutdown request before SIGKILL."""
NSENTER = "nsenter"
"""util-linux's nsenter: runs the VMM in the pod's netns (it execs, so the pid is the VMM's)."""


class RestVmm:
    """Base of the `Hypervisor` back-ends whose VMM is a child process driven over a REST API socket."""

    name = ""
    vmm_name = ""
    """The binary's name in messages ("cloud-hypervisor", "firecracker")."""
    vcpu_thread_prefix = ""
    """The comm prefix of the VMM's vCPU threads."""
    CAPABILITIES = Capabilities()

    def __init__(self, config: HypervisorConfig, *, state_root: Path | None = None) -> None:
        self.config = config
        self._state_root = state_root
        self.sandbox_id = ""
        self.state_dir: Path | None = None
        self.netns: str | None = None
        self.devices: list[Device] = []
        """Cold-plugged devices, in `add_device` order."""
        self._console = ConsoleSink(logging.getLogger(f"kata_shim.hypervisor.{self.name}"))
        self._vmm: Child | None = None
        self._virtiofsd: Child | None = None
        self._booted = False
        self._death = ""
        self._exited = trio.Event()
        self._stopping = False
        self._cleaned = False

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"kata_shim.hypervisor.{self.name}")

    # --- paths --------------------------------------------------------------------------------------
    def _state(self) -> Path:
        if self.state_dir is None:
            raise HypervisorError("prepare_vm() has not run")
        return self.state_dir

    @property
    def api_socket(self) -> Path:
        """The VMM's API socket (valid after `prepare_vm`)."""
        return self._state() / API_NAME

    @property
    def hvsock_path(self) -> Path:
        """The hybrid vsock's host socket (valid after `prepare_vm`)."""
        return self._state() / HVSOCK_NAME

    @property
    def virtiofsd_socket(self) -> Path:
        return self._state() / VIRTIOFSD_NAME

    # --- set-up -------------------------------------------------------------------------------------
    def _check_config(self) -> None:
        check_vmm_binary(self.config, self.name, self.vmm_name)
        check_guest(self.config, self.name, self.CAPABILITIES)

    async def prepare_vm(self, sandbox_id: str, netns: str | None) -> None:
        """Check the config (binaries, kernel, image) and create /run/kata/<sandbox id>/; start nothing."""
        self._check_config()
        try:
            state_dir = sandbox_dir(sandbox_id, self._state_root)
        except Exception as err:
            raise HypervisorError(str(err)) from err
        # Firecracker's guest-initiated vsock sockets are <uds>_<port>: leave room for the port
        longest = max(
            len(str(state_dir / name)) for name in (API_NAME, HVSOCK_NAME + "_65535", VIRTIOFSD_NAME)
        )
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
        return self.CAPABILITIES

    async def save_vm(self, directory: Path) -> None:
        """No VM templates on this back-end (`capabilities().snapshot` is False)."""
        raise HypervisorError(f"{self.name} cannot save a VM as a template (only the built-in VMM can)")

    def restore_from(self, directory: Path | None) -> None:
        """No VM templates on this back-end: only None (boot) is accepted."""
        if directory is not None:
            raise HypervisorError(
                f"{self.name} cannot start a VM from a template (only the built-in VMM can)"
            )

    def cmdline(self) -> str:
        """The guest kernel command line."""
        parts = [BASE_CMDLINE]
        if not self.config.enable_debug:
            parts.append("quiet")
        if self.config.kernel_params.strip():
            parts.append(self.config.kernel_params.strip())
        return " ".join(parts)

    def _check_cold_device(self, device: Device) -> None:
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
            if not device.path.exists():
                raise HypervisorError(f"block device {device.path} not found")
        elif not isinstance(device, NetworkDevice):
            raise HypervisorError(f"{self.name} cannot attach a {type(device).__name__}")

    def _block_guest_path(self) -> str:
        """The guest's name of the block device just appended to `devices` (the image is /dev/vda)."""
        index = sum(isinstance(d, BlockDevice) for d in self.devices) - 1
        return "/dev/vd" + disk_letters(index + (1 if self.config.image is not None else 0))

    async def add_device(self, device: Device) -> DeviceInfo:
        """Cold-plug a device (before `start_vm`)."""
        self._check_cold_device(device)
        if self._vmm is not None:
            raise HypervisorError(f"{self.name} cannot hot-plug a {type(device).__name__}")
        self.devices.append(device)
        return DeviceInfo(guest_path=self._block_guest_path() if isinstance(device, BlockDevice) else "")

    # --- the VMM's API ------------------------------------------------------------------------------
    async def api(
        self, method: str, path: str, body: object | None = None, ok: tuple[int, ...] = (204,)
    ) -> RestResponse:
        """One request to the VMM's API; a status outside ``ok`` is a `RestError`."""
        what = f"{self.vmm_name} {method} {path}"
        return expect(await request(self.api_socket, method, path, body, timeout=REST_TIMEOUT), what, ok)

    def vmm_argv(self) -> list[str]:
        raise NotImplementedError

    async def _boot(self) -> None:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        """Ask the VMM to power the VM off and leave."""
        raise NotImplementedError

    def virtiofsd_argv(self, share: ShareFsDevice) -> list[str]:
        """virtiofsd's command line (as the qemu back-end's)."""
        cfg = self.config
        return [
            cfg.virtio_fs_daemon,
            f"--socket-path={self.virtiofsd_socket}",
            "-o", f"source={str(share.host_path).replace(',', ',,')}",
            "-o", f"cache={cfg.virtio_fs_cache or 'auto'}",
            *cfg.virtio_fs_extra_args,
        ]  # fmt: skip

    def spawn_argv(self) -> list[str]:
        """The VMM's argv as spawned: inside the pod's netns through nsenter when there is one."""
        argv = self.vmm_argv()
        if self.netns is None:
            return argv
        return [NSENTER, f"--net={netns_path(self.netns)}", "--", *argv]

    # --- running ------------------------------------------------------------------------------------
    def _vmm_pass_fds(self) -> list[int]:
        """Fds the VMM inherits (created before `vmm_argv`, which may name them); closed here after spawn."""
        return []

    async def _spawn(self, name: str, argv: list[str], pass_fds: list[int] | None = None) -> Child:
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
        """Log the child's output (the VMM's is the guest serial console) and notice its exit."""
        sink = self._console if child is self._vmm or child.name == self.vmm_name else ConsoleSink(self.log)
        try:
            await child.wait_draining(sink)
        except Exception:  # a system task must not raise
            self.log.exception("sandbox %s: supervising %s failed", self.sandbox_id, child.name)
        finally:
            child.exited.set()
            self._on_exit(child)

    def _on_exit(self, child: Child) -> None:
        quiet = self._stopping or (
            child is self._virtiofsd and self._vmm is not None and self._vmm.exited.is_set()
        )
        if child is self._vmm:
            quiet = self._stopping or child.returncode == 0
        level = logging.INFO if quiet else logging.ERROR
        self.log.log(level, "sandbox %s: %s", self.sandbox_id, child.describe_exit())
        if child is self._virtiofsd and not quiet:
            self._death = self._death or f"{child.describe_exit()} (the shared directory is gone)"
            if self._vmm is not None:
                self._vmm.kill()
            else:
                self._exited.set()
        if child is self._vmm:
            self._exited.set()

    def _persist(self) -> None:
        processes = [
            {"name": c.name, "pid": c.pid, "start_time": c.start_time}
            for c in (self._vmm, self._virtiofsd)
            if c is not None
        ]
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
        """Start virtiofsd for ``share``, record it for crash cleanup, wait for its socket."""
        with contextlib.suppress(FileNotFoundError):
            self.virtiofsd_socket.unlink()
        self._virtiofsd = await self._spawn("virtiofsd", self.virtiofsd_argv(share))
        self._persist()
        await self._wait_socket(self._virtiofsd, self.virtiofsd_socket)

    async def start_vm(self, timeout: float) -> None:  # noqa: ASYNC109 (runtime-rs signature)
        """Start virtiofsd (for a shared directory) and the VMM, then create and boot the VM over the API.

        A VMM that exits or an API answer that is not the expected one raises `HypervisorError` with the
        VMM's output."""
        self._state()
        if self._vmm is not None:
            raise HypervisorError("start_vm() called twice")
        try:
            with trio.fail_after(max(timeout, 1.0)):
                share = next((d for d in self.devices if isinstance(d, ShareFsDevice)), None)
                if share is not None:
                    await self._start_virtiofsd(share)
                for stale in (self.api_socket, self.hvsock_path):
                    with contextlib.suppress(FileNotFoundError):
                        stale.unlink()
                pass_fds = self._vmm_pass_fds()
                try:
                    self._vmm = await self._spawn(self.vmm_name, self.spawn_argv(), pass_fds)
                finally:
                    for fd in pass_fds:  # the VMM has its own copies
                        with contextlib.suppress(OSError):
                            os.close(fd)
                self._persist()
                await self._wait_socket(self._vmm, self.api_socket, listening=True)
                await self._boot()
                self._booted = True
        except (HypervisorError, OSError, trio.TooSlowError) as err:
            message = f"{self.name}: start failed: {err or 'timed out'}"
            if self._vmm is not None and self._vmm.exited.is_set():
                message += f" ({self._vmm.describe_exit()})"
            await trio.lowlevel.checkpoint()
            tail = self._console.tail()
            raise HypervisorError(message + (f"; output:\n{tail}" if tail else "")) from err
        self.log.info(
            "sandbox %s: %s %d booted (%d vCPU, %d MiB)",
            self.sandbox_id,
            self.vmm_name,
            self._vmm.pid,
            self.config.default_vcpus,
            self.config.default_memory,
        )

    def _require_running(self) -> None:
        if self._vmm is None or not self._booted:
            raise HypervisorError("the VM is not running (start_vm() has not run)")
        if self._vmm.exited.is_set():
            raise HypervisorError(f"the VM is gone ({self.exit_reason()})")

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
        return "; ".join(p for p in (self._death, self._vmm.describe_exit()) if p)

    def console_tail(self) -> str:
        return self._console.tail()

    async def stop_vm(self) -> None:
        """The VMM's shutdown request, then SIGKILL after `STOP_GRACE` seconds; virtiofsd after.
        Idempotent."""
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
                self.log.warning("sandbox %s: %s still there: SIGKILL", self.sandbox_id, self.vmm_name)
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

    def agent_address(self) -> str:
        """``hvsock:<state dir>/kata.hvsock:1024``: the host connects there and writes ``CONNECT 1024``."""
        return f"hvsock:{self.hvsock_path}:{AGENT_VSOCK_PORT}"

    def set_passfd_listener_port(self, port: int) -> None:
        """No passfd (`capabilities().passfd` is False): stdio goes over ttrpc."""

    def passfd_listener(self) -> tuple[Path, int] | None:
        return None

    def pids(self) -> list[int]:
        """The VMM's pid, then virtiofsd's (those still running); the shim's before `start_vm`."""
        if self._vmm is None:
            return [os.getpid()]
        return [c.pid for c in (self._vmm, self._virtiofsd) if c is not None and not c.exited.is_set()]

    def _threads(self) -> list[tuple[int, str]]:
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
        return [tid for tid, _ in self._threads()]

    def vcpu_thread_ids(self) -> list[int]:
        """The VMM's threads whose name starts with `vcpu_thread_prefix`."""
        return [tid for tid, comm in self._threads() if comm.startswith(self.vcpu_thread_prefix)]

    async def cleanup(self) -> None:
        """Stop the VMM and virtiofsd (both reaped), remove the sockets and the processes' record;
        idempotent."""
        if self._cleaned:
            return
        self._cleaned = True
        try:
            with trio.CancelScope(shield=True):
                await self.stop_vm()
        finally:
            if self.state_dir is not None:
                for name in (API_NAME, HVSOCK_NAME, VIRTIOFSD_NAME):
                    with contextlib.suppress(OSError):
                        (self.state_dir / name).unlink()
                for extra in self.state_dir.glob(HVSOCK_NAME + "_*"):
                    with contextlib.suppress(OSError):
                        extra.unlink()
                if self._vmm is not None or self._virtiofsd is not None:
                    with contextlib.suppress(Exception):
                        StateStore(self._state_root).forget(self.sandbox_id, PROCESSES_KEY)


def json_object(value: Any, what: str) -> dict[str, Any]:
    """``value`` when it is a JSON object; else `HypervisorError`."""
    if not isinstance(value, dict):
        raise HypervisorError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


async def _accepts(sock: Path) -> bool:
    """Whether a unix socket accepts a connection now (refused or gone: not yet)."""
    try:
        stream = await trio.open_unix_socket(str(sock))
    except OSError:
        return False
    await stream.aclose()
    return True
