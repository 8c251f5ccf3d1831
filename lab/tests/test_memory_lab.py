"""Guest memory after boot on kata-vmm (issue 17): virtio-mem plugs memory into a running guest, the balloon
takes some back. kata-vmm runs in process (as the shim's dragonball back-end runs it) and boots
initrd-test.img, whose init loads the stock kernel's virtio_mem and virtio_balloon modules; the guest onlines
hot-plugged memory by itself (`memhp_default_state=online`, as the shim passes it). No upcall: the devices
are cold-plugged, only their sizes change.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from framework import GuestAssets, initrd_with_files

from kata_vmm import BalloonSpec, ExitKind, VmConfig, Vmm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_upcall_lab import _Console, _field

SCRIPTS = Path(__file__).resolve().parent / "scripts"
PLUG_MIB, BALLOON_MIB = 256, 128
# eventually-waits under nested TCG (the guest onlines 2 MiB blocks one at a time): generous, not timed
EVENTUALLY = 300


def _until(what: str, done: Callable[[], bool], vmm: Vmm, console: _Console) -> None:
    end = time.monotonic() + EVENTUALLY
    while not done():
        ended = vmm.wait(timeout=0)
        assert ended is None, f"guest ended ({ended}) before {what}:\n{console.text[-3000:]}"
        assert time.monotonic() < end, f"no {what} within {EVENTUALLY} s:\n{console.text[-3000:]}"
        time.sleep(0.5)


@pytest.mark.lab
def test_virtio_mem_grows_a_running_guest_and_the_balloon_takes_memory_back(
    guest_assets: GuestAssets, tmp_path: Path
) -> None:
    initrd = initrd_with_files(
        guest_assets.initrd_test,
        {"/lab/run.sh": (SCRIPTS / "memory_hotplug_guest.sh").read_text()},
        tmp_path / "initrd",
    )
    console = _Console()
    config = VmConfig(
        kernel=guest_assets.kernel,
        initrd=initrd,
        cmdline="console=ttyS0 quiet panic=-1 memhp_default_state=online lab.run=/lab/run.sh",
        memory_mib=512,
        memory_hotplug_mib=512,
        console_output=console.write,
        devices=[BalloonSpec(stats_interval=1.0)],
    )
    vmm = Vmm()
    try:
        vmm.configure(config)
        vmm.start()
        console.wait_for("^MEM-READY", vmm, timeout=EVENTUALLY)
        assert vmm.hotplug_memory().plugged_mib == 0
        vmm.set_hotplug_memory(PLUG_MIB)
        _until("the plug", lambda: vmm.hotplug_memory().plugged_mib == PLUG_MIB, vmm, console)
        console.wait_for("^MEM-PLUGGED ", vmm, timeout=EVENTUALLY)
        vmm.set_balloon(BALLOON_MIB)
        _until("the inflate", lambda: vmm.balloon().actual_mib == BALLOON_MIB, vmm, console)
        console.wait_for("^MEM-BALLOONED ", vmm, timeout=EVENTUALLY)
        stats = vmm.balloon().stats
        console.wait_for("^MEM-DMESG|^lab-init:", vmm, timeout=EVENTUALLY)
        ended = vmm.wait(timeout=120)
        assert ended is not None and ended.kind is ExitKind.POWER_OFF, (ended, console.text[-3000:])
    finally:
        vmm.close()
    text = console.text
    print(text[-4000:])
    assert _field(text, "MEM-DRIVERS") == "2"
    before = int(_field(text, "MEM-BEFORE").split()[0])
    plugged = int(_field(text, "MEM-PLUGGED").split()[0])
    ballooned_total, ballooned_free = map(int, _field(text, "MEM-BALLOONED").split())
    # all 256 MiB plugged and online (a little of it goes to the new memory's own page structures)
    assert 240 * 1024 <= plugged - before <= PLUG_MIB * 1024, (before, plugged)
    # the inflated pages leave the guest's managed memory (no deflate-on-OOM)
    assert plugged - ballooned_total == BALLOON_MIB * 1024, (plugged, ballooned_total)
    assert ballooned_free < ballooned_total
    assert stats.get("free_memory", 0) > 0, stats  # the guest's statistics reached the host
    assert _field(text, "MEM-OOPS") == "0"
