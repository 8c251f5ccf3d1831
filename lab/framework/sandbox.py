"""The sandbox guest (initrd-sandbox + rootfs-sandbox.ext4 with the agent) on kata-vmm, for lab tests.

The boot recipe is the one lab/images/build.py documents (and the shim's dragonball back-end uses): the image
is the first virtio-blk device (read-only, /dev/vda), hybrid vsock carries the agent's ttrpc (port 1024) and
log (1025), a virtio-fs share carries container root filesystems, an optional tap gives the guest a NIC.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from framework.assets import GuestAssets
from framework.microvm import GuestConfig, KataVmmBackend, MicroVM

SANDBOX_CMDLINE = "console=ttyS0 reboot=k panic=1 quiet"
SHARE_TAG = "kataShared"
BUSYBOX = Path("/bin/busybox")


class NetnsKataVmm(KataVmmBackend):
    """kata-vmm started inside network namespace ``netns`` (where its tap lives); None: the current one."""

    def __init__(self, netns: str | None = None) -> None:
        super().__init__()
        self.netns = netns

    def command(self, config: GuestConfig) -> list[str]:
        argv = super().command(config)
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv


@dataclass(frozen=True)
class TapNetns:
    """A network namespace holding tap ``tap`` with ``host_ip``/24 on it."""

    netns: str
    tap: str
    host_ip: str


@contextlib.contextmanager
def tap_netns(host_ip: str = "10.78.0.1") -> Iterator[TapNetns]:
    """A fresh netns with a tap (vnet_hdr) at ``host_ip``/24; deleted afterwards."""
    ns, tap = f"kagent-{uuid.uuid4().hex[:8]}", "katap0"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (
            ["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"],
            ["addr", "add", f"{host_ip}/24", "dev", tap],
            ["link", "set", tap, "up"],
            ["link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        yield TapNetns(ns, tap, host_ip)
    finally:
        subprocess.run(["ip", "-n", ns, "link", "del", tap], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def make_busybox_rootfs(root: Path) -> Path:
    """A container root filesystem: busybox-static and a link for each of its applets, /etc, /tmp."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(BUSYBOX, bin_dir / "busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout
    for applet in applets.split():
        if applet != "busybox":
            (bin_dir / applet).symlink_to("busybox")
    for d in ("etc", "proc", "sys", "dev", "tmp", "root", "usr/bin"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    return root


@dataclass
class SandboxVM:
    """A booted (or booting) sandbox guest: its VMM process and the hybrid vsock address of its agent."""

    vm: MicroVM
    uds: Path
    share: Path

    @property
    def agent_address(self) -> str:
        """kata-agent-client's address of the agent (hybrid vsock port 1024)."""
        return f"hvsock:{self.uds}:1024"

    @property
    def started_at(self) -> float:
        return self.vm.started_at


def sandbox_config(
    assets: GuestAssets,
    uds: Path,
    share: Path,
    *,
    tap: str | None = None,
    mac: str = "52:54:00:78:00:02",
    memory_mib: int = 512,
    vcpus: int = 1,
    cmdline: str = SANDBOX_CMDLINE,
    timeout_s: float = 3600,
    kernel: Path | None = None,
) -> GuestConfig:
    """The GuestConfig of the sandbox recipe for `kata-vmm run` (``kernel``: another build of vmlinuz)."""
    devices = ["--block", f"{assets.rootfs_sandbox},ro", "--vsock", str(uds), "--fs", f"{SHARE_TAG}={share}"]
    if tap is not None:
        devices += ["--net", f"{tap},mac={mac}"]
    return GuestConfig(
        kernel=kernel or assets.kernel,
        initrd=assets.initrd_sandbox,
        cmdline=cmdline,
        vcpus=vcpus,
        memory_mib=memory_mib,
        extra_args={"kata-vmm": ["--timeout", str(timeout_s), *devices]},
    )


def spawn_sandbox(
    workdir: Path,
    assets: GuestAssets | None = None,
    *,
    netns: str | None = None,
    tap: str | None = None,
    name: str = "sandbox",
    **kwargs: object,
) -> SandboxVM:
    """Start kata-vmm with the sandbox guest; the caller kills ``.vm`` (MicroVM.kill) when done."""
    assets = assets or GuestAssets()
    workdir.mkdir(parents=True, exist_ok=True)
    share = workdir / f"{name}-share"
    share.mkdir(exist_ok=True)
    uds = workdir / f"{name}.hvsock"
    uds.unlink(missing_ok=True)
    config = sandbox_config(assets, uds, share, tap=tap, **kwargs)  # type: ignore[arg-type]
    vm = MicroVM(NetnsKataVmm(netns), config, workdir, name)
    vm.spawn()
    return SandboxVM(vm, uds, share)


def wait_for_socket(path: Path, timeout: float = 60) -> None:
    """Block until the VMM created its hybrid vsock socket."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not created within {timeout:.0f} s")
        time.sleep(0.02)
