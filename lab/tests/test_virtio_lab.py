"""kata-vmm's virtio devices against the Debian guest kernel (marked ``lab``): block, fs, net, vsock, rng.

One boot exercises every device (boots are the slow part): the guest runs scripts/virtio_devices.sh
from initrd-test.img, the host side checks checksums, listings and files while it runs. The VMM runs
inside a fresh network namespace that holds its tap, whose far end (10.77.0.1) the guest pings.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from framework import (
    GuestAssets,
    GuestConfig,
    KataVmmBackend,
    MicroVMFactory,
    build_vsock_helper,
    initrd_with_files,
    vsock_echo,
)

pytestmark = pytest.mark.lab

SCRIPTS = Path(__file__).resolve().parent / "scripts"
# vsock payload each way; KATA_LAB_VSOCK_MIB overrides (the issue asks for 64 MiB)
VSOCK_BYTES = int(os.environ.get("KATA_LAB_VSOCK_MIB", "64")) << 20
BLOCK_BYTES = 8 << 20
BUSYBOX_APPLETS = ["sh", "ls", "cat", "mount", "ip"]


class NetnsKataVmm(KataVmmBackend):
    """kata-vmm started inside network namespace ``netns`` (where its tap lives)."""

    def __init__(self, netns: str) -> None:
        super().__init__()
        self.netns = netns

    def command(self, config: GuestConfig) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().command(config)]


@pytest.fixture
def tap_netns() -> Iterator[tuple[str, str]]:
    """A network namespace with tap ``kvtap0`` at 10.77.0.1/24; removed afterwards."""
    ns, tap = f"kvirtio-{uuid.uuid4().hex[:8]}", "kvtap0"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (
            ["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"],
            ["addr", "add", "10.77.0.1/24", "dev", tap],
            ["link", "set", tap, "up"],
            ["link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        yield ns, tap
    finally:
        subprocess.run(["ip", "-n", ns, "link", "del", tap], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def make_rootfs(root: Path) -> None:
    """A small busybox root: the binary, applet links, a few files and directories."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("kata-guest\n")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "tmp").mkdir(mode=0o1777)
    (root / "usr" / "share" / "empty").mkdir(parents=True)


def host_listing(root: Path) -> set[str]:
    """What ``find . -exec stat -c '%n %f %s'`` prints in the guest, from the host's view."""
    out = set()
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        name = "." if path == root else "./" + str(path.relative_to(root))
        out.add(f"{name} {st.st_mode:x} {st.st_size}")
    return out


def serve_guest_connection(path: Path, received: list[bytes]) -> socket.socket:
    """Listen on ``<uds>_5000`` and answer the guest's one connection with ``pong:`` + what it sent."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(300)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
                received.append(data)
                conn.sendall(b"pong:" + data)

    threading.Thread(target=serve, name="lab-vsock-5000", daemon=True).start()
    return listener


def test_linux_guest_uses_block_fs_net_vsock_and_rng_on_kata_vmm(
    guest_assets: GuestAssets, tmp_path: Path, tap_netns: tuple[str, str]
) -> None:
    ns, tap = tap_netns
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(BLOCK_BYTES))
    rootfs = tmp_path / "rootfs"
    make_rootfs(rootfs)
    expected_listing = host_listing(rootfs)
    uds = tmp_path / "v.sock"
    token = uuid.uuid4().hex
    initrd = initrd_with_files(
        guest_assets.initrd_test,
        {
            "/lab/run.sh": (SCRIPTS / "virtio_devices.sh").read_text(),
            "/lab/vsock_helper": build_vsock_helper(tmp_path / "vsock_helper"),
        },
        tmp_path / "initrd",
    )
    cmdline = (
        "console=ttyS0 quiet panic=-1 lab.run=/lab/run.sh lab.virtiofs=rootfs "
        f"lab.blkbytes={BLOCK_BYTES} lab.token={token}"
    )
    devices = [
        "--vsock", str(uds), "--block", f"{disk},ro", "--net", f"{tap},mac=52:54:00:77:00:02",
        "--fs", f"rootfs={rootfs}", "--rng",
    ]  # fmt: skip
    config = GuestConfig(
        kernel=guest_assets.kernel,
        initrd=initrd,
        cmdline=cmdline,
        memory_mib=512,
        extra_args={"kata-vmm": ["--timeout", "600", *devices]},
    )
    received: list[bytes] = []
    listener = serve_guest_connection(Path(f"{uds}_5000"), received)
    factory = MicroVMFactory(tmp_path, NetnsKataVmm(ns), guest_assets)
    spawned = False
    try:
        vm = factory.build(config).spawn()
        spawned = True
        boot_s = vm.wait_for_console("VSOCK-LISTENING 1024", timeout=300)
        payload = os.urandom(VSOCK_BYTES)
        echo, vsock_s, ok_line = vsock_echo(uds, payload)
        vm.wait_for_console("VIRTIO-SCRIPT-DONE", timeout=300)
        assert vm.wait_exit(timeout=60) == 0, vm.stderr
    except BaseException:
        tail = vm.console[-4000:] if spawned else "(not spawned)"
        print(f"guest console (last 4000 characters):\n{tail}")
        raise
    finally:
        factory.kill_all()
        listener.close()
    console = vm.console
    print(console[-4000:])

    def field(name: str) -> str:
        match = re.search(rf"^{name} (.*)$", console, re.MULTILINE)
        assert match, f"no {name} line on the console:\n{console[-3000:]}"
        return match.group(1).strip()

    # every device was found through the DSDT: vsock 19, block 2, net 1, fs 26, rng 4
    assert sorted(int(x, 16) for x in field("VIRTIO-DEVICES").split()) == [1, 2, 4, 19, 26]
    # block: read-only, and the first 8 MiB read in the guest match the image
    assert field("BLK-RO") == "1"
    assert field("BLK-SHA") == hashlib.sha256(disk.read_bytes()).hexdigest()
    # rng: the guest's hw_random core picked our device and reads from it
    assert field("RNG-CURRENT").startswith("virtio_rng")
    assert field("RNG-BYTES") == "4096"
    # fs: the guest sees the host's tree exactly, reads a binary intact, and its write lands on the host
    guest_listing = {
        line.removeprefix("FS-ENTRY ") for line in console.splitlines() if line.startswith("FS-ENTRY ")
    }
    assert guest_listing == expected_listing
    assert field("FS-BUSYBOX-SHA") == hashlib.sha256(Path("/bin/busybox").read_bytes()).hexdigest()
    assert field("FS-WRITE") == "0"
    assert (rootfs / "from-guest.txt").read_text() == f"written-by-guest {token}\n"
    # net: the guest pinged the namespace's end of the tap
    assert field("NET-PING") == "0", console
    # vsock: host -> guest -> host, with matching checksums on both ends; then a guest-initiated connection
    assert re.fullmatch(r"OK \d+", ok_line)
    assert field("VSOCK-ECHO").startswith("0 ")
    assert field("VSOCK-SHA") == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}"
    assert echo == payload
    assert received == [b"ping-from-guest\n"]
    assert field("VSOCK-GUEST-REPLY") == "pong:ping-from-guest"
    mib = len(payload) / (1 << 20)
    print(
        f"kata-vmm virtio lab: script started after {boot_s:.1f} s; vsock {mib:.0f} MiB each way in "
        f"{vsock_s:.1f} s ({2 * mib / vsock_s:.1f} MiB/s both directions together)"
    )
