"""VirtSandbox + VirtContainerManager against the real kata_agent, in-process on a unix socket, with runc.

`AgentVm` is a test-only Hypervisor: "booting" serves the agent; the virtio-fs device is the shared
directory made a shared-propagation mount, which the agent's virtio-fs storage binds (rec) at the guest
mount point, so rootfs mounts the shim makes later show up there as they would through virtio-fs.
Root: runc, overlay and bind mounts.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf.message import Message

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "kata-agent" / "tests"))
from agent_harness import BUSYBOX, RUNC, busybox_tree, fd_chunks  # type: ignore[import-not-found]

import kata_agent._guest as agent_guest
import kata_agent._mount as agent_mount
from kata_agent import AgentConfig as GuestAgentConfig
from kata_agent import open_agent
from kata_proto.containerd import cgroups_v1_metrics_pb2, events_pb2
from kata_resources import (
    bind,
    mount,
    mounts_below,
    read_mount_record,
    to_thread_in_netns,
    umount,
)
from kata_shim.config import AgentConfig, FactoryConfig, RuntimeConfig, TomlConfig
from kata_shim.hypervisor import (
    BlockDevice,
    Capabilities,
    Device,
    DeviceInfo,
    Hypervisor,
    HypervisorConfig,
    HypervisorError,
    MemoryConfig,
    NetworkDevice,
    ShareFsDevice,
)
from kata_shim.runtime import (
    AlreadyExists,
    ContainerConfig,
    ExecConfig,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ProcessId,
    ProcessStatus,
    RootfsMount,
    RuntimeInstance,
    Stdio,
)
from kata_shim.virt_container import MOUNTS_FILE, SandboxError, VirtContainer, VirtSandbox, _passfd
from kata_shim.virt_container._devices import PluggedDevices, block_rootfs_source, plug_block_rootfs
from kata_sys_util import MS_BIND, MS_REC, MS_SHARED, GuestClock
from kata_vmm import open_tap

pytestmark = pytest.mark.root
LATE_AGENT_S = 1.5
"""When the `late_agent` guest's agent answers, after start_vm."""


@pytest.fixture(scope="module")
def busybox_lower() -> Iterator[Path]:
    """A busybox tree for an overlay lower layer: kata-agent's test rootfs plus /data and /etc/hosts."""
    with busybox_tree("kvc-bb-", extra_dirs=("data",), files={"etc/hosts": ""}) as root:
        yield root


class AgentVm:
    """Test-only Hypervisor: the guest agent runs in this process, containers run with runc on the host."""

    name = "agent-vm"

    def __init__(
        self,
        config: HypervisorConfig,
        nursery: trio.Nursery,
        base: Path,
        *,
        fail: str = "",
        netns: str | None = None,
    ) -> None:
        self.config = config
        self.netns = netns
        """The "guest" network namespace (a /run/netns name) where the agent's netlink acts."""
        self.devices: list[Device] = []
        self.pod_netns: str | None = None
        self.nic_fds: list[int] = []
        self.nursery = nursery
        self.base = base
        self.fail = fail
        self.shared: Path | None = None
        self.shared_mounted = False
        self.calls: list[str] = []
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._running = False
        self.passfd_port = 0
        self.service: Any = None
        self._next_port = 5000
        self.crashed = ""
        self.hung = False
        """A hung guest: its agent answers nothing, not even when stop_vm takes it down."""
        self.restored_from: Path | None = None
        self.vmm_pids: list[int] = []
        """Stand-ins for the VMM's process, then its vCPU threads (a test's helper processes)."""
        self.resizes: list[tuple[int, int]] = []
        self.memory_resizes: list[int] = []
        """MiB asked of each `resize_memory`."""
        self.memory_cap = 0
        """MiB the "VM" can grow to (0: anything asked)."""
        self.spare_vcpu_pids: list[int] = []
        """Stand-ins for the threads of vCPUs a resize adds (they join `vmm_pids`)."""
        self.file_disks: dict[BlockDevice, str] = {}
        """The loop device standing for each hot-plugged regular file's virtio-blk disk in the "guest"."""

    def crash(self, reason: str = "guest kernel panic") -> None:
        """The guest dies: wait_vm returns (as on a VMM's exit) and the agent never answers again (it is only
        taken down, killing what it ran, when the test's nursery ends)."""
        self.crashed = reason
        self._stopped.set()

    @property
    def sock(self) -> str:
        return str(self.base / "agent.sock")

    def capabilities(self) -> Capabilities:
        # "no_passfd": a back-end that cannot pass fds (the shim must copy stdio over ttrpc instead)
        # "vcpu_hotplug"/"vcpu_refused": it hot-plugs vCPUs (the second one's guest refuses)
        # "net_hotplug": it hot-plugs NICs
        hotplug: frozenset[Any] = frozenset()
        if self.fail in ("vcpu_hotplug", "vcpu_refused"):
            hotplug = frozenset({"vcpu"})
        elif self.fail in ("memory_hotplug", "memory_refused"):
            hotplug = frozenset({"vcpu", "memory"})
        elif self.fail == "net_hotplug":
            hotplug = frozenset({"net"})
        elif self.fail in ("block_hotplug", "block_refused"):
            hotplug = frozenset({"block"})
        return Capabilities(
            shared_fs=frozenset({"virtio-fs"}),
            passfd=self.fail != "no_passfd",
            hotplug=hotplug,
            snapshot=True,
        )

    async def save_vm(self, directory: Path) -> None:
        """A VM template: the "snapshot" is a directory naming the VM saved."""
        self.calls.append("save_vm")
        os.mkdir(directory)
        with open(directory / "saved-from", "w") as f:  # noqa: ASYNC230 (a few bytes on /tmp)
            f.write(str(self.base))

    def restore_from(self, directory: Path | None) -> None:
        self.calls.append(f"restore_from:{directory}")
        self.restored_from = directory

    async def remove_device(self, device: Device) -> None:
        self.calls.append(f"remove_device:{type(device).__name__}")
        self.devices.remove(device)
        loop = self.file_disks.pop(device, None) if isinstance(device, BlockDevice) else None
        if loop is not None:
            await trio.run_process(["losetup", "-d", loop])

    async def resize_vcpu(self, old_vcpus: int, new_vcpus: int) -> tuple[int, int]:
        self.calls.append(f"resize_vcpu:{old_vcpus}->{new_vcpus}")
        if self.fail == "vcpu_refused":
            raise HypervisorError("dragonball: resizing vCPUs: the guest refused it (ENODEV)")
        self.resizes.append((old_vcpus, new_vcpus))
        if new_vcpus > old_vcpus and self.spare_vcpu_pids:  # the new vCPU's thread
            self.vmm_pids.append(self.spare_vcpu_pids.pop(0))
        return old_vcpus, new_vcpus

    async def resize_memory(self, new_mib: int) -> tuple[int, MemoryConfig]:
        self.calls.append(f"resize_memory:{new_mib}")
        if self.fail == "memory_refused":
            raise HypervisorError("dragonball: resizing memory: the region is gone")
        self.memory_resizes.append(new_mib)
        now = min(new_mib, self.memory_cap) if self.memory_cap else new_mib
        return now, MemoryConfig(size_mib=max(0, now - self.config.default_memory))

    async def prepare_vm(self, sandbox_id: str, netns: str | None) -> None:
        self.calls.append("prepare_vm")
        self.pod_netns = netns
        (self.base / "run").mkdir(parents=True, exist_ok=True)

    async def add_device(self, device: Device) -> DeviceInfo:
        self.calls.append(f"add_device:{type(device).__name__}")
        if self.shared_mounted and isinstance(device, BlockDevice):  # after start_vm: hot-plug
            if self.fail == "block_refused":
                raise HypervisorError("dragonball: hot-adding BlockDevice: the guest refused it (ENODEV)")
            self.devices.append(device)
            if not device.follow_symlinks:  # a regular file: the "guest's" disk is a loop device over it
                assert not device.path.is_symlink() and device.path.is_file()
                done = await trio.run_process(
                    ["losetup", "-f", "--show", str(device.path)], capture_stdout=True
                )
                loop = done.stdout.decode().strip()
                self.file_disks[device] = loop
                return DeviceInfo(guest_path=loop)
            return DeviceInfo(guest_path=str(device.path))  # the "guest" sees the host's node
        self.devices.append(device)
        if self.shared_mounted:
            assert isinstance(device, NetworkDevice) and self.fail == "net_hotplug"
            await self._plug_nic(len(self.nic_fds) // 2, device)
        if isinstance(device, ShareFsDevice):
            assert device.mount_tag == "kataShared"
            self.shared = device.host_path
        return DeviceInfo()

    async def start_vm(self, timeout: float) -> None:  # noqa: ASYNC109 (the protocol's signature)
        self.calls.append("start_vm")
        if self.fail == "start_vm":
            raise HypervisorError("guest kernel panicked")
        assert self.shared is not None
        for index, device in enumerate(d for d in self.devices if isinstance(d, NetworkDevice)):
            await self._plug_nic(index, device)
        bind(self.shared, self.shared, recursive=False)
        mount("", self.shared, "", MS_SHARED)
        self.shared_mounted = True
        if self.fail == "vm_dies":
            self.nursery.start_soon(self._die_soon)
        elif self.fail == "late_agent":
            self.nursery.start_soon(self._serve_late)
        elif self.fail != "no_agent":
            await self.nursery.start(self._serve)

    async def _serve_late(self) -> None:
        await trio.sleep(LATE_AGENT_S)
        await self._serve()

    async def _die_soon(self) -> None:
        await trio.sleep(0.3)
        self._stopped.set()

    async def _serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        config = GuestAgentConfig(
            runtime=RUNC,
            runtime_root=str(self.base / "runc"),
            run_dir=str(self.base / "run"),
            netns=self.netns,
        )
        try:
            async with open_agent(f"unix:{self.sock}", config, log_listen=f"unix:{self.sock}.log") as service:
                self.service = service
                if self.passfd_port:
                    listener = trio.SocketListener(await _unix_listener(self.base / "passfd.sock"))
                    self.nursery.start_soon(trio.serve_listeners, self._serve_passfd, [listener])
                self._running = True
                task_status.started()
                await self._stop.wait()
        finally:
            self._stopped.set()

    async def _plug_nic(self, index: int, device: NetworkDevice) -> None:
        """The guest's virtio-net: a tap in the guest netns with the device's MAC, its frames pumped to and
        from the pod's tap (opened in the pod netns, as the VMM does); both carry virtio-net headers."""
        assert self.netns is not None and self.pod_netns is not None
        pod_fd = await to_thread_in_netns(self.pod_netns, open_tap, device.tap)
        nic = f"gnic{index}"
        guest_fd = await to_thread_in_netns(f"/run/netns/{self.netns}", open_tap, nic)
        await trio.run_process(["ip", "-n", self.netns, "link", "set", nic, "address", device.mac])
        self.nic_fds += [pod_fd, guest_fd]
        self.nursery.start_soon(_pump, pod_fd, guest_fd)
        self.nursery.start_soon(_pump, guest_fd, pod_fd)

    async def stop_vm(self) -> None:
        self.calls.append("stop_vm")
        for fd in self.nic_fds:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)
        self.nic_fds.clear()
        if self.crashed or self.hung:
            self._running = False  # a dead guest's agent answers nothing, not even with its shutdown
        else:
            self._stop.set()
        if self._running:
            await self._stopped.wait()
            self._running = False
        if self.shared_mounted and self.shared is not None:
            umount(self.shared)
            self.shared_mounted = False

    async def wait_vm(self) -> int:
        await self._stopped.wait()
        return 1 if self.fail == "vm_dies" or self.crashed else 0

    def console_tail(self) -> str:
        return "fake guest: booting"

    def exit_reason(self) -> str:
        if not self._stopped.is_set():
            return ""
        return "triple fault" if self.fail == "vm_dies" else self.crashed

    async def pause_vm(self) -> None:
        pass

    async def resume_vm(self) -> None:
        pass

    def agent_address(self) -> str:
        return f"unix:{self.sock}"

    def set_passfd_listener_port(self, port: int) -> None:
        self.calls.append(f"passfd:{port}")
        if self.fail in ("passfd", "passfd_silent"):
            self.passfd_port = port

    def passfd_listener(self) -> tuple[Path, int] | None:
        # Only the passfd pods bridge fds; the others show the fallback to copying over ttrpc.
        return (self.base / "passfd.sock", self.passfd_port) if self.passfd_port else None

    async def _serve_passfd(self, control: trio.SocketStream) -> None:
        """A tiny stand-in for the VMM's passfd: `passfd\\n`, `<port>` + fd; bridge fd <-> agent stream."""
        sock = control.socket
        line = b""
        while not line.endswith(b"\n"):
            line += await sock.recv(1)
        assert line == b"passfd\n"
        msg, fds, _, _ = await trio.to_thread.run_sync(socket.recv_fds, _blocking(sock), 32, 1)
        assert int(msg.split()[0]) == self.passfd_port and len(fds) == 1
        if self.fail == "passfd_silent":  # a guest that never answers the REQUEST: no OK, ever
            os.close(fds[0])
            await trio.sleep_forever()
        host_port, self._next_port = self._next_port, self._next_port + 1
        ours, theirs = socket.socketpair()
        self.service.passfd.add(host_port, trio.SocketStream(trio.socket.from_stdlib_socket(theirs)))
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        fd = fds[0]
        os.set_blocking(fd, False)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            self.nursery.start_soon(_fd_to_stream, fd, stream)
        else:
            self.nursery.start_soon(_stream_to_fd, stream, fd)
        await control.send_all(f"OK {host_port}\n".encode())
        await control.aclose()

    def pids(self) -> list[int]:
        # the "VMM" processes go into the sandbox's host cgroup: pytest itself must not
        return list(self.vmm_pids[:1])

    def thread_ids(self) -> list[int]:
        return list(self.vmm_pids)

    def vcpu_thread_ids(self) -> list[int]:
        return list(self.vmm_pids[1:])

    async def cleanup(self) -> None:
        self.calls.append("cleanup")


