"""The qemu back-end with the REAL qemu-system-x86_64 (TCG: ``machine_accelerators = "accel=tcg"``, no
/dev/kvm needed) and, as root, Debian's real virtiofsd: QMP negotiation, query-status, vCPU thread ids,
pause/resume, the serial console (SeaBIOS's banner), stop and that nothing is left. The kernel is kata_vmm's
tiny bzImage (QEMU only checks it is one: SeaBIOS's real-mode hand-over does not reach it); no vsock (the
host has no /dev/vhost-vsock)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import trio

from kata_shim.hypervisor import HypervisorConfig, ShareFsDevice
from kata_shim.hypervisor._qemu import Qemu
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
