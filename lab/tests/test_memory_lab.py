"""Guest memory after boot on kata-vmm (issue 17): virtio-mem plugs memory into a running guest, the balloon
takes some back. kata-vmm runs in process (as the shim's dragonball back-end runs it) and boots
initrd-test.img, whose init loads the stock kernel's virtio_mem and virtio_balloon modules; the guest onlines
hot-plugged memory by itself (`memhp_default_state=online`, as the shim passes it). No upcall: the devices
are cold-plugged, only their sizes change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from framework import GuestAssets
from framework.inprocess import Console, boot_in_process

from kata_vmm import BalloonSpec, Vmm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_upcall_lab import _field

SCRIPTS = Path(__file__).resolve().parent / "scripts"
PLUG_MIB, BALLOON_MIB = 256, 128
# eventually-waits under nested TCG (the guest onlines 2 MiB blocks one at a time): generous, not timed
EVENTUALLY = 300


@pytest.mark.lab
def test_virtio_mem_grows_a_running_guest_and_the_balloon_takes_memory_back(
    guest_assets: GuestAssets, tmp_path: Path
) -> None:
    stats: dict[str, int] = {}

    def plug_then_balloon(vmm: Vmm, console: Console) -> None:
        assert vmm.hotplug_memory().plugged_mib == 0
        vmm.set_hotplug_memory(PLUG_MIB)
        console.wait_until("the plug", lambda: vmm.hotplug_memory().plugged_mib == PLUG_MIB, vmm, EVENTUALLY)
        console.wait_for("^MEM-PLUGGED ", vmm, timeout=EVENTUALLY)
        vmm.set_balloon(BALLOON_MIB)
        console.wait_until("the inflate", lambda: vmm.balloon().actual_mib == BALLOON_MIB, vmm, EVENTUALLY)
        console.wait_for("^MEM-BALLOONED ", vmm, timeout=EVENTUALLY)
        stats.update(vmm.balloon().stats)

    text = boot_in_process(
        guest_assets, tmp_path, {"/lab/run.sh": (SCRIPTS / "memory_hotplug_guest.sh").read_text()}, "MEM",
        plug_then_balloon, cmdline="memhp_default_state=online ", memory_mib=512, memory_hotplug_mib=512,
        devices=[BalloonSpec(stats_interval=1.0)],
    )  # fmt: skip
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
