"""The external back-end (hypervisor_name = "qemu") on the real guest inside the lab VM: QEMU with KVM
(nested), Debian's virtiofsd, vhost-vsock with a CID from /dev/vhost-vsock, the agent over AF_VSOCK.

1. The back-end alone: the test initrd runs a script from the share and powers off.
2. `ctr run --rm` busybox through containerd with upstream's configuration-qemu-runtime-rs.toml (asset
   paths substituted; the lab's needs in a config.d drop-in, passed as `--runtime-config-path`): SIGKILL of
   QEMU or of virtiofsd ends `ctr run` and leaves nothing. (A plain `ctr run --rm` on qemu, and the whole
   shim suite, is test_shim_qemu_lab.py's.)
3. Hot-plug over QMP (q35's PCIe root ports): a raw block device (`ctr run --device`) found by the agent at
   its PCI path and unplugged by the guest's eject; vCPUs added and removed (ACPI) as Task.Update resizes.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest
from framework import GuestAssets
from framework.configs import VIRTIOFSD, qemu_config
from framework.containerd import (
    BUSYBOX_IMAGE,
    KATA_RUNTIME,
    KATA_STATE_ROOT,
    PrivateContainerd,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_hotplug_shim_lab
from test_hotplug_shim_lab import eventually, in_task, kill_and_delete, task_update

loop_disk = test_hotplug_shim_lab.loop_disk  # the fixture, shared

RUN_TIMEOUT = 600
GUEST_CHECK = """\
echo "vda ro=$(cat /sys/block/vda/ro)"
echo "vsock=$(test -c /dev/vsock && echo yes)"
echo "pci=$(ls /sys/bus/pci/devices | wc -l)"
echo from-the-guest > /mnt/kataShared/written
"""


@pytest.mark.lab
def test_qemu_boots_the_guest_with_virtiofsd_and_vsock_and_notices_the_power_off(tmp_path: Path) -> None:
    import trio

    from kata_shim.hypervisor import HypervisorConfig, ShareFsDevice
    from kata_shim.hypervisor._qemu import Qemu

    assets = GuestAssets()
    config = HypervisorConfig(
        path="/usr/bin/qemu-system-x86_64",
        kernel=assets.kernel,
        initrd=assets.initrd_test,
        image=assets.rootfs_sandbox,
        default_memory=512,
        shared_fs="virtio-fs",
        virtio_fs_daemon=VIRTIOFSD,
        kernel_params="lab.virtiofs=kataShared lab.run=/mnt/kataShared/check.sh",
    )
    state_root = Path(tempfile.mkdtemp(prefix="kqm-", dir="/tmp"))
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "check.sh").write_text(GUEST_CHECK)
    hv = Qemu(config, state_root=state_root)
    facts: dict[str, object] = {}

    async def main() -> int:
        await hv.prepare_vm("qboot1", None)
        await hv.add_device(ShareFsDevice(shared))
        t0 = time.monotonic()
        try:
            await hv.start_vm(60)
            facts["start_vm"] = time.monotonic() - t0
            facts["pids"] = hv.pids()
            facts["cid"] = hv.cid
            with trio.fail_after(400):
                return await hv.wait_vm()
        finally:
            facts["power_off"] = time.monotonic() - t0
            await hv.cleanup()

    code = trio.run(main)
    console = hv.console_tail()
    print(f"qemu test guest: {facts}\n{console}")
    assert code == 0, hv.exit_reason()
    assert len(facts["pids"]) == 2  # type: ignore[arg-type]
    assert "vda ro=1" in console
    assert "vsock=yes" in console
    assert "check.sh exited 0" in console
    assert (shared / "written").read_text() == "from-the-guest\n"
    assert sorted(p.name for p in (state_root / "qboot1").iterdir()) == ["state.json"]


def _assert_nothing_left(ctrd: PrivateContainerd, timeout: float = 60) -> None:
    """No shim, no /run/kata state, no qemu and no virtiofsd (containerd cleans up asynchronously)."""
    end = time.monotonic() + timeout
    while True:
        left = {
            "shims": ctrd.shim_pids(),
            "state": sorted(p.name for p in KATA_STATE_ROOT.iterdir()) if KATA_STATE_ROOT.exists() else [],
            "qemu": _processes("qemu-system-x86_64") + _processes("virtiofsd"),
        }
        if not any(left.values()) or time.monotonic() > end:
            break
        time.sleep(0.5)
    assert not any(left.values()), f"left behind {left}\n{ctrd.log_tail()}"


@pytest.mark.lab
@pytest.mark.parametrize("victim", ["qemu-system-x86_64", "virtiofsd"])
def test_killing_qemu_or_virtiofsd_ends_ctr_run_and_leaves_nothing(
    ctrd: PrivateContainerd, tmp_path: Path, victim: str
) -> None:
    """Issue 15's acceptance: SIGKILL to QEMU (or to virtiofsd) while a container runs: ctr returns with an
    error within 60 s, and neither the other process nor the shim is left after containerd's cleanup."""
    path = qemu_config(tmp_path)
    name = f"qkill-{victim[:4]}"
    ctr = ctrd.popen_ctr(
        "run", "--rm", "--runtime", KATA_RUNTIME, "--runtime-config-path", str(path),
        BUSYBOX_IMAGE, name, "sh", "-c", "echo running; sleep 1000",
    )  # fmt: skip
    try:
        assert ctr.stdout is not None
        line = ctr.stdout.readline()  # the container runs once it printed
        assert line == b"running\n", line + (ctr.stdout.read() if ctr.poll() is not None else b"")
        pids = _processes(victim)
        # the one the shim started (virtiofsd's sandbox mode forks a child of its own)
        started = [p for p in pids if _ppid(p) not in pids]
        assert len(started) == 1, pids
        os.kill(started[0], signal.SIGKILL)
        t0 = time.monotonic()
        code = ctr.wait(timeout=120)
        wall = time.monotonic() - t0
        print(f"SIGKILL {victim}: ctr run returned {code} after {wall:.1f} s")
        assert code != 0 and wall < 60, (code, wall, ctrd.log_tail(100))
    finally:
        if ctr.poll() is None:
            ctr.kill()
            ctr.wait()
    _assert_nothing_left(ctrd)


