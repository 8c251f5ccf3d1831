"""The qemu back-end with the REAL qemu-system-x86_64 (TCG: ``machine_accelerators = "accel=tcg"``, no
/dev/kvm needed) and, as root, Debian's real virtiofsd: QMP negotiation, query-status, vCPU thread ids,
pause/resume, the serial console (SeaBIOS's banner), stop and that nothing is left; hot-plug as QEMU
takes it (query-pci, query-block, getfd, a vCPU), and with the lab's guest assets a hot-plugged disk and
vCPU seen and let go by the Debian guest kernel. The kernel is kata_vmm's
tiny bzImage (QEMU only checks it is one: SeaBIOS's real-mode hand-over does not reach it); no vsock (the
host has no /dev/vhost-vsock)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from kata_shim.hypervisor import (
    BlockDevice,
    HypervisorConfig,
    HypervisorError,
    NetworkDevice,
    ShareFsDevice,
    _qemu,
)
from kata_shim.hypervisor._qemu import Qemu, UnplugTimeout
from kata_vmm import testing as tk

QEMU = shutil.which("qemu-system-x86_64")
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
pytestmark = pytest.mark.skipif(QEMU is None, reason="needs qemu-system-x86_64 (Debian qemu-system-x86)")
ROOT = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(VIRTIOFSD, os.X_OK), reason="needs root and /usr/lib/qemu/virtiofsd"
)


def tcg_config(tmp_path: Path, *, virtiofs: bool) -> HypervisorConfig:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(tk.tiny_bzimage(tk.print_serial(b"hello from the tiny guest\n") + tk.HALT_FOREVER))
    image = tmp_path / "rootfs.img"
    image.write_bytes(b"\0" * (1 << 20))
    return HypervisorConfig(
        path=str(QEMU),
        kernel=kernel,
        image=image,
        default_memory=128,
        default_vcpus=2,
        machine_accelerators="accel=tcg",
        shared_fs="virtio-fs" if virtiofs else "none",
        virtio_fs_daemon=VIRTIOFSD if virtiofs else "",
    )


def alive(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 : data.rfind(b")") + 3] != b"Z"


def life_cycle(hv: Qemu, share: Path | None) -> dict[str, Any]:
    facts: dict[str, Any] = {}

    async def main() -> None:
        try:
            await hv.prepare_vm("sb1", None)
            if share is not None:
                facts["share"] = await hv.add_device(ShareFsDevice(share))
            await hv.start_vm(60)
            facts["pids"] = hv.pids()
            facts["threads"] = hv.thread_ids()
            facts["vcpus"] = hv.vcpu_thread_ids()
            facts["status"] = await hv.query_status()
            await hv.pause_vm()
            facts["paused"] = await hv.query_status()
            await hv.resume_vm()
            facts["resumed"] = await hv.query_status()
            for _ in range(600):  # the firmware's banner on the serial console, once TCG ran it
                if "SeaBIOS" in hv.console_tail():
                    break
                await trio.sleep(0.1)
            facts["console"] = hv.console_tail()
            await hv.stop_vm()
            with trio.fail_after(60):
                facts["code"] = await hv.wait_vm()
            facts["reason"] = hv.exit_reason()
        finally:
            with trio.CancelScope(shield=True):
                await hv.cleanup()

    trio.run(main)
    return facts


def check_life_cycle(facts: dict[str, Any], hv: Qemu, root: Path, processes: int) -> None:
    assert len(facts["pids"]) == processes
    assert facts["status"] == "running"
    assert len(facts["vcpus"]) == 2 and set(facts["vcpus"]) <= set(facts["threads"])
    assert facts["paused"] == "paused" and facts["resumed"] == "running"
    assert "SeaBIOS" in facts["console"]  # the serial console reaches the log and the tail
    assert facts["code"] == 0 and "host-qmp-quit" in facts["reason"]
    assert not any(alive(p) for p in facts["pids"])
    assert hv.pids() == [] and hv.thread_ids() == []
    assert sorted(p.name for p in (root / "sb1").iterdir()) == ["state.json"]


def test_real_qemu_under_tcg_negotiates_pauses_resumes_and_stops(tmp_path: Path, root: Path) -> None:
    hv = Qemu(tcg_config(tmp_path, virtiofs=False), state_root=root, open_vsock=None)
    check_life_cycle(life_cycle(hv, None), hv, root, processes=1)


@ROOT
def test_real_qemu_with_real_virtiofsd_starts_and_leaves_nothing(tmp_path: Path, root: Path) -> None:
    share = tmp_path / "shared"
    share.mkdir()
    hv = Qemu(tcg_config(tmp_path, virtiofs=True), state_root=root, open_vsock=None)
    facts = life_cycle(hv, share)
    assert facts["share"].pci_path == "05"
    check_life_cycle(facts, hv, root, processes=2)


GUEST = Path(__file__).resolve().parents[3] / "build" / "lab" / "guest"
GUEST_CHECK = """\
echo "vda ro=$(cat /sys/block/vda/ro)"
echo "pci=$(ls /sys/bus/pci/devices | wc -l)"
echo from-the-guest > /mnt/kataShared/written
"""


@ROOT
@pytest.mark.guest_assets
def test_real_guest_under_tcg_mounts_the_image_writes_through_virtiofsd_and_powers_off(
    tmp_path: Path, root: Path
) -> None:
    """The Debian guest kernel and the lab's test initrd under TCG (a few seconds): the image as a read-only
    /dev/vda, the share through the real virtiofsd, and a guest power-off that is a clean end (virtiofsd
    leaving as QEMU closes its connection is not the VM's death)."""
    if not (GUEST / "vmlinuz").is_file():
        pytest.fail(f"{GUEST}/vmlinuz missing: build the guest assets (./dev nox -s images)", pytrace=False)
    share = tmp_path / "shared"
    share.mkdir()
    (share / "check.sh").write_text(GUEST_CHECK)
    config = HypervisorConfig(
        path=str(QEMU),
        kernel=GUEST / "vmlinuz",
        initrd=GUEST / "initrd-test.img",
        image=GUEST / "rootfs-sandbox.ext4",
        default_memory=512,
        machine_accelerators="accel=tcg",
        shared_fs="virtio-fs",
        virtio_fs_daemon=VIRTIOFSD,
        kernel_params="lab.virtiofs=kataShared lab.run=/mnt/kataShared/check.sh",
    )
    hv = Qemu(config, state_root=root, open_vsock=None)
    seen: list[int] = []

    async def main() -> int:
        try:
            await hv.prepare_vm("sb1", None)
            await hv.add_device(ShareFsDevice(share))
            await hv.start_vm(60)
            seen.extend(hv.pids())
            with trio.fail_after(240):
                return await hv.wait_vm()
        finally:
            with trio.CancelScope(shield=True):
                await hv.cleanup()

    code = trio.run(main)
    console = hv.console_tail()
    assert code == 0, f"{hv.exit_reason()}\n{console}"
    assert hv.exit_reason() == "shutdown: guest-shutdown; qemu exited with code 0"
    assert "vda ro=1" in console and "check.sh exited 0" in console
    assert (share / "written").read_text() == "from-the-guest\n"
    assert len(seen) == 2 and not any(alive(p) for p in seen)


def find_device(devices: list[dict[str, Any]], qdev_id: str) -> dict[str, Any] | None:
    """The query-pci entry of ``qdev_id``, searched behind bridges too."""
    for device in devices:
        if device.get("qdev_id") == qdev_id:
            return device
        found = find_device(device.get("pci_bridge", {}).get("devices", []), qdev_id)
        if found is not None:
            return found
    return None


def test_real_qemu_hot_adds_a_disk_behind_a_root_port_and_a_vcpu_and_the_unacked_removal_times_out(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU 7.2 under TCG takes the hot-plug sequences as sent: the disk behind root port rp0 (slot 0x1b)
    read-only on its blockdev node, a fd through getfd (SCM_RIGHTS) that closefd drops, a vCPU on a slot
    query-hotpluggable-cpus named. The tiny guest never acks an eject: device_del's DEVICE_DELETED never
    comes, which is `UnplugTimeout`, and the disk stays (in QEMU and in the back-end's record)."""
    monkeypatch.setattr(_qemu, "UNPLUG_TIMEOUT", 2.0)
    config = tcg_config(tmp_path, virtiofs=False)
    config.default_maxvcpus = 3
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    hv = Qemu(config, state_root=root, open_vsock=None)
    facts: dict[str, Any] = {}
    probe = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)

    async def main() -> None:
        try:
            await hv.prepare_vm("sb1", None)
            await hv.start_vm(60)
            for _ in range(1200):  # SeaBIOS numbered the root ports' buses (query-pci walks them then)
                if "Booting from ROM" in hv.console_tail():
                    break
                await trio.sleep(0.1)
            device = BlockDevice(disk, read_only=True, device_id="c1")
            facts["info"] = await hv.add_device(device)
            facts["pci"] = await hv.execute("query-pci")
            facts["block"] = await hv.execute("query-block")
            facts["parent"] = await hv.execute(
                "qom-get", {"path": "/machine/peripheral/blk-hp0", "property": "parent_bus"}
            )
            assert hv._qmp is not None
            await hv._qmp.pass_fd("probe", probe)
            await hv.execute("closefd", {"fdname": "probe"})
            facts["resize"] = await hv.resize_vcpu(2, 3)
            facts["vcpus"] = hv.vcpu_thread_ids()
            with pytest.raises(UnplugTimeout, match="blk-hp0"):
                await hv.remove_device(device)
            facts["pci_after"] = await hv.execute("query-pci")
            # the tiny guest never switched QEMU's ACPI CPU hot-plug to its modern interface (Linux does
            # at boot), so QEMU refuses the CPU unplug outright: a typed error, the vCPU stays
            with pytest.raises(HypervisorError, match="not supported device type"):
                await hv.resize_vcpu(3, 2)
            facts["vcpus_after"] = hv.vcpu_thread_ids()
            await hv.stop_vm()
        finally:
            with trio.CancelScope(shield=True):
                await hv.cleanup()

    try:
        trio.run(main)
    finally:
        os.close(probe)
    assert facts["info"].pci_path == "1b/00" and facts["parent"] == "/machine/peripheral/rp0/rp0"
    root_bus = facts["pci"][0]["devices"]
    port = find_device(root_bus, "rp0")
    assert port is not None and port["slot"] == 0x1B
    disk_dev = find_device(port["pci_bridge"]["devices"], "blk-hp0")
    assert disk_dev is not None and disk_dev["slot"] == 0 and disk_dev["function"] == 0
    blocks = {b.get("qdev", ""): b for b in facts["block"]}
    backend = blocks["/machine/peripheral/blk-hp0/virtio-backend"]
    assert backend["inserted"]["node-name"] == "drive-hp0" and backend["inserted"]["ro"] is True
    assert backend["inserted"]["file"] == str(disk)
    assert backend["inserted"]["cache"]["direct"] is True
    assert facts["resize"] == (2, 3) and len(facts["vcpus"]) == 3 and len(facts["vcpus_after"]) == 3
    assert find_device(facts["pci_after"][0]["devices"], "blk-hp0") is not None


HOTPLUG_CHECK = """\
# the disk behind root port slot $1 (the agent's PCI path walk: the port's bus, device 00.0, its virtio disk)
disk_at() {
    for b in /sys/bus/pci/devices/0000:00:$1.0/0000:*:00.0/virtio*/block/*; do
        [ -e "$b" ] && echo "${b##*/}"
    done
}
echo HP-READY
i=0
while { [ -z "$(disk_at 1b)" ] || [ -z "$(disk_at 1c)" ]; } && [ $i -lt 1500 ]; do
    sleep 0.2; i=$((i + 1))
done
for slot in 1b 1c; do
    node=$(disk_at $slot)
    echo "HP-DISK $slot $(head -c 14 /dev/$node) ro=$(cat /sys/block/$node/ro)"
done
echo HP-DISKS-READ
i=0
while { [ -n "$(disk_at 1b)" ] || [ -n "$(disk_at 1c)" ]; } && [ $i -lt 1500 ]; do
    sleep 0.2; i=$((i + 1))
done
echo "HP-DISK-GONE $([ -z "$(disk_at 1b)$(disk_at 1c)" ] && echo yes || echo no)"
i=0
while [ ! -e /sys/devices/system/cpu/cpu1/online ] && [ $i -lt 1500 ]; do sleep 0.2; i=$((i + 1)); done
echo 1 > /sys/devices/system/cpu/cpu1/online
echo "HP-CPU online=$(cat /sys/devices/system/cpu/online)"
i=0
while [ -e /sys/devices/system/cpu/cpu1 ] && [ $i -lt 1500 ]; do sleep 0.2; i=$((i + 1)); done
echo "HP-CPU-GONE online=$(cat /sys/devices/system/cpu/online)"
i=0
while [ $i -lt 1500 ]; do sleep 0.2; i=$((i + 1)); done  # the host stops the VM
"""


async def console_says(hv: Qemu, marker: str) -> None:
    """Wait (up to 240 s) for ``marker`` on the guest's serial console."""
    for _ in range(2400):
        if marker in hv.console_tail():
            return
        await trio.sleep(0.1)
    raise AssertionError(f"no {marker!r} on the console:\n{hv.console_tail()}")


@ROOT
@pytest.mark.guest_assets
def test_real_guest_under_tcg_sees_a_hot_plugged_disk_at_its_pci_path_and_a_vcpu_and_lets_both_go(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Debian guest kernel under TCG: two disks hot-added back to back on root ports rp0 and rp1 appear
    behind 0000:00:1b.0 and 0000:00:1c.0 (the PCI paths "1b/00", "1c/00" the agent resolves), each with its
    own contents, the first read-only; their removal is acked by the guest (DEVICE_DELETED, so
    remove_device returns); a hot-added vCPU comes up and is onlined, and its removal is acked too."""
    if not (GUEST / "vmlinuz").is_file():
        pytest.fail(f"{GUEST}/vmlinuz missing: build the guest assets (./dev nox -s images)", pytrace=False)
    monkeypatch.setattr(_qemu, "UNPLUG_TIMEOUT", 120.0)  # TCG: the guest's ACPI eject takes its time
    share = tmp_path / "shared"
    share.mkdir()
    (share / "check.sh").write_text(HOTPLUG_CHECK)
    disks = [tmp_path / "disk0.img", tmp_path / "disk1.img"]
    disks[0].write_bytes(b"first-disk-ok!" + b"\0" * ((1 << 20) - 14))
    disks[1].write_bytes(b"second-disk-ok" + b"\0" * ((1 << 20) - 14))
    config = HypervisorConfig(
        path=str(QEMU),
        kernel=GUEST / "vmlinuz",
        initrd=GUEST / "initrd-test.img",
        image=GUEST / "rootfs-sandbox.ext4",
        default_memory=512,
        default_vcpus=1,
        default_maxvcpus=2,
        machine_accelerators="accel=tcg",
        shared_fs="virtio-fs",
        virtio_fs_daemon=VIRTIOFSD,
        kernel_params="lab.virtiofs=kataShared lab.run=/mnt/kataShared/check.sh",
    )
    hv = Qemu(config, state_root=root, open_vsock=None)
    facts: dict[str, Any] = {}

    async def main() -> int:
        try:
            await hv.prepare_vm("sb1", None)
            await hv.add_device(ShareFsDevice(share))
            await hv.start_vm(60)
            await console_says(hv, "HP-READY")
            # back to back: the guest probes them in whatever order; each is found by its PCI path
            devices = [BlockDevice(disks[0], read_only=True, device_id="hp0"), BlockDevice(disks[1])]
            facts["infos"] = [await hv.add_device(d) for d in devices]
            await console_says(hv, "HP-DISKS-READ")
            for device in devices:
                await hv.remove_device(device)  # returns once the guest let it go
            await console_says(hv, "HP-DISK-GONE")
            facts["grow"] = await hv.resize_vcpu(1, 2)
            await console_says(hv, "HP-CPU ")
            facts["shrink"] = await hv.resize_vcpu(2, 1)
            await console_says(hv, "HP-CPU-GONE")
            facts["pids"] = hv.pids()
            # the host stops it: QEMU 7.2 under TCG crashes in its exit path (SIGSEGV, SIGABRT on "malloc():
            # unsorted double linked list corrupted") once a vCPU was unplugged, so a guest power-off would
            # read as a crash
            await hv.stop_vm()
            with trio.fail_after(240):
                return await hv.wait_vm()
        finally:
            with trio.CancelScope(shield=True):
                await hv.cleanup()

    code = trio.run(main)
    console = hv.console_tail()
    assert code == 0, f"{hv.exit_reason()}\n{console}"
    assert [i.pci_path for i in facts["infos"]] == ["1b/00", "1c/00"]
    assert "HP-DISK 1b first-disk-ok! ro=1" in console and "HP-DISK 1c second-disk-ok ro=0" in console, (
        console
    )
    assert "HP-DISK-GONE yes" in console, console
    assert facts["grow"] == (1, 2) and "HP-CPU online=0-1" in console, console
    assert facts["shrink"] == (2, 1) and "HP-CPU-GONE online=0" in console, console
    assert not any(alive(p) for p in facts["pids"])


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="needs root, /dev/net/tun and ip (a throw-away netns)",
)
def test_real_qemu_takes_a_tap_by_getfd_and_hot_adds_the_nic_behind_a_root_port(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The NIC path with the real QEMU: the tap opened in the pod's netns goes to QEMU by getfd (SCM_RIGHTS),
    netdev_add names it (vhost off: no /dev/vhost-net here), virtio-net-pci lands behind rp0 with its MAC."""
    monkeypatch.setattr(_qemu, "UNPLUG_TIMEOUT", 2.0)
    netns = f"kqhp-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    hv = Qemu(tcg_config(tmp_path, virtiofs=False), state_root=root, open_vsock=None)
    nic = NetworkDevice("tap0_kata", "02:00:00:00:00:09")
    facts: dict[str, Any] = {}

    async def main() -> None:
        try:
            await hv.prepare_vm("sb1", netns)
            await hv.start_vm(60)
            for _ in range(1200):  # SeaBIOS numbered the root ports' buses (query-pci walks them then)
                if "Booting from ROM" in hv.console_tail():
                    break
                await trio.sleep(0.1)
            facts["info"] = await hv.add_device(nic)
            facts["pci"] = await hv.execute("query-pci")
            for prop in ("netdev", "mac", "parent_bus"):
                facts[prop] = await hv.execute(
                    "qom-get", {"path": "/machine/peripheral/net-hp0", "property": prop}
                )
            ip_link = ["ip", "-n", netns, "-o", "link"]
            links = await trio.run_process(ip_link, capture_stdout=True, check=True)
            facts["links"] = links.stdout.decode()
            with pytest.raises(UnplugTimeout, match="net-hp0"):
                await hv.remove_device(nic)
            await hv.stop_vm()
        finally:
            with trio.CancelScope(shield=True):
                await hv.cleanup()

    try:
        trio.run(main)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    assert facts["info"].pci_path == "1b/00"
    assert facts["netdev"] == "netdev-hp0" and facts["mac"] == "02:00:00:00:00:09"
    assert facts["parent_bus"] == "/machine/peripheral/rp0/rp0"
    port = find_device(facts["pci"][0]["devices"], "rp0")
    assert port is not None and find_device(port["pci_bridge"]["devices"], "net-hp0") is not None
    assert "tap0_kata" in facts["links"]  # the tap QEMU holds lives in the pod's netns


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("losetup") is None, reason="needs root and losetup (a loop device)"
)
def test_real_qemu_hot_adds_a_host_block_device_with_the_host_device_driver(
    tmp_path: Path, root: Path
) -> None:
    """A container's block device (`ctr run --device /dev/loopN`) is a host block device: QEMU 7.2's "file"
    driver refuses it ("requires ... to be a regular file"); the back-end opens it with host_device."""
    image = tmp_path / "raw.img"
    image.write_bytes(b"\0" * (4 << 20))
    done = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True)
    loop = Path(done.stdout.strip())
    hv = Qemu(tcg_config(tmp_path, virtiofs=False), state_root=root, open_vsock=None)
    facts: dict[str, Any] = {}

    async def main() -> None:
        try:
            await hv.prepare_vm("sb1", None)
            await hv.start_vm(60)
            facts["info"] = await hv.add_device(BlockDevice(loop, device_id="c1:/dev/xvdb"))
            facts["nodes"] = await hv.execute("query-named-block-nodes")
            await hv.stop_vm()
        finally:
            with trio.CancelScope(shield=True):
                await hv.cleanup()

    try:
        trio.run(main)
    finally:
        subprocess.run(["losetup", "-d", str(loop)], check=False)
    assert facts["info"].pci_path == "1b/00"
    drivers = {n.get("node-name"): n.get("drv") for n in facts["nodes"]}
    assert drivers["drive-hp0"] == "raw" and "host_device" in drivers.values()


def test_real_qemu_takes_a_disk_not_to_be_reached_through_a_symlink_as_an_fd_set(
    tmp_path: Path, root: Path
) -> None:
    """A blockfile snapshot (a regular file, `BlockDevice.follow_symlinks` False): QEMU 7.2 opens the fd
    the shim passed with ``add-fd`` (``/dev/fdset/N``, cache direct) and drops the set when asked."""
    image = tmp_path / "snapshot"
    image.write_bytes(b"\0" * (4 << 20))
    hv = Qemu(tcg_config(tmp_path, virtiofs=False), state_root=root, open_vsock=None)
    facts: dict[str, Any] = {}

    async def main() -> None:
        try:
            await hv.prepare_vm("sb1", None)
            await hv.start_vm(60)
            disk = BlockDevice(image, device_id="c1:rootfs", follow_symlinks=False)
            facts["info"] = await hv.add_device(disk)
            facts["nodes"] = await hv.execute("query-named-block-nodes")
            facts["fdsets"] = await hv.execute("query-fdsets")
            await hv.stop_vm()
        finally:
            with trio.CancelScope(shield=True):
                await hv.cleanup()

    trio.run(main)
    assert facts["info"].pci_path == "1b/00"
    files = {n.get("node-name"): n.get("file") for n in facts["nodes"]}
    assert files["drive-hp0"] == "/dev/fdset/0"
    assert [s["fdset-id"] for s in facts["fdsets"]] == [0]
    assert [f["opaque"] for f in facts["fdsets"][0]["fds"]] == ["drive-hp0"]


NIC_CHECK = """\
port=/sys/bus/pci/devices/0000:00:1b.0
echo NIC-READY
i=0
while [ -z "$(ls $port/0000:*:00.0/virtio*/net 2>/dev/null)" ] && [ $i -lt 1500 ]; do
    sleep 0.2; i=$((i + 1))
done
for n in $port/0000:*:00.0/virtio*/net/*; do
    echo "NIC-SEEN ${n##*/} $(cat "$n/address")"
done
i=0
while [ $i -lt 1500 ]; do sleep 0.2; i=$((i + 1)); done  # the host stops the VM
"""


@ROOT
@pytest.mark.guest_assets
def test_real_guest_under_tcg_sees_a_hot_plugged_nic_at_its_pci_path_with_its_mac(
    tmp_path: Path, root: Path
) -> None:
    """A tap opened in the pod's netns, passed to QEMU by getfd, hot-added as virtio-net-pci on rp0: the
    Debian guest kernel finds the interface behind 0000:00:1b.0 with the MAC the shim gave."""
    if not (GUEST / "vmlinuz").is_file():
        pytest.fail(f"{GUEST}/vmlinuz missing: build the guest assets (./dev nox -s images)", pytrace=False)
    share = tmp_path / "shared"
    share.mkdir()
    (share / "check.sh").write_text(NIC_CHECK)
    config = HypervisorConfig(
        path=str(QEMU),
        kernel=GUEST / "vmlinuz",
        initrd=GUEST / "initrd-test.img",
        image=GUEST / "rootfs-sandbox.ext4",
        default_memory=512,
        machine_accelerators="accel=tcg",
        shared_fs="virtio-fs",
        virtio_fs_daemon=VIRTIOFSD,
        kernel_params="lab.virtiofs=kataShared lab.run=/mnt/kataShared/check.sh",
    )
    netns = f"kqhn-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    hv = Qemu(config, state_root=root, open_vsock=None)
    facts: dict[str, Any] = {}

    async def main() -> None:
        try:
            await hv.prepare_vm("sb1", netns)
            await hv.add_device(ShareFsDevice(share))
            await hv.start_vm(60)
            await console_says(hv, "NIC-READY")
            facts["info"] = await hv.add_device(NetworkDevice("tap0_kata", "02:00:00:00:00:2a"))
            await console_says(hv, "NIC-SEEN")
            await hv.stop_vm()
        finally:
            with trio.CancelScope(shield=True):
                await hv.cleanup()

    try:
        trio.run(main)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    console = hv.console_tail()
    assert facts["info"].pci_path == "1b/00"
    assert "NIC-SEEN eth0 02:00:00:00:00:2a" in console, console
