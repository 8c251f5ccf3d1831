"""What the REST-driven external back-ends (Cloud Hypervisor, Firecracker) add to `ExternalVmm`: the VMM
started in the pod's network namespace (it opens the tap by name there, as runtime-rs has it), its API socket
and hybrid vsock socket in the sandbox's state directory, the REST calls.

A subclass gives the VMM's argv, the requests that create and boot the VM (`_boot`), the one that powers it
off (`_shutdown`), and its capabilities.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from kata_proto.agent import AGENT_VSOCK_PORT
from kata_shim.hypervisor._base import BlockDevice, Device, DeviceInfo, HypervisorConfig, HypervisorError
from kata_shim.hypervisor._common import netns_path
from kata_shim.hypervisor._external import VIRTIOFSD_NAME, ExternalVmm
from kata_shim.hypervisor._rest import REST_TIMEOUT, RestResponse, expect, request

API_NAME = "api.sock"
HVSOCK_NAME = "kata.hvsock"
GUEST_CID = 3
"""The guest's vsock CID: a hybrid vsock is private to its VM, so every guest can have the first free one."""
NSENTER = "nsenter"
"""util-linux's nsenter: runs the VMM in the pod's netns (it execs, so the pid is the VMM's)."""


class RestVmm(ExternalVmm):
    """Base of the `Hypervisor` back-ends whose VMM is a child process driven over a REST API socket."""

    SOCKET_NAMES = (API_NAME, HVSOCK_NAME, VIRTIOFSD_NAME)
    SOCKET_PATH_ROOM = len("_65535")
    """Firecracker's guest-initiated vsock sockets are <uds>_<port>."""

    def __init__(self, config: HypervisorConfig, *, state_root: Path | None = None) -> None:
        super().__init__(config, state_root=state_root)
        self._booted = False

    @property
    def api_socket(self) -> Path:
        """The VMM's API socket (valid after `prepare_vm`)."""
        return self._state() / API_NAME

    @property
    def hvsock_path(self) -> Path:
        """The hybrid vsock's host socket (valid after `prepare_vm`)."""
        return self._state() / HVSOCK_NAME

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
        """Create and boot the VM over the API."""
        raise NotImplementedError

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

    async def _start_vmm(self) -> None:
        """The VMM in the pod's netns, its API socket, then `_boot`."""
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

    def agent_address(self) -> str:
        """``hvsock:<state dir>/kata.hvsock:1024``: the host connects there and writes ``CONNECT 1024``."""
        return f"hvsock:{self.hvsock_path}:{AGENT_VSOCK_PORT}"

    def _remove_sockets(self) -> None:
        super()._remove_sockets()
        if self.state_dir is not None:
            for extra in self.state_dir.glob(HVSOCK_NAME + "_*"):
                with contextlib.suppress(OSError):
                    extra.unlink()


def json_object(value: Any, what: str) -> dict[str, Any]:
    """``value`` when it is a JSON object; else `HypervisorError`."""
    if not isinstance(value, dict):
        raise HypervisorError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value