def _ppid(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def _processes(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if argv0.endswith(name.encode()):
                found.append(int(entry.name))
    return found


@pytest.mark.lab
def test_qemu_hot_plugs_a_raw_block_device_at_its_pci_path_and_unplugs_it(
    ctrd: PrivateContainerd, tmp_path: Path, loop_disk: str
) -> None:
    """ctr run --device /dev/loopN with qemu: blockdev-add (host_device) + device_add virtio-blk-pci on
    root port rp0; the agent finds it at PCI path 1b/00 through sysfs; device_del is acked by the guest."""
    path = qemu_config(tmp_path)
    done = ctrd.ctr(
        "run", "--rm", "--runtime", KATA_RUNTIME, "--runtime-config-path", str(path), "--device", loop_disk,
        BUSYBOX_IMAGE, "qblk1", "sh", "-c", f"head -n 1 {loop_disk}; ls -l {loop_disk}",
        timeout=RUN_TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{ctrd.log_tail(150)}"
    lines = done.stdout.splitlines()
    assert lines[0] == "kata-raw-volume" and lines[1].startswith("b"), done.stdout
    log = ctrd.log()
    assert "is 1b/00 in the guest" in log, ctrd.log_tail(100)  # virt_container/_devices.py
    assert "hot-added BlockDevice" in log and "removed BlockDevice" in log  # _qemu.py: DEVICE_DELETED came
    _assert_nothing_left(ctrd)


@pytest.mark.lab
def test_qemu_grows_and_shrinks_the_vm_by_acpi_vcpu_hotplug(ctrd: PrivateContainerd, tmp_path: Path) -> None:
    """Dynamic sizing on qemu: --cpus 2 grows a 1-vCPU VM (query-hotpluggable-cpus + device_add, the agent
    onlines it); Task.Update back to one CPU removes it (device_del, the guest's ACPI eject)."""
    path = qemu_config(tmp_path)
    (tmp_path / "config.d" / "60-dynamic.toml").write_text(
        "[runtime]\nstatic_sandbox_resource_mgmt = false\n[hypervisor.qemu]\ndefault_maxvcpus = 2\n"
    )
    cid = "qhp1"
    done = ctrd.ctr(
        "run", "-d", "--runtime", KATA_RUNTIME, "--runtime-config-path", str(path), "--cpus", "2",
        BUSYBOX_IMAGE, cid, "sleep", "3600", timeout=RUN_TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stderr}\n{ctrd.log_tail(150)}"
    try:
        assert in_task(ctrd, cid, "nproc; cat /sys/devices/system/cpu/online").split() == ["2", "0-1"]
        task_update(ctrd, cid, {"cpu": {"quota": 100000, "period": 100000}})
        eventually(lambda: in_task(ctrd, cid, "nproc").split() == ["1"], "the guest back at 1 CPU")
        log = ctrd.log()
        assert f"vCPUs 1 -> 2 (container {cid})" in log and f"vCPUs 2 -> 1 (container {cid})" in log
    finally:
        kill_and_delete(ctrd, cid)
    _assert_nothing_left(ctrd)
