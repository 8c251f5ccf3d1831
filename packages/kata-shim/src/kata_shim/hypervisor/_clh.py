"""The Cloud Hypervisor back-end: ``cloud-hypervisor --api-socket <state dir>/api.sock`` as a child process,
driven over its REST API (runtime-rs `ch`, trimmed). Written against the OpenAPI specification of Cloud
Hypervisor v45.0 (tests/fixtures/cloud-hypervisor.yaml) and validated against it in tests; it has NOT been run
against a real cloud-hypervisor binary here (none is installed on these machines or packaged in Debian).

Start: virtiofsd (for the shared directory), then cloud-hypervisor in the pod's netns, then ``vm.create``
with the whole `vm_config` (cpus, memory shared for virtio-fs, payload, the image read-only as the first disk,
the cold-plugged disks, nets by tap name, fs, a hybrid vsock, rng, the serial console on stdout),
``vm.boot``, and ``vm.info`` to see it running. After boot, `add_device` hot-plugs with ``vm.add-disk``,
``vm.add-net`` and ``vm.add-fs`` (virtiofsd started first; guest memory is shared whenever shared_fs is
virtio-fs, so a later share works); the answer's PCI BDF becomes `DeviceInfo.pci_path`. `resize_vcpus` is
``vm.resize``. Stop: ``vm.shutdown``, ``vmm.shutdown``, SIGKILL after a grace.

cloud-hypervisor reboots a guest that resets (``reboot=k``, ``panic=1``) instead of exiting, so its event
monitor (``--event-monitor fd=``, a pipe) is watched: "rebooting" or a pvpanic "panic" ends the VM (SIGKILL),
with the reason in `exit_reason`. The agent is reached through
the hybrid vsock (``hvsock:<state dir>/kata.hvsock:1024``); no passfd.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import trio

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
from kata_shim.hypervisor._restvmm import GUEST_CID, RestVmm, json_object

CAPABILITIES = Capabilities(
    block_device=True,
    hotplug=frozenset({"block", "net", "vcpu"}),  # vm.add-disk, vm.add-net, vm.resize desired_vcpus
    multi_queue=True,
    shared_fs=frozenset({"virtio-fs"}),
    guest_memory_probe=False,
    agent_transport="hvsock",
    passfd=False,
    device_addressing="pci",
)
"""Cold- and hot-plugged PCI devices, virtio-fs through virtiofsd, hybrid vsock; memory resize not built."""
VM_STATES = ("Created", "Running", "Shutdown", "Paused")
"""VmInfo.state's values in the spec."""
EVENT_MAX = 64 * 1024
"""Bytes of one event-monitor object (they are a few hundred)."""
_BDF = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


def pci_path_of(bdf: str) -> str:
    """A root-bus device's PCI path ("05") from Cloud Hypervisor's BDF ("0000:00:05.0")."""
    match = _BDF.match(bdf)
    if match is None:
        raise HypervisorError(f"cloud-hypervisor: malformed PCI BDF {bdf[:40]!r}")
    if int(match.group(2), 16) != 0:
        return ""  # behind a bridge: the bridge's slot is not in the answer
    return match.group(3).lower()


