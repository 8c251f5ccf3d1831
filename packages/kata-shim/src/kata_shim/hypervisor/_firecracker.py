"""The Firecracker back-end: ``firecracker --api-sock <state dir>/api.sock`` as a child process, configured
over its REST API before ``InstanceStart`` (runtime-rs `firecracker`, trimmed). Written against the Swagger
specification of Firecracker v1.12.1 (tests/fixtures/firecracker.yaml) and validated against it in tests; it
has NOT been run against a real firecracker binary here (none is installed on these machines or packaged in
Debian).

Start: firecracker in the pod's netns, then ``PUT /machine-config``, ``/boot-source``, ``/drives/image``
(read-only) and one per block device, ``/network-interfaces/eth<n>`` by tap name, ``/vsock`` (a hybrid
vsock: the host connects to ``uds_path`` and writes ``CONNECT <port>\\n``; guest-initiated connections go to
``<uds_path>_<port>``), ``/entropy``, then ``PUT /actions InstanceStart`` and ``GET /`` to see it running.
Pause/resume: ``PATCH /vm``. Stop: ``PUT /actions SendCtrlAltDel``, SIGKILL after a grace.

Firecracker has no virtio-fs: `capabilities().shared_fs` is empty, `prepare_vm` refuses a configured
shared_fs and `add_device` refuses a `ShareFsDevice`, so a sandbox (whose containers' rootfs goes through
the shared directory) fails at create with an error naming the missing capability. A block-device rootfs is
not built. No hot-plug (Firecracker has none).
"""

from __future__ import annotations

from typing import Any

from kata_shim.hypervisor._base import BlockDevice, Capabilities, HypervisorError, NetworkDevice
from kata_shim.hypervisor._restvmm import GUEST_CID, RestVmm, json_object

CAPABILITIES = Capabilities(
    block_device=True,
    hotplug=frozenset(),
    multi_queue=False,
    shared_fs=frozenset(),  # no virtio-fs in Firecracker
    guest_memory_probe=False,
    agent_transport="hvsock",
    passfd=False,
    device_addressing="mmio",
)
"""Cold-plugged virtio-mmio block and net devices, hybrid vsock; no shared fs, no hot-plug."""
MAX_VCPUS = 32
"""MachineConfiguration.vcpu_count's maximum in the spec."""
INSTANCE_STATES = ("Not started", "Running", "Paused")


class Firecracker(RestVmm):
    """`Hypervisor` back-end running firecracker as a child process (runtime-rs `firecracker`)."""

    name = "firecracker"
    vmm_name = "firecracker"
    vcpu_thread_prefix = "fc_vcpu"
    CAPABILITIES = CAPABILITIES

    def _check_config(self) -> None:
        super()._check_config()
        vcpus = self.config.default_vcpus
        if vcpus > MAX_VCPUS:
            raise HypervisorError(f"firecracker: at most {MAX_VCPUS} vCPUs, not {vcpus}")

    def vmm_argv(self) -> list[str]:
        """``<path> --api-sock <state dir>/api.sock`` (the VM itself comes over the API)."""
        argv = [self.config.path, "--api-sock", str(self.api_socket)]
        if self.config.enable_debug:
            argv += ["--level", "Debug"]
        return argv

    def requests(self) -> list[tuple[str, str, dict[str, Any]]]:
        """The (method, path, body) requests that configure the VM, in order, before InstanceStart."""
        cfg = self.config
        boot: dict[str, Any] = {"kernel_image_path": str(cfg.kernel), "boot_args": self.cmdline()}
        if cfg.initrd is not None:
            boot["initrd_path"] = str(cfg.initrd)
        out: list[tuple[str, str, dict[str, Any]]] = [
            ("PUT", "/machine-config", {"vcpu_count": cfg.default_vcpus, "mem_size_mib": cfg.default_memory}),
            ("PUT", "/boot-source", boot),
        ]
        if cfg.image is not None:
            # not the root device: Firecracker would add its own root= to the command line
            image = {"drive_id": "image", "path_on_host": str(cfg.image), "is_root_device": False}
            out.append(("PUT", "/drives/image", {**image, "is_read_only": True}))
        blocks = [d for d in self.devices if isinstance(d, BlockDevice)]
        for n, block in enumerate(blocks):
            drive = {"drive_id": f"disk{n}", "path_on_host": str(block.path), "is_root_device": False}
            out.append(("PUT", f"/drives/disk{n}", {**drive, "is_read_only": block.read_only}))
        nets = [d for d in self.devices if isinstance(d, NetworkDevice)]
        for n, net in enumerate(nets):
            iface: dict[str, Any] = {"iface_id": f"eth{n}", "host_dev_name": net.tap}
            if net.mac:
                iface["guest_mac"] = net.mac
            out.append(("PUT", f"/network-interfaces/eth{n}", iface))
        out.append(("PUT", "/vsock", {"guest_cid": GUEST_CID, "uds_path": str(self.hvsock_path)}))
        if cfg.entropy_source:
            out.append(("PUT", "/entropy", {}))  # Firecracker draws from the host's own CSPRNG
        return out

    async def _boot(self) -> None:
        for method, path, body in self.requests():
            await self.api(method, path, body)
        await self.api("PUT", "/actions", {"action_type": "InstanceStart"})
        state = await self.instance_state()
        if state != "Running":
            raise HypervisorError(f"firecracker: the instance is {state!r} after InstanceStart, not Running")

    async def instance_state(self) -> str:
        """``GET /``'s InstanceInfo state, checked: "Not started", "Running" or "Paused"."""
        answer = json_object((await self.api("GET", "/", ok=(200,))).json(), "firecracker GET /")
        state = answer.get("state")
        if state not in INSTANCE_STATES:
            raise HypervisorError(f"firecracker GET /: unknown state {str(state)[:40]!r}")
        return str(state)

    async def _shutdown(self) -> None:
        await self.api("PUT", "/actions", {"action_type": "SendCtrlAltDel"})

    async def pause_vm(self) -> None:
        """``PATCH /vm {"state": "Paused"}``."""
        self._require_running()
        await self.api("PATCH", "/vm", {"state": "Paused"})

    async def resume_vm(self) -> None:
        """``PATCH /vm {"state": "Resumed"}``."""
        self._require_running()
        await self.api("PATCH", "/vm", {"state": "Resumed"})