async def _pump(src: int, dst: int) -> None:
    """Copy frames from one tap fd to another until either is closed."""
    try:
        while True:
            await trio.lowlevel.wait_readable(src)
            try:
                frame = os.read(src, 65536)
            except (BlockingIOError, InterruptedError):
                continue
            with contextlib.suppress(BlockingIOError, InterruptedError):
                try:
                    os.write(dst, frame)
                except OSError as err:
                    if err.errno != errno.EIO:  # EIO: that side is not up yet, the frame is lost
                        raise
    except (trio.ClosedResourceError, OSError):
        return


async def _unix_listener(path: Path) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(16)
    return sock


def _is_a_hypervisor(vm: AgentVm) -> Hypervisor:
    return vm  # mypy: AgentVm implements the whole Hypervisor protocol


def _blocking(sock: trio.socket.SocketType) -> socket.socket:
    raw = socket.socket(fileno=os.dup(sock.fileno()))
    raw.setblocking(True)
    return raw


async def _fd_to_stream(fd: int, stream: trio.SocketStream) -> None:
    # stdin: wait for a writer's bytes (a fifo that never had a writer does not poll readable), EOF = shutdown
    try:
        async for data in fd_chunks(fd):
            await stream.send_all(data)
        await stream.send_eof()
    finally:
        os.close(fd)


async def _stream_to_fd(stream: trio.SocketStream, fd: int) -> None:
    out = trio.lowlevel.FdStream(fd)
    try:
        while data := await stream.receive_some(65536):
            await out.send_all(data)
    finally:
        await out.aclose()
        await stream.aclose()


@pytest.fixture
def virtiofs_as_bind(monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The agent's virtio-fs storage (tag kataShared) becomes a recursive bind of the shared dir."""
    real_mount = agent_mount.mount
    shares: dict[str, Path] = {}

    def fake_mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
        if fstype == "virtiofs":
            assert source == "kataShared"
            real_mount(str(shares["kataShared"]), target, "", MS_BIND | MS_REC)
        else:
            real_mount(source, target, fstype, flags, data)

    monkeypatch.setattr(agent_mount, "mount", fake_mount)
    return shares


@dataclass
class Pod:
    """A started pod plus what the test observes."""

    instance: RuntimeInstance
    vm: AgentVm
    base: Path
    events: list[tuple[str, Message]] = field(default_factory=list)
    seen: dict[str, trio.Event] = field(default_factory=dict)
    """topic -> set once an event of that topic was published."""

    @property
    def sandbox(self) -> VirtSandbox:
        assert isinstance(self.instance.sandbox, VirtSandbox)
        return self.instance.sandbox


def _spec(
    *args: str,
    terminal: bool = False,
    mounts: list[dict[str, Any]] | None = None,
    netns: str | None = None,
    cgroups_path: str = "/default/host-cgroup",
) -> dict[str, Any]:
    """A config.json as containerd's default spec writes it (host namespaces, hooks, cgroups path);
    ``netns`` is the pod's network namespace path (`ctr run --with-ns network:...`), else a new one."""
    return {
        "ociVersion": "1.1.0",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": ["PATH=/bin", "HOME=/root"],
            "cwd": "/",
            "capabilities": {k: ["CAP_KILL", "CAP_CHOWN"] for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs"},
        "hostname": "pod",
        "mounts": [
            {
                "destination": "/proc",
                "type": "proc",
                "source": "proc",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "size=65536k"],
            },
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "ro"]},
            *(mounts or []),
        ],
        "hooks": {"prestart": [{"path": "/usr/bin/false"}]},
        "linux": {
            "cgroupsPath": cgroups_path,
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "network", **({"path": netns} if netns else {})},
            ],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
        },
    }


def _container(pod: Pod, lower: Path, cid: str, spec: dict[str, Any], stdio: Stdio) -> ContainerConfig:
    """A container whose rootfs is an overlay (as containerd's overlayfs snapshotter hands it over)."""
    layer = pod.base / "snapshots" / cid
    upper, work = layer / "fs", layer / "work"
    upper.mkdir(parents=True)
    work.mkdir()
    bundle = pod.base / "bundles" / cid
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text(json.dumps(spec))
    rootfs = RootfsMount(
        "overlay", "overlay", options=(f"lowerdir={lower}", f"upperdir={upper}", f"workdir={work}")
    )
    return ContainerConfig(cid, bundle, spec, [rootfs], stdio)


def _fifos(pod: Pod, name: str, *which: str) -> dict[str, str]:
    paths = {}
    d = pod.base / "fifos"
    d.mkdir(exist_ok=True)
    for w in which:
        path = d / f"{name}-{w}"
        os.mkfifo(path)
        paths[w] = str(path)
    return paths


async def read_fifo(path: str, into: dict[str, bytes], key: str) -> None:
    """Read a fifo until its writers are gone (as containerd's copy does)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    try:
        async for chunk in fd_chunks(fd):
            data += chunk
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
        into[key] = data


async def _stdout_of(pod: Pod, lower: Path, cid: str, spec: dict[str, Any]) -> bytes:
    """Create and start container ``cid`` running ``spec`` in ``pod``, wait (60 s) for it to exit 0; its
    stdout. The caller deletes it."""
    fifos = _fifos(pod, cid, "stdout")
    cm = pod.instance.containers
    got: dict[str, bytes] = {}
    async with trio.open_nursery() as n:
        n.start_soon(read_fifo, fifos["stdout"], got, "out")
        await cm.create_container(_container(pod, lower, cid, spec, Stdio(stdout=fifos["stdout"])))
        await cm.start_process(ProcessId(cid))
        with trio.fail_after(60):
            assert (await cm.wait_process(ProcessId(cid))).code == 0
    return got["out"]


def _recorded(record: Path) -> list[str]:
    """The mount points a ledger file records, oldest first."""
    saved = read_mount_record(record)
    return [str(saved.root / e.path) for e in saved.entries] if saved is not None else []


def _leftovers(base: Path) -> list[str]:
    return mounts_below(base)


@asynccontextmanager
async def running_pod(
    virtiofs: dict[str, Path],
    *,
    fail: str = "",
    reconnect_timeout_ms: int = 10_000,
    request_timeout_ms: int = 30_000,
    first_spec: dict[str, Any] | None = None,
    runtime: RuntimeConfig | None = None,
    cgroup_root: Path | None = None,
    agent_netns: str | None = None,
    vmm_pids: list[int] | None = None,
    factory: FactoryConfig | None = None,
    vms: list[AgentVm] | None = None,
    first_dns: list[str] | None = None,
) -> AsyncIterator[Pod]:
    """A VirtContainer instance on AgentVm, started with a throwaway first container config (or
    ``first_spec``); no host cgroup unless ``cgroup_root``; the agent's netlink acts in ``agent_netns``."""
    base = Path(tempfile.mkdtemp(prefix="kvc-", dir="/tmp"))
    try:
        async with trio.open_nursery() as nursery:
            vm_box: list[AgentVm] = [] if vms is None else vms  # the sandbox's, then a VM template's

            def new_vm(config: TomlConfig) -> AgentVm:
                where = base / ("vm" if not vm_box else f"vm{len(vm_box)}")
                vm = AgentVm(config.hypervisor, nursery, where, fail=fail, netns=agent_netns)
                vm.vmm_pids = list(vmm_pids or [])
                vm_box.append(vm)
                return vm

            events: list[tuple[str, Message]] = []
            seen: dict[str, trio.Event] = collections.defaultdict(trio.Event)

            async def publish(topic: str, msg: Message) -> None:
                events.append((topic, msg))
                seen[topic].set()

            handler = VirtContainer(
                hypervisor_factory=new_vm,
                share_root=base / "sandboxes",
                guest_share_dir=str(base / "guest-shared"),
                state_root=base / "state",
                health_interval=0.2,
                cgroup_root=cgroup_root,
            )
            config = TomlConfig(
                Path("test.toml"),
                runtime or RuntimeConfig(use_passfd_io=fail in ("passfd", "passfd_silent", "no_passfd")),
                HypervisorConfig(),
                AgentConfig(reconnect_timeout_ms=reconnect_timeout_ms, request_timeout_ms=request_timeout_ms),
                factory=factory or FactoryConfig(),
            )
            instance = handler.new_instance("sb1", config, publish)
            assert isinstance(instance.sandbox, VirtSandbox)
            virtiofs["kataShared"] = instance.sandbox.layout.shared_dir
            first = ContainerConfig("sb1", base, first_spec or _spec("true"), [], Stdio(), dns=first_dns)
            try:
                await instance.sandbox.start(first)
                pod = Pod(instance, vm_box[0], base, events, seen)
                yield pod
            finally:
                with trio.CancelScope(shield=True):
                    await instance.sandbox.stop()
                    await instance.sandbox.cleanup()
            nursery.cancel_scope.cancel()
    finally:
        left = _leftovers(base)
        for point in left:
            umount(point)
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"left mounted: {left}"


def _exits(pod: Pod) -> list[events_pb2.TaskExit]:
    return [m for t, m in pod.events if t == "/tasks/exit" and isinstance(m, events_pb2.TaskExit)]