class CloudHypervisor(RestVmm):
    """`Hypervisor` back-end running cloud-hypervisor as a child process (runtime-rs `ch`)."""

    name = "clh"
    vmm_name = "cloud-hypervisor"
    vcpu_thread_prefix = "vcpu"
    CAPABILITIES = CAPABILITIES

    def __init__(self, config: HypervisorConfig, *, state_root: Path | None = None) -> None:
        super().__init__(config, state_root=state_root)
        self._events_w: int | None = None
        self.events: list[tuple[str, str]] = []
        """The first (source, event) pairs of the event monitor (at most 64), for tests and diagnosis."""

    def _vmm_pass_fds(self) -> list[int]:
        """A pipe for ``--event-monitor fd=``: its read end is watched, its write end goes to the VMM."""
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        self._events_w = write_fd
        trio.lowlevel.spawn_system_task(self._watch_events, read_fd, name=f"clh-events-{self.sandbox_id}")
        return [write_fd]

    def vmm_argv(self) -> list[str]:
        """``<path> --api-socket <state dir>/api.sock [--event-monitor fd=<n>]`` (the VM itself comes over
        the API)."""
        argv = [self.config.path, "--api-socket", str(self.api_socket)]
        if self._events_w is not None:
            argv += ["--event-monitor", f"fd={self._events_w}"]
        if self.config.enable_debug:
            argv.append("-v")
        return argv

    async def _watch_events(self, read_fd: int) -> None:
        """Read the event monitor (pretty-printed JSON objects, each followed by a blank line) until the VMM
        closes it. A guest reset ("vm" "rebooting": cloud-hypervisor would boot the guest again, e.g. after a
        panic with panic=1) or a pvpanic ("guest" "panic") ends the VM: the shim's sandbox does not survive a
        guest reboot. An object over `EVENT_MAX` bytes or malformed JSON stops the watching (logged;
        cloud-hypervisor writes events non-blocking and ignores a full pipe, so it does not stall)."""
        decoder = json.JSONDecoder()
        buf = ""
        try:
            async with trio.lowlevel.FdStream(read_fd) as stream:
                while data := await stream.receive_some(65536):
                    buf += data.decode(errors="replace")
                    while buf.strip():
                        text = buf.lstrip()
                        try:
                            event, end = decoder.raw_decode(text)
                        except ValueError:
                            if len(text) > EVENT_MAX:
                                raise
                            break  # incomplete: wait for more
                        buf = text[end:]
                        self._on_event(event)
        except (
            ValueError,
            RecursionError,
            OSError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as err:
            self.log.warning("sandbox %s: cloud-hypervisor event monitor: %s", self.sandbox_id, err)

    def _on_event(self, event: object) -> None:
        if not isinstance(event, dict):
            return
        source, name = str(event.get("source", ""))[:40], str(event.get("event", ""))[:40]
        if len(self.events) < 64:
            self.events.append((source, name))
        death = ""
        if (source, name) == ("vm", "rebooting"):
            death = "guest reset (cloud-hypervisor would reboot it; the sandbox ends instead)"
        elif (source, name) == ("guest", "panic"):
            death = "guest panicked"
        if death and not self._stopping and self._vmm is not None:
            self.log.error("sandbox %s: %s", self.sandbox_id, death)
            self._death = self._death or death
            self._vmm.kill()

    def _disk(self, n: int, device: BlockDevice) -> dict[str, Any]:
        disk: dict[str, Any] = {"path": str(device.path), "readonly": device.read_only, "id": f"disk{n}"}
        if device.device_id:
            disk["serial"] = device.device_id[:20]
        return disk

    def _net(self, n: int, device: NetworkDevice) -> dict[str, Any]:
        net: dict[str, Any] = {"tap": device.tap, "id": f"net{n}"}
        if device.mac:
            net["mac"] = device.mac
        return net

    def _fs(self, device: ShareFsDevice) -> dict[str, Any]:
        return {
            "tag": device.mount_tag,
            "socket": str(self.virtiofsd_socket),
            "num_queues": 1,
            "queue_size": self.config.virtio_fs_queue_size,
            "id": "fs0",
        }

    def vm_config(self) -> dict[str, Any]:
        """``vm.create``'s VmConfig."""
        cfg = self.config
        payload: dict[str, Any] = {"kernel": str(cfg.kernel), "cmdline": self.cmdline()}
        if cfg.initrd is not None:
            payload["initramfs"] = str(cfg.initrd)
        # vhost-user (virtiofsd) maps guest memory: it must be shared, also for a share hot-plugged later
        has_fs = cfg.shared_fs == "virtio-fs" or any(isinstance(d, ShareFsDevice) for d in self.devices)
        config: dict[str, Any] = {
            "cpus": {
                "boot_vcpus": cfg.default_vcpus,
                "max_vcpus": max(cfg.default_maxvcpus, cfg.default_vcpus),
            },
            "memory": {"size": cfg.default_memory << 20, "shared": has_fs},
            "payload": payload,
            "serial": {"mode": "Tty"},  # the guest's ttyS0 on cloud-hypervisor's stdout, which we log
            "console": {"mode": "Off"},
            "vsock": {"cid": GUEST_CID, "socket": str(self.hvsock_path), "id": "vsock0"},
            "pvpanic": True,  # a guest panic is an event ("guest" "panic") even before panic=1 resets it
        }
        disks = []
        if cfg.image is not None:
            disks.append({"path": str(cfg.image), "readonly": True, "id": "image"})
        blocks = [d for d in self.devices if isinstance(d, BlockDevice)]
        disks += [self._disk(n, d) for n, d in enumerate(blocks)]
        if disks:
            config["disks"] = disks
        nets = [d for d in self.devices if isinstance(d, NetworkDevice)]
        if nets:
            config["net"] = [self._net(n, d) for n, d in enumerate(nets)]
        shares = [d for d in self.devices if isinstance(d, ShareFsDevice)]
        if shares:
            config["fs"] = [self._fs(shares[0])]
        if cfg.entropy_source:
            config["rng"] = {"src": cfg.entropy_source}
        return config

    async def _boot(self) -> None:
        await self.api("PUT", "/vm.create", self.vm_config())
        await self.api("PUT", "/vm.boot")
        state = await self.vm_state()
        if state != "Running":
            raise HypervisorError(f"cloud-hypervisor: the VM is {state} after vm.boot, not Running")

    async def info(self) -> dict[str, Any]:
        """``vm.info``, checked: an object with a ``state`` the spec names and a ``config`` object."""
        answer = json_object(
            (await self.api("GET", "/vm.info", ok=(200,))).json(), "cloud-hypervisor vm.info"
        )
        if answer.get("state") not in VM_STATES:
            raise HypervisorError(
                f"cloud-hypervisor vm.info: unknown state {str(answer.get('state'))[:40]!r}"
            )
        json_object(answer.get("config"), "cloud-hypervisor vm.info config")
        return answer

    async def vm_state(self) -> str:
        """``vm.info``'s state: Created, Running, Shutdown or Paused."""
        return str((await self.info())["state"])

    async def _shutdown(self) -> None:
        # vm.shutdown answers 404/405 when the VM was never created or booted: vmm.shutdown still follows
        await self.api("PUT", "/vm.shutdown", ok=(204, 404, 405))
        await self.api("PUT", "/vmm.shutdown")

    async def pause_vm(self) -> None:
        """``vm.pause``."""
        self._require_running()
        await self.api("PUT", "/vm.pause")

    async def resume_vm(self) -> None:
        """``vm.resume``."""
        self._require_running()
        await self.api("PUT", "/vm.resume")

    async def resize_vcpus(self, vcpus: int) -> None:
        """``vm.resize`` to ``vcpus`` (1 .. max(default_maxvcpus, default_vcpus))."""
        self._require_running()
        limit = max(self.config.default_maxvcpus, self.config.default_vcpus)
        if not 1 <= vcpus <= limit:
            raise HypervisorError(f"cloud-hypervisor: cannot resize to {vcpus} vCPUs (1..{limit})")
        await self.api("PUT", "/vm.resize", {"desired_vcpus": vcpus})

    async def resize_vcpu(self, old_vcpus: int, new_vcpus: int) -> tuple[int, int]:
        """`resize_vcpus` to ``new_vcpus`` capped at max(default_maxvcpus, default_vcpus), as runtime-rs."""
        limit = max(self.config.default_maxvcpus, self.config.default_vcpus)
        new_vcpus = min(new_vcpus, limit)
        if new_vcpus != old_vcpus:
            await self.resize_vcpus(new_vcpus)
        return old_vcpus, new_vcpus

    async def add_device(self, device: Device) -> DeviceInfo:
        """Before `start_vm`: cold-plug (in ``vm.create``'s config; no PCI path known yet). After: hot-plug
        with ``vm.add-disk``/``vm.add-net``/``vm.add-fs``; the answer's BDF gives the PCI path."""
        if self._vmm is None:
            return await super().add_device(device)
        self._check_cold_device(device)
        self._require_running()
        if isinstance(device, BlockDevice):
            n = sum(isinstance(d, BlockDevice) for d in self.devices)
            path, body = "/vm.add-disk", self._disk(n, device)
        elif isinstance(device, NetworkDevice):
            n = sum(isinstance(d, NetworkDevice) for d in self.devices)
            path, body = "/vm.add-net", self._net(n, device)
        else:
            assert isinstance(device, ShareFsDevice)
            # a virtiofsd for it first (left to stop_vm if vm.add-fs then fails)
            await self._start_virtiofsd(device)
            path, body = "/vm.add-fs", self._fs(device)
        answer = await self.api("PUT", path, body, ok=(200,))
        info = json_object(answer.json(), f"cloud-hypervisor {path}")
        bdf, dev_id = info.get("bdf"), info.get("id")
        if not isinstance(bdf, str) or not isinstance(dev_id, str):
            raise HypervisorError(f"cloud-hypervisor {path}: answer without string id and bdf")
        pci_path = pci_path_of(bdf)  # checked before the device counts as added
        self.devices.append(device)
        guest_path = self._block_guest_path() if isinstance(device, BlockDevice) else ""
        return DeviceInfo(guest_path=guest_path, pci_path=pci_path)