def test_container_output_through_fifos_exit_code_and_delete_leaves_nothing(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kata_shim.virt_container")

    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            assert pod.vm.calls[:3] == ["prepare_vm", "add_device:ShareFsDevice", "start_vm"]
            # the start's steps in one debug line, in the order they ran (no network, no cgroup here)
            (line,) = [r.getMessage() for r in caplog.records if "sandbox sb1: started, " in r.getMessage()]
            steps = re.findall(r"([a-z-]+) \d+\.\d\d", line.split(": ", 2)[2])
            expected = ["shared-dir", "prepare-vm", "start-vm", "agent-ready", "guest-network"]
            assert steps == [*expected, "create-sandbox", "guest-details"], line
            cm = pod.instance.containers
            fifos = _fifos(pod, "c1", "stdout", "stderr")
            spec = _spec("sh", "-c", "echo out; hostname; ls /proc/1/ns >/dev/null; echo err >&2; exit 3")
            cfg = _container(
                pod, busybox_lower, "c1", spec, Stdio(stdout=fifos["stdout"], stderr=fifos["stderr"])
            )
            got: dict[str, bytes] = {}
            async with trio.open_nursery() as n:
                n.start_soon(read_fifo, fifos["stdout"], got, "out")
                n.start_soon(read_fifo, fifos["stderr"], got, "err")
                pid = await cm.create_container(cfg)
                assert pid == os.getpid()
                (line,) = [
                    r.getMessage() for r in caplog.records if "container c1: created, " in r.getMessage()
                ]
                steps = re.findall(r"([a-z-]+) \d+\.\d\d", line.split(": ", 2)[2])
                assert steps == [
                    "rootfs",
                    "volumes",
                    "resize-devices",
                    "stdio",
                    "agent-create",
                    "pod-resources",
                ]
                state = await cm.state_process(ProcessId("c1"))
                assert state.status is ProcessStatus.CREATED
                rootfs = pod.sandbox.layout.rootfs_host_path("c1")
                assert str(rootfs) in mounts_below(pod.base)
                record = pod.base / "state" / "sb1" / MOUNTS_FILE
                assert str(rootfs) in _recorded(record)
                await cm.start_process(ProcessId("c1"))
                with trio.fail_after(20):
                    status = await cm.wait_process(ProcessId("c1"))
            assert status.code == 3
            assert got == {"out": b"out\npod\n", "err": b"err\n"}
            exits = _exits(pod)
            assert len(exits) == 1
            assert (exits[0].container_id, exits[0].id, exits[0].exit_status, exits[0].pid) == (
                "c1",
                "c1",
                3,
                pid,
            )
            assert exits[0].exited_at.seconds > 0
            assert (await cm.state_process(ProcessId("c1"))).status is ProcessStatus.STOPPED
            assert (await cm.delete_process(ProcessId("c1"))).code == 3
            assert cm.container_ids() == []
            assert str(rootfs) not in mounts_below(pod.base)
            assert not pod.sandbox.layout.container_dir("c1").exists()
            layout = pod.sandbox.layout
            assert _recorded(record) == [str(layout.mounts_dir), str(layout.shared_dir)]
            with pytest.raises(NotFound):
                await cm.state_process(ProcessId("c1"))
        assert not (pod.base / "state" / "sb1" / MOUNTS_FILE).exists()
        assert not pod.sandbox.layout.sandbox_dir.exists()
        assert pod.vm.calls[-2:] == ["stop_vm", "cleanup"]

    trio.run(main)


def test_exec_with_stdin_kill_and_events(busybox_lower: Path, virtiofs_as_bind: dict[str, Path]) -> None:
    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            cfg = _container(pod, busybox_lower, "c2", _spec("sleep", "1000"), Stdio())
            await cm.create_container(cfg)
            await cm.start_process(ProcessId("c2"))
            fifos = _fifos(pod, "e1", "stdin", "stdout")
            exec_id = ProcessId("c2", "e1")
            proc = {
                "args": ["sh", "-c", "cat; echo done"],
                "env": ["PATH=/bin"],
                "cwd": "/",
                "user": {"uid": 0},
            }
            await cm.exec_process(
                ExecConfig(exec_id, proc, Stdio(stdin=fifos["stdin"], stdout=fifos["stdout"]))
            )
            with pytest.raises(AlreadyExists):
                await cm.exec_process(ExecConfig(exec_id, proc, Stdio()))
            got: dict[str, bytes] = {}
            async with trio.open_nursery() as n:
                n.start_soon(read_fifo, fifos["stdout"], got, "out")
                await cm.start_process(exec_id)
                w = os.open(fifos["stdin"], os.O_WRONLY | os.O_NONBLOCK)
                os.write(w, b"hello from stdin\n")
                os.close(w)  # EOF: the shim closes the process's stdin
                with trio.fail_after(20):
                    assert (await cm.wait_process(exec_id)).code == 0
            assert got["out"] == b"hello from stdin\ndone\n"
            assert (await cm.delete_process(exec_id)).code == 0
            with pytest.raises(FailedPrecondition):
                await cm.delete_process(ProcessId("c2"))  # still running
            await cm.kill_process(ProcessId("c2"), signal.SIGKILL)
            with trio.fail_after(20):
                assert (await cm.wait_process(ProcessId("c2"))).code == 128 + signal.SIGKILL
            with pytest.raises(NotFound):
                await cm.kill_process(ProcessId("c2"), signal.SIGTERM)
            assert [(e.id, e.exit_status) for e in _exits(pod)] == [("e1", 0), ("c2", 137)]
            await cm.delete_process(ProcessId("c2"))

    trio.run(main)


def test_close_io_delivers_written_bytes_then_eof(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            fifos = _fifos(pod, "c3", "stdin", "stdout")
            cfg = _container(
                pod,
                busybox_lower,
                "c3",
                _spec("wc", "-c"),
                Stdio(stdin=fifos["stdin"], stdout=fifos["stdout"]),
            )
            got: dict[str, bytes] = {}
            async with trio.open_nursery() as n:
                n.start_soon(read_fifo, fifos["stdout"], got, "out")
                await cm.create_container(cfg)
                await cm.start_process(ProcessId("c3"))
                w = os.open(fifos["stdin"], os.O_WRONLY | os.O_NONBLOCK)
                try:
                    os.write(w, b"x" * 5000)
                    await trio.sleep(0.2)
                    os.write(w, b"y" * 123)
                    with trio.fail_after(20):
                        await cm.close_process_io(ProcessId("c3"))  # writer still open: CloseIO ends stdin
                        assert (await cm.wait_process(ProcessId("c3"))).code == 0
                finally:
                    os.close(w)
            assert got["out"].strip() == b"5123"
            await cm.delete_process(ProcessId("c3"))

    trio.run(main)


def test_pause_resume_stats_update_and_terminal(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            fifos = _fifos(pod, "c4", "stdout")
            spec = _spec("sh", "-c", "tty; while true; do echo tick; sleep 0.05; done", terminal=True)
            cfg = _container(pod, busybox_lower, "c4", spec, Stdio(stdout=fifos["stdout"], terminal=True))
            got: dict[str, bytes] = {}
            async with trio.open_nursery() as n:
                n.start_soon(read_fifo, fifos["stdout"], got, "out")
                await cm.create_container(cfg)
                await cm.start_process(ProcessId("c4"))
                await cm.resize_process_pty(ProcessId("c4"), 100, 40)
                await trio.sleep(0.3)
                await cm.pause_container("c4")
                assert (await cm.state_process(ProcessId("c4"))).status is ProcessStatus.PAUSED
                metrics = await cm.stats_container("c4")
                assert isinstance(metrics, cgroups_v1_metrics_pb2.Metrics)
                assert metrics.pids.current >= 1
                assert metrics.memory.usage.usage > 0
                assert metrics.cpu.usage.total > 0
                await cm.resume_container("c4")
                assert (await cm.state_process(ProcessId("c4"))).status is ProcessStatus.RUNNING
                await cm.update_container("c4", {"pids": {"limit": 64}, "memory": {"limit": 256 << 20}})
                assert (await cm.stats_container("c4")).pids.limit == 64  # type: ignore[attr-defined]
                assert await cm.pids("c4") == [os.getpid()]
                await cm.kill_process(ProcessId("c4"), signal.SIGKILL)
                with trio.fail_after(20):
                    assert (await cm.wait_process(ProcessId("c4"))).code == 137
            assert got["out"].startswith(b"/dev/pts/")
            assert b"tick\r\n" in got["out"]  # a pty: only stdout, with the tty's line discipline
            await cm.delete_process(ProcessId("c4"))

    trio.run(main)


def test_host_bind_volume_is_shared_read_only(busybox_lower: Path, virtiofs_as_bind: dict[str, Path]) -> None:
    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            host_file = pod.base / "hosts.txt"
            host_file.write_text("10.0.0.1 db\n")
            host_dir = pod.base / "vol"
            host_dir.mkdir()
            mounts = [
                {
                    "destination": "/etc/hosts",
                    "type": "bind",
                    "source": str(host_file),
                    "options": ["rbind", "ro"],
                },
                {"destination": "/data", "type": "bind", "source": str(host_dir), "options": ["rbind", "rw"]},
            ]
            script = "cat /etc/hosts; echo w > /data/out; echo x 2>/dev/null > /etc/hosts || echo ro"
            out = await _stdout_of(pod, busybox_lower, "c5", _spec("sh", "-c", script, mounts=mounts))
            assert out == b"10.0.0.1 db\nro\n"
            assert (host_dir / "out").read_text() == "w\n"
            assert host_file.read_text() == "10.0.0.1 db\n"
            await cm.delete_process(ProcessId("c5"))
            assert mounts_below(pod.sandbox.layout.shared_dir) == [str(pod.sandbox.layout.shared_dir)]

    trio.run(main)


def test_os_thread_count_does_not_grow_with_containers(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    def threads() -> set[str]:
        return set(os.listdir("/proc/self/task"))

    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            seen = []
            for i in range(6):
                fifos = _fifos(pod, f"t{i}", "stdin", "stdout", "stderr")
                stdio = Stdio(fifos["stdin"], fifos["stdout"], fifos["stderr"])
                cfg = _container(pod, busybox_lower, f"t{i}", _spec("cat"), stdio)
                await cm.create_container(cfg)
                await cm.start_process(ProcessId(f"t{i}"))
                seen.append(threads())
            # No thread started after the first container is still alive (threads of earlier tests, e.g.
            # trio's idle cached workers, may exit meanwhile: that is not growth).
            assert not seen[-1] - seen[0], [len(tids) for tids in seen]
            for i in range(6):
                await cm.kill_process(ProcessId(f"t{i}"), signal.SIGKILL)
            with trio.fail_after(30):
                for i in range(6):
                    await cm.wait_process(ProcessId(f"t{i}"))
                    await cm.delete_process(ProcessId(f"t{i}"))

    trio.run(main)


def test_stop_reports_running_processes_exited_and_unmounts(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            cfg = _container(pod, busybox_lower, "c6", _spec("sleep", "1000"), Stdio())
            await cm.create_container(cfg)
            await cm.start_process(ProcessId("c6"))
            with trio.fail_after(30):
                await pod.sandbox.stop()
                await pod.sandbox.stop()  # idempotent
                status = await cm.wait_process(ProcessId("c6"))
            assert status.code in (137, 255)
            assert [e.id for e in _exits(pod)] == ["c6"]
            await pod.sandbox.cleanup()
            assert mounts_below(pod.base) == []
            with pytest.raises(FailedPrecondition):
                await cm.create_container(_container(pod, busybox_lower, "c7", _spec("true"), Stdio()))

    trio.run(main)


def test_containers_deleted_after_the_sandbox_api_stop_and_cleanup_leave_nothing(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    """Issue 18: containerd 2.x stops a Sandbox API pod (StopSandbox: the VM stops and its host resources
    go) before RemovePodSandbox deletes its containers: those deletes still succeed and leave nothing."""

    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            for cid in ("c1", "c2"):
                await cm.create_container(
                    _container(pod, busybox_lower, cid, _spec("sleep", "1000"), Stdio())
                )
            await cm.start_process(ProcessId("c1"))  # c2 stays created, never started
            with trio.fail_after(60):
                await pod.sandbox.stop()
                await pod.sandbox.cleanup()
            assert mounts_below(pod.base) == []
            for cid in ("c1", "c2"):
                assert (await cm.wait_process(ProcessId(cid))).code in (137, 255)
                await cm.delete_process(ProcessId(cid))
            assert cm.container_ids() == []
            assert mounts_below(pod.base) == []

    trio.run(main)


@pytest.mark.parametrize("how", ["vm_crash", "agent_gone", "health"])
def test_a_sandbox_whose_vm_dies_ends_every_process_with_255_and_cleans_up(
    how: str, busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    """Finding 4 of the VM-boundary issue: a VM that dies after boot is noticed (VMM exit, agent connection
    lost past the reconnect budget, health checks failing past their budget): each running process gets
    its TaskExit with 255, Task.Wait returns, delete and cleanup work and leave nothing."""

    async def main() -> None:
        async with running_pod(virtiofs_as_bind, reconnect_timeout_ms=300) as pod:
            cm = pod.instance.containers
            await cm.create_container(_container(pod, busybox_lower, "c1", _spec("sleep", "1000"), Stdio()))
            await cm.start_process(ProcessId("c1"))
            await cm.exec_process(
                ExecConfig(ProcessId("c1", "e1"), _spec("sleep", "999")["process"], Stdio())
            )
            await cm.start_process(ProcessId("c1", "e1"))
            await cm.create_container(_container(pod, busybox_lower, "c2", _spec("true"), Stdio()))
            if how == "vm_crash":
                pod.vm.crash("guest kernel panic")
            elif how == "agent_gone":
                # The guest resets the agent's connection and never accepts another one.
                os.rename(pod.vm.sock, pod.vm.sock + ".gone")
                raw = pod.sandbox.agent._client
                assert raw is not None
                raw._break("test: the guest reset the agent connection")
            else:

                async def not_serving() -> bool:
                    return False

                pod.vm.hung = True
                pod.sandbox.agent.check = not_serving  # type: ignore[method-assign]
            with trio.fail_after(60):
                for pid in (ProcessId("c1"), ProcessId("c1", "e1"), ProcessId("c2")):
                    assert (await cm.wait_process(pid)).code == 255
            reason = pod.sandbox.dead
            expected = {
                "vm_crash": "guest kernel panic",
                "agent_gone": "reconnect failed",
                "health": "3 agent",
            }
            assert reason is not None and expected[how] in reason, reason
            exits = sorted((e.container_id, e.id, e.exit_status) for e in _exits(pod))
            assert exits == [("c1", "c1", 255), ("c1", "e1", 255), ("c2", "c2", 255)]
            assert "stop_vm" in pod.vm.calls
            with trio.fail_after(30):
                await cm.delete_process(ProcessId("c1", "e1"))
                await cm.delete_process(ProcessId("c1"))
                await cm.delete_process(ProcessId("c2"))
                await pod.sandbox.stop()
                await pod.sandbox.cleanup()
            assert cm.container_ids() == []

    trio.run(main)


def test_the_agent_reconnecting_within_its_budget_keeps_the_processes_running(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    """A dropped agent connection that comes back within reconnect_timeout_ms is not a death: WaitProcess is
    asked again on the new connection and reports the real exit code."""

    async def main() -> None:
        async with running_pod(virtiofs_as_bind, reconnect_timeout_ms=20_000) as pod:
            cm = pod.instance.containers
            await cm.create_container(
                _container(pod, busybox_lower, "c1", _spec("sh", "-c", "sleep 2; exit 7"), Stdio())
            )
            await cm.start_process(ProcessId("c1"))
            agent = pod.sandbox.agent
            generation = agent.generation
            raw = agent._client
            assert raw is not None
            raw._break("test: the hybrid vsock connection was reset")  # the guest side hung up
            with trio.fail_after(30):
                assert await agent.wait_reconnected(generation)
                assert (await cm.wait_process(ProcessId("c1"))).code == 7
            assert pod.sandbox.dead is None
            assert [(e.id, e.exit_status) for e in _exits(pod)] == [("c1", 7)]

    trio.run(main)


class _StarvedClock(GuestClock):
    """A VM that gets a tenth of a host CPU: nine of every ten wall seconds its vCPU waits."""

    def waited(self) -> float:
        return 0.9 * (time.monotonic() - self.started)


@pytest.mark.parametrize("starved", [True, False], ids=["vcpu-starved", "vcpu-runs"])
def test_agent_budget_is_guest_time_not_wall_time(
    starved: bool, busybox_lower: Path, virtiofs_as_bind: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten sandboxes booting at once on one host CPU each take ten times the wall time to reach their agent:
    the agent budget counts only the time the VM could run (wall less its vCPU's run-queue wait), so a starved
    boot is not failed; a VM that had the CPU and still has no agent is."""
    monkeypatch.setattr("kata_shim.config._types.MIN_RECONNECT_TIMEOUT_MS", 100)
    if starved:
        monkeypatch.setattr("kata_shim.virt_container._sandbox.GuestClock", _StarvedClock)

    async def main() -> None:
        budget = int(LATE_AGENT_S * 1000 / 2)  # ms: the agent answers after twice the budget, wall time
        if starved:
            async with running_pod(virtiofs_as_bind, fail="late_agent", reconnect_timeout_ms=budget) as pod:
                assert pod.vm.service is not None and pod.sandbox.dead is None
            return
        with pytest.raises(BaseExceptionGroup) as info:
            async with running_pod(virtiofs_as_bind, fail="late_agent", reconnect_timeout_ms=budget):
                raise AssertionError("must not start")
        (err,) = info.value.exceptions
        assert isinstance(err, SandboxError) and "not ready within 0.75 s of guest time" in str(err), err

    trio.run(main)


def test_an_agent_that_does_not_set_up_the_sandbox_in_its_request_budget_fails_the_start_by_name(
    virtiofs_as_bind: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent answers, but CreateSandbox takes longer than request_timeout_ms (ten restored VMs on one
    host CPU): the start fails saying what did not finish within which budget, not with trio's bare
    TooSlowError (whose message is empty)."""

    async def never(self: Any, req: Any, ctx: Any) -> None:
        await trio.sleep_forever()

    monkeypatch.setattr("kata_agent._service.AgentService.CreateSandbox", never)

    async def main() -> None:
        with pytest.raises(BaseExceptionGroup) as info:
            async with running_pod(virtiofs_as_bind, request_timeout_ms=300):
                raise AssertionError("must not start")
        (err,) = info.value.exceptions
        assert isinstance(err, SandboxError)
        assert re.fullmatch(
            r"sandbox sb1: the agent did not set up the sandbox \(network, CreateSandbox\) within 0.3 s of"
            r" guest time \(\d+ s wall\) \(request_timeout_ms\), \d+ s into the start",
            str(err),
        ), str(err)

    trio.run(main)


@pytest.mark.parametrize("fail", ["start_vm", "no_agent", "vm_dies"])
def test_failed_start_leaves_nothing_behind(
    fail: str, busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    async def main() -> None:
        with pytest.raises(BaseExceptionGroup) as info:  # the test's own nursery wraps it
            # a dying VM must not wait for the agent budget (upstream's floor: 10 s)
            budget = 30_000 if fail == "vm_dies" else 10_000
            async with running_pod(virtiofs_as_bind, fail=fail, reconnect_timeout_ms=budget):
                raise AssertionError("must not start")
        (err,) = info.value.exceptions
        assert isinstance(err, SandboxError)
        expected = {"start_vm": "panicked", "no_agent": "not ready", "vm_dies": "stopped before its agent"}
        assert expected[fail] in str(err)
        if fail == "vm_dies":
            assert "triple fault" in str(err)
        if fail != "start_vm":  # a late or dead guest says why: load, vCPU time and the console
            assert re.search(
                r"s since the VM started; host load [0-9. ]+ on \d+ CPUs; vCPU threads", str(err)
            )
            assert "guest console (last lines):\nfake guest: booting" in str(err), str(err)

    trio.run(main)


def test_create_with_bad_rootfs_undoes_its_mounts(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            mounts = [{"destination": "/x", "type": "bind", "source": str(pod.base / "missing")}]
            cfg = _container(pod, busybox_lower, "c8", _spec("true", mounts=mounts), Stdio())
            with pytest.raises(Exception, match="missing"):
                await cm.create_container(cfg)
            assert cm.container_ids() == []
            assert not pod.sandbox.layout.container_dir("c8").exists()
            assert mounts_below(pod.sandbox.layout.shared_dir) == [str(pod.sandbox.layout.shared_dir)]

    trio.run(main)


def test_fifo_open_error_is_reported(busybox_lower: Path, virtiofs_as_bind: dict[str, Path]) -> None:
    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            cfg = _container(pod, busybox_lower, "c9", _spec("true"), Stdio(stdout=str(pod.base / "no-fifo")))
            with pytest.raises(InvalidArgument, match="No such file"):
                await cm.create_container(cfg)
            assert mounts_below(pod.sandbox.layout.shared_dir) == [str(pod.sandbox.layout.shared_dir)]
            with contextlib.suppress(NotFound):
                await cm.state_process(ProcessId("c9"))

    trio.run(main)


def test_oom_event_published_and_agent_logs_forwarded(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kata_shim.agent")

    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            spec = _spec("sh", "-c", "tail /dev/zero; sleep 100")
            spec["linux"]["resources"] = {"memory": {"limit": 16 << 20}}
            await cm.create_container(_container(pod, busybox_lower, "hog", spec, Stdio()))
            await cm.start_process(ProcessId("hog"))
            with trio.fail_after(30):
                await pod.seen["/tasks/oom"].wait()
            (oom,) = [m for t, m in pod.events if t == "/tasks/oom"]
            assert isinstance(oom, events_pb2.TaskOOM) and oom.container_id == "hog"
            await cm.kill_process(ProcessId("hog"), signal.SIGKILL)
            with trio.fail_after(20):
                await cm.wait_process(ProcessId("hog"))
            await cm.delete_process(ProcessId("hog"))
            assert pod.sandbox.health is not None
            await trio.sleep(0.5)  # the test's health interval is 0.2 s
            assert pod.sandbox.health.checks >= 2
            assert pod.sandbox.health.healthy and pod.sandbox.health.failures == 0

    trio.run(main)
    forwarded = [r for r in caplog.records if r.name == "kata_shim.agent"]
    assert any("sandbox created" in r.getMessage() for r in forwarded), [r.getMessage() for r in forwarded]


def test_cancelled_start_while_dialling_cleans_up_at_once(virtiofs_as_bind: dict[str, Path]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mounts)")

    async def main() -> None:
        base = Path(tempfile.mkdtemp(prefix="kvc-", dir="/tmp"))
        try:
            async with trio.open_nursery() as nursery:
                handler = VirtContainer(
                    hypervisor_factory=lambda c: AgentVm(c.hypervisor, nursery, base / "vm", fail="no_agent"),
                    share_root=base / "sandboxes",
                    guest_share_dir=str(base / "guest"),
                    state_root=base / "state",
                )
                config = TomlConfig(
                    Path("t"), RuntimeConfig(), HypervisorConfig(), AgentConfig(reconnect_timeout_ms=60_000)
                )

                async def publish(topic: str, msg: Message) -> None:
                    pass

                instance = handler.new_instance("sb2", config, publish)
                assert isinstance(instance.sandbox, VirtSandbox)
                with trio.move_on_after(0.5) as scope:
                    await instance.sandbox.start(ContainerConfig("sb2", base, _spec("true"), [], Stdio()))
                assert scope.cancelled_caught
                with trio.fail_after(5):  # not the 60 s dial timeout
                    await instance.sandbox.cleanup()
                assert not instance.sandbox.layout.sandbox_dir.exists()
                assert mounts_below(base) == []
        finally:
            shutil.rmtree(base, ignore_errors=True)

    trio.run(main)


def test_kill_before_start_reports_the_exit(busybox_lower: Path, virtiofs_as_bind: dict[str, Path]) -> None:
    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            await cm.create_container(_container(pod, busybox_lower, "k1", _spec("sleep", "1000"), Stdio()))
            await cm.kill_process(ProcessId("k1"), signal.SIGKILL)
            with trio.fail_after(20):
                status = await cm.wait_process(ProcessId("k1"))
            assert status.code == 128 + signal.SIGKILL
            assert [(e.id, e.exit_status) for e in _exits(pod)] == [("k1", 137)]
            with pytest.raises(FailedPrecondition):
                await cm.start_process(ProcessId("k1"))
            await cm.delete_process(ProcessId("k1"))
            assert mounts_below(pod.sandbox.layout.shared_dir) == [str(pod.sandbox.layout.shared_dir)]

    trio.run(main)


def test_one_mebibyte_through_stdin_and_stdout_is_byte_identical(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    data = os.urandom(1 << 20)

    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            fifos = _fifos(pod, "cat", "stdin", "stdout")
            stdio = Stdio(stdin=fifos["stdin"], stdout=fifos["stdout"])
            got: dict[str, bytes] = {}
            async with trio.open_nursery() as n:
                n.start_soon(read_fifo, fifos["stdout"], got, "out")
                await cm.create_container(_container(pod, busybox_lower, "cat", _spec("cat"), stdio))
                await cm.start_process(ProcessId("cat"))
                writer = trio.lowlevel.FdStream(os.open(fifos["stdin"], os.O_WRONLY | os.O_NONBLOCK))
                async with writer:
                    for i in range(0, len(data), 100_000):
                        await writer.send_all(data[i : i + 100_000])
                with trio.fail_after(60):
                    assert (await cm.wait_process(ProcessId("cat"))).code == 0
            assert got["out"] == data
            await cm.delete_process(ProcessId("cat"))

    trio.run(main)


def test_concurrent_creates_and_one_failing_keep_the_others_mounted(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            layout = pod.sandbox.layout
            # "bad" is started first and fails in the agent (after an await), when the others have
            # mounted their rootfs meanwhile: its rollback must not touch theirs.
            bad = _spec("true")
            bad["linux"]["namespaces"].append({"type": "bogus"})
            failures: list[BaseException] = []
            configs = {"bad": _container(pod, busybox_lower, "bad", bad, Stdio())}
            for cid in ("p1", "p2", "p3"):
                configs[cid] = _container(pod, busybox_lower, cid, _spec("true"), Stdio())

            async def create(config: ContainerConfig) -> None:
                try:
                    await cm.create_container(config)
                except (InvalidArgument, AlreadyExists) as err:
                    failures.append(err)

            async with trio.open_nursery() as n:
                for config in configs.values():
                    n.start_soon(create, config)
                n.start_soon(create, configs["p1"])  # the same id twice: one is AlreadyExists
            assert sorted(cm.container_ids()) == ["p1", "p2", "p3"]
            assert sorted(type(e).__name__ for e in failures) == ["AlreadyExists", "InvalidArgument"]
            assert any("bogus" in str(e) for e in failures)
            for cid in ("p1", "p2", "p3"):
                assert str(layout.rootfs_host_path(cid)) in mounts_below(layout.mounts_dir)
                await cm.delete_process(ProcessId(cid))
            assert mounts_below(layout.shared_dir) == [str(layout.shared_dir)]

    trio.run(main)


def test_passfd_stdio_output_split_stdin_close_io_and_exec(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    """use_passfd_io: fifos go to the (stand-in) VMM, the agent gets the ports, no ttrpc stdio copy."""

    async def main() -> None:
        async with running_pod(virtiofs_as_bind, fail="passfd") as pod:
            assert "passfd:1027" in pod.vm.calls
            cm = pod.instance.containers
            fifos = _fifos(pod, "p1", "stdin", "stdout", "stderr")
            spec = _spec("sh", "-c", "read x; echo out-$x; echo err-$x >&2; exit 7")
            cfg = _container(
                pod,
                busybox_lower,
                "p1",
                spec,
                Stdio(stdin=fifos["stdin"], stdout=fifos["stdout"], stderr=fifos["stderr"]),
            )
            got: dict[str, bytes] = {}
            async with trio.open_nursery() as n:
                n.start_soon(read_fifo, fifos["stdout"], got, "out")
                n.start_soon(read_fifo, fifos["stderr"], got, "err")
                await cm.create_container(cfg)
                assert pod.vm.service.containers["p1"].init.passfd is not None  # stdio by passfd streams
                await cm.start_process(ProcessId("p1"))
                w = os.open(fifos["stdin"], os.O_WRONLY | os.O_NONBLOCK)
                os.write(w, b"hi\n")
                os.close(w)  # containerd's CloseIO: its write end goes; EOF reaches the process
                await cm.close_process_io(ProcessId("p1"))  # a no-op in passfd mode
                with trio.fail_after(20):
                    assert (await cm.wait_process(ProcessId("p1"))).code == 7
            assert got == {"out": b"out-hi\n", "err": b"err-hi\n"}
            assert len(pod.vm.service.passfd) == 0  # every stream was taken

            await cm.create_container(_container(pod, busybox_lower, "p2", _spec("sleep", "100"), Stdio()))
            await cm.start_process(ProcessId("p2"))
            efifos = _fifos(pod, "e1", "stdout")
            proc = {"args": ["sh", "-c", "seq 1 20000"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0}}
            async with trio.open_nursery() as n:
                n.start_soon(read_fifo, efifos["stdout"], got, "exec")
                await cm.exec_process(ExecConfig(ProcessId("p2", "e1"), proc, Stdio(stdout=efifos["stdout"])))
                await cm.start_process(ProcessId("p2", "e1"))
                with trio.fail_after(20):
                    assert (await cm.wait_process(ProcessId("p2", "e1"))).code == 0
            assert got["exec"] == "".join(f"{i}\n" for i in range(1, 20001)).encode()
            for pid in (ProcessId("p1"), ProcessId("p2", "e1")):
                await cm.delete_process(pid)
            await cm.kill_process(ProcessId("p2"), signal.SIGKILL)
            with trio.fail_after(20):
                await cm.wait_process(ProcessId("p2"))
            await cm.delete_process(ProcessId("p2"))

    trio.run(main)


def test_use_passfd_io_on_a_back_end_without_passfd_copies_stdio_over_ttrpc(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    """The shim asks the back-end's capabilities: no passfd means no passfd port and stdio over ttrpc."""

    async def main() -> None:
        async with running_pod(virtiofs_as_bind, fail="no_passfd") as pod:
            assert pod.sandbox.config.runtime.use_passfd_io
            assert not any(c.startswith("passfd:") for c in pod.vm.calls)
            assert pod.sandbox.passfd_listener() is None
            cm = pod.instance.containers
            fifos = _fifos(pod, "n1", "stdout")
            spec = _spec("sh", "-c", "echo over-ttrpc")
            got: dict[str, bytes] = {}
            async with trio.open_nursery() as n:
                n.start_soon(read_fifo, fifos["stdout"], got, "out")
                await cm.create_container(
                    _container(pod, busybox_lower, "n1", spec, Stdio(stdout=fifos["stdout"]))
                )
                assert pod.vm.service.containers["n1"].init.passfd is None
                await cm.start_process(ProcessId("n1"))
                with trio.fail_after(20):
                    assert (await cm.wait_process(ProcessId("n1"))).code == 0
            assert got == {"out": b"over-ttrpc\n"}
            await cm.delete_process(ProcessId("n1"))

    trio.run(main)


def test_create_and_exec_fail_within_the_passfd_budget_when_the_guest_never_answers(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11, finding 8: a passfd REQUEST the guest never answers fails Create/Exec with a clear error."""
    monkeypatch.setattr(_passfd, "PASSFD_TIMEOUT", 0.5)

    async def main() -> None:
        async with running_pod(virtiofs_as_bind, fail="passfd_silent") as pod:
            cm = pod.instance.containers
            fifos = _fifos(pod, "q1", "stdout")
            cfg = _container(pod, busybox_lower, "q1", _spec("true"), Stdio(stdout=fifos["stdout"]))
            with trio.fail_after(60):  # an outer guard only: the passfd budget is what ends it
                with pytest.raises(InvalidArgument, match=r"stdout: .*no answer within 0\.5 s of guest time"):
                    await cm.create_container(cfg)
            await cm.create_container(_container(pod, busybox_lower, "q2", _spec("sleep", "100"), Stdio()))
            await cm.start_process(ProcessId("q2"))
            efifos = _fifos(pod, "e1", "stdout")
            proc = {"args": ["true"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0}}
            with trio.fail_after(60):
                with pytest.raises(InvalidArgument, match=r"stdout: .*no answer within 0\.5 s of guest time"):
                    await cm.exec_process(
                        ExecConfig(ProcessId("q2", "e1"), proc, Stdio(stdout=efifos["stdout"]))
                    )
            await cm.kill_process(ProcessId("q2"), signal.SIGKILL)
            with trio.fail_after(20):
                await cm.wait_process(ProcessId("q2"))

    trio.run(main)


# --- the pod (issue 14): network, host cgroup, VM size, shared /dev/shm ---------------------------------
def _ip(*args: str, netns: str | None = None) -> str:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


async def _out(*cmd: str) -> str:
    return (await trio.run_process(list(cmd), capture_stdout=True)).stdout.decode()  # type: ignore[no-any-return]


async def _aip(*args: str, netns: str | None = None) -> str:
    return await _out("ip", *(["-n", netns] if netns else []), *args)


@pytest.fixture
def pod_network() -> Iterator[dict[str, str]]:
    """A pod netns as CNI leaves it (veth eth0 10.88.0.2/24, default route via 10.88.0.1, a static
    neighbour), the veth's peer in a "host" netns at 10.88.0.1, and an empty "guest" netns for the agent."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    tag = f"{os.getpid() % 100000}"
    names = {"pod": f"kvc-pod-{tag}", "host": f"kvc-host-{tag}", "guest": f"kvc-guest-{tag}"}
    for name in names.values():
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        pod, host = names["pod"], names["host"]
        _ip("link", "add", "eth0", "netns", pod, "type", "veth", "peer", "name", "hostend", "netns", host)
        _ip("addr", "add", "10.88.0.2/24", "dev", "eth0", netns=pod)
        _ip("link", "set", "eth0", "up", netns=pod)
        _ip("link", "set", "lo", "up", netns=pod)
        _ip("route", "add", "default", "via", "10.88.0.1", netns=pod)
        _ip(
            "neigh",
            "add",
            "10.88.0.9",
            "lladdr",
            "02:00:00:00:00:09",
            "dev",
            "eth0",
            "nud",
            "permanent",
            netns=pod,
        )
        _ip("addr", "add", "10.88.0.1/24", "dev", "hostend", netns=host)
        _ip("link", "set", "hostend", "up", netns=host)
        names["mac"] = _ip("-j", "link", "show", "eth0", netns=pod).split('"address":"')[1].split('"')[0]
        yield names
    finally:
        for key in ("pod", "host", "guest"):
            subprocess.run(["ip", "netns", "delete", names[key]], check=False)


def test_pod_network_reaches_the_guest_and_is_torn_down(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path], pod_network: dict[str, str]
) -> None:
    """A pod netns with a veth: a tap joined to it by tc redirect, the guest NIC (by the veth's MAC) named
    and addressed as the veth with its routes and neighbours, traffic both ways; after cleanup no tap, no
    qdisc, nothing recorded."""
    pod_ns, guest_ns = pod_network["pod"], pod_network["guest"]
    netns_path = f"/run/netns/{pod_ns}"

    async def main() -> None:
        first = _spec("true", netns=netns_path)
        async with running_pod(virtiofs_as_bind, first_spec=first, agent_netns=guest_ns) as pod:
            nics = [d for d in pod.vm.devices if isinstance(d, NetworkDevice)]
            assert [(d.tap, d.mac) for d in nics] == [("tap0_kata", pod_network["mac"])]
            assert "tap0_kata" in await _aip("-o", "link", "show", netns=pod_ns)
            assert "tap0_kata" not in await _aip(
                "-o", "link", "show"
            )  # made in the pod netns, not the shim's
            assert "ingress" in await _out("tc", "-n", pod_ns, "qdisc", "show", "dev", "eth0")
            guest = await _aip("-o", "addr", "show", "dev", "eth0", netns=guest_ns)
            assert "10.88.0.2/24" in guest
            assert pod_network["mac"] in await _aip("-o", "link", "show", "dev", "eth0", netns=guest_ns)
            assert "default via 10.88.0.1 dev eth0" in await _aip("route", "show", netns=guest_ns)
            assert "10.88.0.9 dev eth0 lladdr 02:00:00:00:00:09 PERMANENT" in _ip(
                "neigh", "show", netns=guest_ns
            )
            state = json.loads((pod.base / "state" / "sb1" / "state.json").read_text())
            assert state["extra"]["network"]["netns"] == netns_path
            ping = await trio.run_process(
                ["ip", "netns", "exec", guest_ns, BUSYBOX, "ping", "-c", "2", "-W", "10", "10.88.0.1"],
                capture_stdout=True,
                check=False,
            )
            assert ping.returncode == 0, ping.stdout
            await pod.sandbox.cleanup()  # what the fixture does at the end, here to look at the state file
            state = json.loads((pod.base / "state" / "sb1" / "state.json").read_text())
            assert "network" not in state["extra"]
            assert "tap0_kata" not in await _aip("-o", "link", "show", netns=pod_ns)
            assert "ingress" not in await _out("tc", "-n", pod_ns, "qdisc", "show", "dev", "eth0")

    trio.run(main)


def test_a_veth_that_appears_after_boot_is_hot_plugged_and_configured_in_the_guest(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path], pod_network: dict[str, str]
) -> None:
    """NIC hot-plug (issue 14): a second veth in the pod netns after boot; on the sandbox container's Start
    (the rescan) it gets a tap, the back-end hot-plugs a NIC on it, the agent names and addresses it as
    the veth and routes through it; the first NIC and its routes stay; traffic goes both ways."""
    pod_ns, host_ns, guest_ns = pod_network["pod"], pod_network["host"], pod_network["guest"]

    async def main() -> None:
        first = _spec("true", netns=f"/run/netns/{pod_ns}")
        async with running_pod(
            virtiofs_as_bind, fail="net_hotplug", first_spec=first, agent_netns=guest_ns
        ) as pod:
            _ip(
                "link",
                "add",
                "eth1",
                "netns",
                pod_ns,
                "type",
                "veth",
                "peer",
                "name",
                "hostend1",
                "netns",
                host_ns,
            )
            _ip("addr", "add", "10.77.0.2/24", "dev", "eth1", netns=pod_ns)
            _ip("link", "set", "eth1", "up", netns=pod_ns)
            _ip("route", "add", "10.66.0.0/16", "via", "10.77.0.1", netns=pod_ns)
            _ip("addr", "add", "10.77.0.1/24", "dev", "hostend1", netns=host_ns)
            _ip("link", "set", "hostend1", "up", netns=host_ns)
            mac = _ip("-j", "link", "show", "eth1", netns=pod_ns).split('"address":"')[1].split('"')[0]
            await pod.sandbox.rescan_network()
            nics = [(d.tap, d.mac) for d in pod.vm.devices if isinstance(d, NetworkDevice)]
            assert nics == [("tap0_kata", pod_network["mac"]), ("tap1_kata", mac)]
            assert pod.vm.calls.count("add_device:NetworkDevice") == 2
            assert "10.77.0.2/24" in await _aip("-o", "addr", "show", "dev", "eth1", netns=guest_ns)
            assert mac in await _aip("-o", "link", "show", "dev", "eth1", netns=guest_ns)
            routes = await _aip("route", "show", netns=guest_ns)
            assert (
                "default via 10.88.0.1 dev eth0" in routes and "10.66.0.0/16 via 10.77.0.1 dev eth1" in routes
            )
            ping = await trio.run_process(
                ["ip", "netns", "exec", guest_ns, BUSYBOX, "ping", "-c", "2", "-W", "10", "10.77.0.1"],
                capture_stdout=True,
                check=False,
            )
            assert ping.returncode == 0, ping.stdout
            await pod.sandbox.rescan_network()  # nothing new: nothing plugged again
            assert pod.vm.calls.count("add_device:NetworkDevice") == 2
            await pod.sandbox.cleanup()
            assert "_kata" not in await _aip("-o", "link", "show", netns=pod_ns)

    trio.run(main)


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[Path]:
    """A loop device over a 1 MiB raw image that starts with a marker."""
    if shutil.which("losetup") is None:
        pytest.skip("needs losetup")
    image = tmp_path / "raw.img"
    image.write_bytes(b"kata-raw-volume\n".ljust(1 << 20, b"\0"))
    dev = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True)
    node = Path(dev.stdout.strip())
    try:
        yield node
    finally:
        subprocess.run(["losetup", "-d", str(node)], check=False)


def test_a_block_device_of_the_container_is_hot_plugged_shown_inside_and_removed_with_it(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path], loop_disk: Path
) -> None:
    """`ctr run --device /dev/loopN` (OCI linux.devices type b): the host device found by major:minor is
    hot-plugged (BlockDevice), the agent shows the guest's node at the container path (CreateContainer
    devices, mmioblk), the container reads it; deleting the container unplugs it."""
    st = os.stat(loop_disk)
    entry = {"path": "/dev/xvdz", "type": "b", "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev)}

    async def main() -> None:
        async with running_pod(virtiofs_as_bind, fail="block_hotplug") as pod:
            cm = pod.instance.containers
            fifos = _fifos(pod, "c1", "stdout")
            spec = _spec("head", "-n", "1", "/dev/xvdz")
            spec["linux"]["devices"] = [entry]
            got: dict[str, bytes] = {}
            async with trio.open_nursery() as n:
                n.start_soon(read_fifo, fifos["stdout"], got, "out")
                await cm.create_container(
                    _container(pod, busybox_lower, "c1", spec, Stdio(stdout=fifos["stdout"]))
                )
                assert BlockDevice(loop_disk, device_id="c1:/dev/xvdz") in pod.vm.devices
                await cm.start_process(ProcessId("c1"))
                with trio.fail_after(20):
                    status = await cm.wait_process(ProcessId("c1"))
            assert status.code == 0 and got["out"] == b"kata-raw-volume\n"
            await cm.delete_process(ProcessId("c1"))
            assert "remove_device:BlockDevice" in pod.vm.calls
            assert not any(isinstance(d, BlockDevice) for d in pod.vm.devices)

    trio.run(main)


@pytest.mark.parametrize("source", ["block-device", "loop-file"])
def test_a_block_snapshotter_rootfs_is_hot_plugged_and_mounted_by_the_agent_not_the_host(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path], tmp_path: Path, source: str
) -> None:
    """A rootfs that is one mount of a host block device (devmapper's ext4 on /dev/dm-N; a loop device
    here) or of a regular file with the "loop" option (blockfile's snapshot): hot-plugged, CreateContainer's
    storage (mmioblk, ext4) has the agent mount it on the rootfs path (without "loop", which ext4 refuses);
    the host mounts nothing; the container's write lands in the disk; deleting the container unmounts it in
    the guest and unplugs it."""
    if shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.skip("needs e2fsprogs and losetup")
    image = tmp_path / "rootfs.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(busybox_lower), str(image), "64M"], check=True)
    loop = ""
    if source == "block-device":
        losetup = ["losetup", "-f", "--show", str(image)]
        loop = subprocess.run(losetup, check=True, capture_output=True, text=True).stdout.strip()
        rootfs = RootfsMount("ext4", loop, options=("rw",))
        plugged = BlockDevice(Path(loop), device_id="c1:rootfs")
    else:
        rootfs = RootfsMount("ext4", str(image), options=("loop", "rw"))
        plugged = BlockDevice(image, device_id="c1:rootfs", follow_symlinks=False)

    async def main() -> None:
        async with running_pod(virtiofs_as_bind, fail="block_hotplug") as pod:
            cm = pod.instance.containers
            fifos = _fifos(pod, "c1", "stdout")
            script = "echo kata-block-root > /hello && grep ' / ' /proc/mounts | cut -d' ' -f3 && cat /hello"
            spec = _spec("sh", "-c", script)
            bundle = pod.base / "bundles" / "c1"
            bundle.mkdir(parents=True)
            cfg = ContainerConfig("c1", bundle, spec, [rootfs], Stdio(stdout=fifos["stdout"]))
            got: dict[str, bytes] = {}
            async with trio.open_nursery() as n:
                n.start_soon(read_fifo, fifos["stdout"], got, "out")
                await cm.create_container(cfg)
                assert plugged in pod.vm.devices
                host_root = pod.sandbox.layout.rootfs_host_path("c1")
                assert str(host_root) not in mounts_below(pod.base)  # the host mounted nothing there
                await cm.start_process(ProcessId("c1"))
                with trio.fail_after(20):
                    status = await cm.wait_process(ProcessId("c1"))
            assert status.code == 0 and got["out"] == b"ext4\nkata-block-root\n"
            await cm.delete_process(ProcessId("c1"))
            assert not any(isinstance(d, BlockDevice) for d in pod.vm.devices)
            assert not pod.vm.file_disks  # the "guest's" disk over the file is gone with it
            assert not any("c1" in m for m in mounts_below(pod.base))

    try:
        trio.run(main)
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
    if shutil.which("debugfs") is not None:  # the write is in the image itself
        debugfs = ["debugfs", "-R", "cat /hello", str(image)]
        cat = subprocess.run(debugfs, check=True, capture_output=True, text=True)
        assert cat.stdout == "kata-block-root\n"


def test_a_loop_file_rootfs_without_block_hotplug_is_refused_and_nothing_is_mounted(
    virtiofs_as_bind: dict[str, Path], tmp_path: Path
) -> None:
    """The host would need a loop device to mount a blockfile snapshot: a back-end without block hot-plug
    refuses the container (InvalidArgument) instead of trying."""
    image = tmp_path / "snapshot"
    image.write_bytes(bytes(4096))

    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            bundle = pod.base / "bundles" / "c1"
            bundle.mkdir(parents=True)
            rootfs = [RootfsMount("ext4", str(image), options=("loop", "rw"))]
            with pytest.raises(InvalidArgument, match=r"loop file .* needs block hot-plug"):
                await cm.create_container(ContainerConfig("c1", bundle, _spec("true"), rootfs, Stdio()))
            assert cm.container_ids() == [] and not pod.sandbox.layout.container_dir("c1").exists()
            assert not any(isinstance(d, BlockDevice) for d in pod.vm.devices)
            assert not any("c1" in m for m in mounts_below(pod.base))

    trio.run(main)


def test_block_rootfs_source_takes_one_mount_of_a_block_device_or_of_a_regular_file_with_loop(
    tmp_path: Path,
) -> None:
    """runtime-rs's block rootfs (a block device node, through a symlink as devmapper's /dev/mapper/NAME)
    plus blockfile's loop file (a regular file, never through a symlink, only with "loop")."""
    image = tmp_path / "snapshot"
    image.write_bytes(bytes(4096))
    (tmp_path / "link").symlink_to(image)
    node = tmp_path / "blk"
    os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(7, 200))  # needs root, like the loop tests above
    (tmp_path / "mapper").symlink_to(node)
    loop_file = RootfsMount("ext4", str(image), options=("loop", "rw"))
    assert block_rootfs_source([loop_file]) == image
    assert block_rootfs_source([RootfsMount("ext4", str(node), options=("rw",))]) == node
    assert block_rootfs_source([RootfsMount("ext4", str(tmp_path / "mapper"))]) == tmp_path / "mapper"
    for rootfs in (
        [RootfsMount("ext4", str(image), options=("rw",))],  # a file without "loop": not a disk
        [RootfsMount("ext4", str(tmp_path / "link"), options=("loop", "rw"))],  # a symlink: not taken
        [RootfsMount("ext4", str(tmp_path / "gone"), options=("loop",))],
        [RootfsMount("bind", str(image), options=("loop", "rbind"))],
        [RootfsMount("overlay", str(image), options=("loop",))],
        [RootfsMount("ext4", str(image), target="sub", options=("loop",))],
        [loop_file, loop_file],
        [],
    ):
        assert block_rootfs_source(rootfs) is None, rootfs


def test_the_block_rootfs_storage_has_no_host_only_option_and_a_loop_file_is_opened_without_symlinks(
    tmp_path: Path,
) -> None:
    image = tmp_path / "snapshot"
    image.write_bytes(bytes(4096))

    class Hv:
        name = "fake"

        def __init__(self) -> None:
            self.added: list[BlockDevice] = []

        def capabilities(self) -> Capabilities:
            return Capabilities(hotplug=frozenset({"block"}))

        async def add_device(self, device: BlockDevice) -> DeviceInfo:
            self.added.append(device)
            return DeviceInfo(guest_path="/dev/vdb")

    async def main() -> None:
        hv, plugged = Hv(), PluggedDevices()
        view = RootfsMount("ext4", str(image), options=("loop", "noatime", "x-kata.test=1", "ro"))
        storage = await plug_block_rootfs(hv, "c1", view, "/run/c1/rootfs", plugged)  # type: ignore[arg-type]
        assert (storage.driver, storage.source, storage.fstype) == ("mmioblk", "/dev/vdb", "ext4")
        assert storage.options == ["noatime", "ro"]
        assert (
            plugged.block
            == hv.added
            == [BlockDevice(image, read_only=True, device_id="c1:rootfs", follow_symlinks=False)]
        )
        node = RootfsMount("ext4", "/dev/dm-3", options=("rw",))  # devmapper's: followed as before
        storage = await plug_block_rootfs(hv, "c2", node, "/run/c2/rootfs", plugged)  # type: ignore[arg-type]
        assert storage.options == ["rw"] and hv.added[-1].follow_symlinks

    trio.run(main)


def test_a_block_device_the_vm_refuses_fails_the_create_and_one_without_hotplug_is_refused(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path], loop_disk: Path
) -> None:
    st = os.stat(loop_disk)
    entry = {"path": "/dev/xvdz", "type": "b", "major": os.major(st.st_rdev), "minor": os.minor(st.st_rdev)}

    async def main() -> None:
        for mode, error, match in [
            ("block_refused", SandboxError, "guest refused it"),
            ("", InvalidArgument, "block devices need block hot-plug"),
        ]:
            async with running_pod(virtiofs_as_bind, fail=mode) as pod:
                cm = pod.instance.containers
                spec = _spec("true")
                spec["linux"]["devices"] = [entry]
                with pytest.raises(error, match=match):
                    await cm.create_container(_container(pod, busybox_lower, "c1", spec, Stdio()))
                assert cm.container_ids() == [] and not pod.sandbox.layout.container_dir("c1").exists()
                assert not any(isinstance(d, BlockDevice) for d in pod.vm.devices)
            gone = {"path": "/dev/xvdz", "type": "b", "major": 4095, "minor": 4095}
            async with running_pod(virtiofs_as_bind, fail="block_hotplug") as pod:
                spec = _spec("true")
                spec["linux"]["devices"] = [gone]
                with pytest.raises(InvalidArgument, match="no host block device 4095:4095"):
                    await pod.instance.containers.create_container(
                        _container(pod, busybox_lower, "c2", spec, Stdio())
                    )

    trio.run(main)


@contextlib.contextmanager
def _helpers(n: int) -> Iterator[list[int]]:
    """``n`` sleeping processes standing in for the VMM's process and its vCPU thread."""
    procs = [subprocess.Popen(["sleep", "600"]) for _ in range(n)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _v1_tasks(controller: str, rel: str) -> set[int]:
    return {int(x) for x in (Path("/sys/fs/cgroup") / controller / rel / "tasks").read_text().split()}


@pytest.mark.parametrize("sandbox_cgroup_only", [False, True])
def test_host_cgroup_holds_the_vcpu_thread_sums_cpu_limits_and_goes_at_cleanup(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path], sandbox_cgroup_only: bool
) -> None:
    """The sandbox cgroup at the sandbox container's cgroupsPath (v1 here): vCPU threads in it, the VMM
    process in the overhead cgroup (or in the sandbox cgroup with sandbox_cgroup_only); CPU limits are the
    containers' sum, updated on Create, Update and delete; everything removed and unrecorded at cleanup."""
    from kata_resources import cgroup_version

    if cgroup_version() != 1 or not Path("/sys/fs/cgroup/cpu/tasks").exists():
        pytest.skip("this host test is for cgroup v1 (the lab VM covers v2)")
    rel = f"kvc-test-{os.getpid()}/pod"
    cpu = Path("/sys/fs/cgroup/cpu") / rel

    async def main(vmm: int, vcpu: int) -> None:
        first = _spec("true", cgroups_path=f"/{rel}")
        runtime = RuntimeConfig(sandbox_cgroup_only=sandbox_cgroup_only)
        async with running_pod(
            virtiofs_as_bind,
            first_spec=first,
            runtime=runtime,
            cgroup_root=Path("/sys/fs/cgroup"),
            vmm_pids=[vmm, vcpu],
        ) as pod:
            assert vcpu in _v1_tasks("cpu", rel)
            if sandbox_cgroup_only:
                assert vmm in _v1_tasks("cpu", rel)
            else:
                assert vmm in _v1_tasks("cpu", "kata_overhead/sb1")
                assert vmm not in _v1_tasks("cpu", rel)
            state_file = pod.base / "state" / "sb1" / "state.json"
            assert json.loads(state_file.read_text())["extra"]["cgroup"]["path"] == rel
            assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "-1"
            cm = pod.instance.containers
            spec = _spec("sleep", "100")
            spec["linux"]["resources"] = {"cpu": {"quota": 50_000, "period": 100_000}}
            await cm.create_container(_container(pod, busybox_lower, "c1", spec, Stdio()))
            assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
            await cm.start_process(ProcessId("c1"))
            await cm.update_container("c1", {"cpu": {"quota": 150_000, "period": 100_000}})
            assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "150000"
            await cm.kill_process(ProcessId("c1"), signal.SIGKILL)
            with trio.fail_after(20):
                await cm.wait_process(ProcessId("c1"))
            await cm.delete_process(ProcessId("c1"))
            assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "-1"
            await pod.sandbox.cleanup()
            assert "cgroup" not in json.loads(state_file.read_text())["extra"]

    with _helpers(2) as (vmm, vcpu):
        trio.run(main, vmm, vcpu)
        assert not cpu.exists() and not cpu.parent.exists()
        assert not Path("/sys/fs/cgroup/cpu/kata_overhead/sb1").exists()
        assert vmm in _v1_tasks("cpu", "") and vcpu in _v1_tasks("cpu", "")


def test_vm_is_sized_from_the_sandbox_spec_and_the_pod_gets_one_shm(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    """default_vcpus/default_memory plus the sandbox container's limits (static sizing) before boot; the
    sandbox's /dev/shm size goes to CreateSandbox as the pod's tmpfs and each container binds it."""

    async def main() -> None:
        first = _spec("true")
        first["linux"]["resources"] = {
            "cpu": {"quota": 100_000, "period": 100_000},
            "memory": {"limit": 256 << 20},
        }
        async with running_pod(virtiofs_as_bind, first_spec=first) as pod:
            assert (pod.vm.config.default_vcpus, pod.vm.config.default_memory) == (2, 512 + 256)
            assert pod.sandbox.shm_size == 64 << 20  # the spec's size=65536k
            storages = pod.vm.service.sandbox_storages
            assert any(s.mount_point == "/run/kata-containers/sandbox/shm" for s in storages), storages
            mounts = pod.sandbox.guest_mounts([{"destination": "/dev/shm", "type": "tmpfs", "source": "shm"}])
            assert mounts == [
                {
                    "destination": "/dev/shm",
                    "type": "bind",
                    "source": "/run/kata-containers/sandbox/shm",
                    "options": ["rbind"],
                }
            ]

    trio.run(main)


def _cpu_spec(*args: str, quota: int, period: int = 100_000) -> dict[str, Any]:
    spec = _spec(*args)
    spec["linux"]["resources"] = {"cpu": {"quota": quota, "period": period}}
    return spec


def test_dynamic_sizing_grows_the_vm_with_containers_and_updates_and_onlines_the_cpus(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """static_sandbox_resource_mgmt = false on a back-end that hot-plugs vCPUs (runtime-rs's dynamic path):
    the VM boots with default_vcpus, each Create and Update resizes it to the sum of ceil(quota/period)
    (never below default_vcpus) before the agent call, the agent onlines them (OnlineCPUMem), a Delete
    shrinks it back."""
    onlined: list[int] = []

    def online_cpus(target: int, base: str | None = None) -> int:
        onlined.append(target)
        return target  # every CPU asked for is online

    monkeypatch.setattr(agent_guest, "online_cpus", online_cpus)

    async def main() -> None:
        runtime = RuntimeConfig(static_sandbox_resource_mgmt=False)
        first = _cpu_spec("true", quota=200_000)
        async with running_pod(
            virtiofs_as_bind, fail="vcpu_hotplug", first_spec=first, runtime=runtime
        ) as pod:
            assert pod.vm.config.default_vcpus == 1  # not sized statically (that would be 1 + 2)
            cm = pod.instance.containers
            cfg = _container(pod, busybox_lower, "c1", _cpu_spec("sleep", "1000", quota=150_000), Stdio())
            await cm.create_container(cfg)
            assert pod.vm.resizes == [(1, 2)] and onlined == [2]
            await cm.update_container("c1", {"cpu": {"quota": 250_000, "period": 100_000}})
            assert pod.vm.resizes[-1] == (2, 3) and onlined == [2, 3]
            await cm.update_container("c1", {"cpu": {"cpus": "0"}})  # a cpuset-only update keeps the quota
            await cm.update_container("c1", {"pids": {"limit": 64}})  # no CPU part: nothing to resize
            assert len(pod.vm.resizes) == 2
            await cm.start_process(ProcessId("c1"))
            await cm.kill_process(ProcessId("c1"), signal.SIGKILL)
            with trio.fail_after(20):
                await cm.wait_process(ProcessId("c1"))
            await cm.delete_process(ProcessId("c1"))
            assert pod.vm.resizes[-1] == (3, 1) and onlined == [2, 3]  # shrinking onlines nothing
            assert pod.sandbox.vcpu_plan is not None and pod.sandbox.vcpu_plan.current == 1

    trio.run(main)


def _memory_spec(*args: str, limit_mib: int) -> dict[str, Any]:
    spec = _spec(*args)
    spec["linux"]["resources"] = {"memory": {"limit": limit_mib << 20}}
    return spec


def test_dynamic_sizing_grows_memory_with_container_limits_and_onlines_it(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """static_sandbox_resource_mgmt = false on a back-end that hot-plugs memory: the VM boots with
    default_memory, a Create or Update with a memory limit resizes it to default_memory plus the limits
    (`Hypervisor.resize_memory`) before the agent call, the agent onlines memory (OnlineCPUMem without
    cpu_only), a Delete shrinks it back; what the VM got (capped) is what the plan keeps."""
    onlined: list[str] = []
    monkeypatch.setattr(agent_guest, "online_cpus", lambda target, base=None: max(target, 1))
    monkeypatch.setattr(agent_guest, "online_memory", lambda base="": onlined.append("memory") or 0)

    async def main() -> None:
        runtime = RuntimeConfig(static_sandbox_resource_mgmt=False)
        first = _memory_spec("true", limit_mib=4096)
        async with running_pod(
            virtiofs_as_bind, fail="memory_hotplug", first_spec=first, runtime=runtime
        ) as pod:
            default = pod.vm.config.default_memory
            assert default == HypervisorConfig().default_memory  # not sized statically (that adds 4096)
            plan = pod.sandbox.memory_plan
            assert plan is not None and plan.current == default
            cm = pod.instance.containers
            cfg = _container(pod, busybox_lower, "c1", _memory_spec("sleep", "1000", limit_mib=256), Stdio())
            await cm.create_container(cfg)
            assert pod.vm.memory_resizes == [default + 256] and onlined == ["memory"]
            await cm.update_container("c1", {"memory": {"limit": 512 << 20}})
            assert pod.vm.memory_resizes[-1] == default + 512 and onlined == ["memory", "memory"]
            await cm.update_container("c1", {"cpu": {"shares": 2}})  # no memory part: nothing to resize
            assert len(pod.vm.memory_resizes) == 2
            pod.vm.memory_cap = default + 300  # the VM cannot hold more: the plan keeps what it got
            await cm.update_container("c1", {"memory": {"limit": 1024 << 20}})
            assert plan.current == default + 300
            await cm.start_process(ProcessId("c1"))
            await cm.kill_process(ProcessId("c1"), signal.SIGKILL)
            with trio.fail_after(20):
                await cm.wait_process(ProcessId("c1"))
            await cm.delete_process(ProcessId("c1"))
            assert pod.vm.memory_resizes[-1] == default and plan.current == default
            assert len(onlined) == 2  # shrinking (the capped update, the delete) onlines nothing

    trio.run(main)


def test_a_refused_memory_resize_fails_the_create_cleanly(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    async def main() -> None:
        runtime = RuntimeConfig(static_sandbox_resource_mgmt=False)
        async with running_pod(virtiofs_as_bind, fail="memory_refused", runtime=runtime) as pod:
            cm = pod.instance.containers
            cfg = _container(pod, busybox_lower, "c1", _memory_spec("true", limit_mib=128), Stdio())
            with pytest.raises(SandboxError, match=r"resizing the VM to \d+ MiB for container c1: .*region"):
                await cm.create_container(cfg)
            assert cm.container_ids() == []
            assert pod.sandbox.memory_plan is not None and pod.sandbox.memory_plan.requests == {}

    trio.run(main)


def test_a_hot_added_vcpu_thread_joins_the_sandbox_cgroup(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    """Dynamic sizing with a host cgroup: the thread of a vCPU a resize adds starts in its creator's
    cgroup (the overhead one); the sandbox moves it into the sandbox cgroup, under the pod's CPU limits."""
    from kata_resources import cgroup_version

    if cgroup_version() != 1 or not Path("/sys/fs/cgroup/cpu/tasks").exists():
        pytest.skip("this host test is for cgroup v1 (the lab VM covers v2)")
    rel = f"kvc-hp-{os.getpid()}/pod"

    async def main(vmm: int, vcpu0: int, vcpu1: int) -> None:
        runtime = RuntimeConfig(static_sandbox_resource_mgmt=False)
        first = _spec("true", cgroups_path=f"/{rel}")
        async with running_pod(
            virtiofs_as_bind,
            fail="vcpu_hotplug",
            first_spec=first,
            runtime=runtime,
            cgroup_root=Path("/sys/fs/cgroup"),
            vmm_pids=[vmm, vcpu0],
        ) as pod:
            pod.vm.spare_vcpu_pids = [vcpu1]
            assert vcpu1 not in _v1_tasks("cpu", rel)
            cfg = _container(pod, busybox_lower, "c1", _cpu_spec("true", quota=200_000), Stdio())
            await pod.instance.containers.create_container(cfg)
            assert pod.vm.resizes == [(1, 2)]
            assert {vcpu0, vcpu1} <= _v1_tasks("cpu", rel)

    with _helpers(3) as (vmm, vcpu0, vcpu1):
        trio.run(main, vmm, vcpu0, vcpu1)
    assert not (Path("/sys/fs/cgroup/cpu") / rel).exists()


def test_static_sizing_never_resizes_and_a_refused_resize_fails_the_create_cleanly(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    async def main() -> None:
        static = RuntimeConfig(static_sandbox_resource_mgmt=True)
        async with running_pod(virtiofs_as_bind, fail="vcpu_hotplug", runtime=static) as pod:
            cm = pod.instance.containers
            await cm.create_container(
                _container(pod, busybox_lower, "c1", _cpu_spec("true", quota=300_000), Stdio())
            )
            assert pod.vm.resizes == [] and pod.sandbox.vcpu_plan is None
        dynamic = RuntimeConfig(static_sandbox_resource_mgmt=False)
        async with running_pod(virtiofs_as_bind, fail="vcpu_refused", runtime=dynamic) as pod:
            cm = pod.instance.containers
            cfg = _container(pod, busybox_lower, "c2", _cpu_spec("true", quota=300_000), Stdio())
            with pytest.raises(SandboxError, match=r"resizing the VM to 3 vCPUs for container c2: .*refused"):
                await cm.create_container(cfg)
            assert cm.container_ids() == [] and pod.sandbox.vcpu_plan is not None
            assert pod.sandbox.vcpu_plan.requests == {} and pod.sandbox.vcpu_plan.current == 1
            assert not pod.sandbox.layout.container_dir("c2").exists()  # its rootfs mount undone
            bad = _container(pod, busybox_lower, "c3", _spec("true"), Stdio())
            bad.spec["linux"]["resources"] = {"cpu": {"cpus": "7-2"}}
            with pytest.raises(InvalidArgument, match="cpuset"):
                await cm.create_container(bad)

    trio.run(main)


def test_a_failed_boot_leaves_no_tap_and_no_cgroup(
    virtiofs_as_bind: dict[str, Path], pod_network: dict[str, str]
) -> None:
    """The network and the cgroup are made before the VM boots: a boot that fails undoes both."""
    pod_ns = pod_network["pod"]
    rel = f"kvc-fail-{os.getpid()}"

    async def main() -> None:
        first = _spec("true", netns=f"/run/netns/{pod_ns}", cgroups_path=f"/{rel}")
        with pytest.raises(BaseExceptionGroup) as info:  # the fixture's nursery wraps the SandboxError
            async with running_pod(
                virtiofs_as_bind,
                fail="start_vm",
                first_spec=first,
                agent_netns=pod_network["guest"],
                cgroup_root=Path("/sys/fs/cgroup"),
            ):
                pass
        assert info.group_contains(SandboxError, match="guest kernel panicked")
        assert "_kata" not in await _aip("-o", "link", "show", netns=pod_ns)
        assert "ingress" not in await _out("tc", "-n", pod_ns, "qdisc", "show", "dev", "eth0")
        assert not await trio.Path("/sys/fs/cgroup/cpu", rel).exists()
        assert not await trio.Path("/sys/fs/cgroup", rel).exists()

    trio.run(main)


def test_two_containers_of_the_pod_share_one_dev_shm_and_one_hostname(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path]
) -> None:
    """What one container puts in /dev/shm the other reads: both bind the pod's one tmpfs."""

    async def main() -> None:
        async with running_pod(virtiofs_as_bind) as pod:
            cm = pod.instance.containers
            writer = _spec("sh", "-c", "echo from-c1 > /dev/shm/note; hostname")
            await cm.create_container(_container(pod, busybox_lower, "c1", writer, Stdio()))
            await cm.start_process(ProcessId("c1"))
            with trio.fail_after(20):
                assert (await cm.wait_process(ProcessId("c1"))).code == 0
            reader = _spec("sh", "-c", "cat /dev/shm/note; hostname; grep ' /dev/shm ' /proc/mounts")
            lines = (await _stdout_of(pod, busybox_lower, "c2", reader)).decode().splitlines()
            assert lines[:2] == ["from-c1", "pod"], lines
            assert "size=65536k" in lines[2], lines  # the sandbox spec's size, one tmpfs for the pod
            for cid in ("c1", "c2"):
                await cm.delete_process(ProcessId(cid))

    trio.run(main)


def test_the_sandbox_resolv_conf_reaches_create_sandbox_and_the_container(
    busybox_lower: Path, virtiofs_as_bind: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """DNS: the file bound on the sandbox's /etc/resolv.conf gives CreateSandbox's dns lines (the agent
    writes the guest's), and the bind itself reaches the container through the share."""
    import kata_agent._guest as agent_guest

    written: list[list[str]] = []
    monkeypatch.setattr(agent_guest, "write_resolv_conf", written.append)  # never the host's file
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# CNI\nnameserver 10.96.0.10\nsearch default.svc.cluster.local\n")
    bound = [
        {"destination": "/etc/resolv.conf", "type": "bind", "source": str(resolv), "options": ["rbind", "ro"]}
    ]

    async def main() -> None:
        async with running_pod(virtiofs_as_bind, first_spec=_spec("true", mounts=bound)) as pod:
            assert written == [["nameserver 10.96.0.10", "search default.svc.cluster.local"]]
            cm = pod.instance.containers
            spec = _spec("cat", "/etc/resolv.conf", mounts=bound)
            assert await _stdout_of(pod, busybox_lower, "c1", spec) == resolv.read_bytes()
            await cm.delete_process(ProcessId("c1"))

    trio.run(main)


def test_the_sandbox_api_pod_dns_reaches_create_sandbox(
    virtiofs_as_bind: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18: under the Sandbox API containerd binds no resolv.conf; the pod config's DNS lines
    (`ContainerConfig.dns`) are what CreateSandbox sends, and an empty list is sent as such."""
    import kata_agent._guest as agent_guest

    written: list[list[str]] = []
    monkeypatch.setattr(agent_guest, "write_resolv_conf", written.append)  # never the host's file
    lines = ["nameserver 10.96.0.10", "search default.svc.cluster.local", "options ndots:5"]

    async def main() -> None:
        async with running_pod(virtiofs_as_bind, first_dns=lines):
            assert written == [lines]

    trio.run(main)


def test_a_sandbox_restores_from_the_vm_template_and_gets_its_own_clock_and_rng_seed(
    busybox_lower: Path,
    virtiofs_as_bind: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 16: with `[factory] enable_template`, the first sandbox builds the template (a VM booted to
    agent-ready with the sandbox's devices, its agent hung up, saved, stopped), then starts by restoring
    it; the next one restores at once. Each clone's guest gets SetGuestDateTime(now) and 32 fresh bytes of
    ReseedRandomDev before CreateSandbox (its hostname); a container then runs in it."""
    clock: list[float] = []
    seeds: list[bytes] = []
    monkeypatch.setattr(agent_guest, "set_realtime", lambda sec, usec: clock.append(sec + usec / 1e6))
    monkeypatch.setattr(agent_guest, "reseed_random", seeds.append)
    caplog.set_level(logging.INFO)
    template_root = Path(tempfile.mkdtemp(prefix="ktpl-", dir="/tmp"))
    factory = FactoryConfig(enable_template=True, template_path=template_root)
    vm_dir = template_root / "current" / "vm"

    async def main() -> None:
        vms: list[AgentVm] = []
        async with running_pod(virtiofs_as_bind, factory=factory, vms=vms) as pod:
            vm, template_vm = vms
            assert template_vm.calls == [
                "prepare_vm",
                "add_device:ShareFsDevice",
                "start_vm",
                "save_vm",
                "stop_vm",
                "cleanup",
            ]
            assert template_vm.shared == template_root / "share"
            assert vm.calls[:4] == [
                "prepare_vm",
                "add_device:ShareFsDevice",
                f"restore_from:{vm_dir}",
                "start_vm",
            ]
            assert pod.sandbox.restored and vm.restored_from == vm_dir
            assert len(seeds) == 1 and len(seeds[0]) == 32
            (now,) = clock
            assert abs(now - time.time()) < 600  # the host's clock, not the template's
            assert pod.vm.service.pod_namespaces is not None  # CreateSandbox came after
            cm = pod.instance.containers
            assert await _stdout_of(pod, busybox_lower, "c1", _spec("hostname")) == b"pod\n"
            await cm.delete_process(ProcessId("c1"))
        assert "sandbox sb1: restored from template" in caplog.text
        vms.clear()
        async with running_pod(virtiofs_as_bind, factory=factory, vms=vms) as pod:
            assert len(vms) == 1 and pod.sandbox.restored  # the template is up to date: no build
        assert len(seeds) == 2 and seeds[0] != seeds[1]

    try:
        trio.run(main)
    finally:
        shutil.rmtree(template_root, ignore_errors=True)


def test_a_pod_with_a_nic_restores_from_the_template_and_gets_its_nic_hot_plugged(
    busybox_lower: Path,
    virtiofs_as_bind: dict[str, Path],
    pod_network: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a back-end that hot-plugs NICs, a pod with a network device no longer cold-boots under
    `[factory] enable_template`: the VM is restored from the template (which has no NIC), the pod's NIC is
    hot-plugged after the restore, and the agent names, addresses and routes it as the veth (UpdateInterface
    retried while the hot-plugged link appears); traffic flows."""
    monkeypatch.setattr(agent_guest, "set_realtime", lambda sec, usec: None)
    monkeypatch.setattr(agent_guest, "reseed_random", lambda seed: None)
    pod_ns, guest_ns = pod_network["pod"], pod_network["guest"]
    template_root = Path(tempfile.mkdtemp(prefix="ktpl-", dir="/tmp"))
    factory = FactoryConfig(enable_template=True, template_path=template_root)

    async def main() -> None:
        vms: list[AgentVm] = []
        first = _spec("true", netns=f"/run/netns/{pod_ns}")
        async with running_pod(
            virtiofs_as_bind,
            fail="net_hotplug",
            first_spec=first,
            agent_netns=guest_ns,
            factory=factory,
            vms=vms,
        ) as pod:
            vm, template_vm = vms
            assert "add_device:NetworkDevice" not in template_vm.calls
            assert vm.calls[:5] == [
                "prepare_vm",
                "add_device:ShareFsDevice",
                f"restore_from:{template_root / 'current' / 'vm'}",
                "start_vm",
                "add_device:NetworkDevice",
            ]
            assert pod.sandbox.restored
            assert "10.88.0.2/24" in await _aip("-o", "addr", "show", "dev", "eth0", netns=guest_ns)
            assert "default via 10.88.0.1 dev eth0" in await _aip("route", "show", netns=guest_ns)
            ping = await trio.run_process(
                ["ip", "netns", "exec", guest_ns, BUSYBOX, "ping", "-c", "2", "-W", "10", "10.88.0.1"],
                capture_stdout=True,
                check=False,
            )
            assert ping.returncode == 0, ping.stdout

    try:
        trio.run(main)
    finally:
        shutil.rmtree(template_root, ignore_errors=True)
