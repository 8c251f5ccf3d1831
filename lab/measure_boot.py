#!/usr/bin/env python3
"""Boot times of the lab (numbers for lab/README.md): median of N runs.

    python3 lab/measure_boot.py labvm [--runs 5]     # on the host: `lab/labvm exec -- cat /proc/uptime`
    lab/labvm exec -- python3 lab/measure_boot.py guest [--runs 5]   # inside: qemu-kvm to KATA-LAB-GUEST-OK

labvm: wall seconds of a whole `labvm exec` (start to exit, including shutdown) and the lab VM's own
uptime when the command starts (guest clock, from kernel start). guest: seconds from spawning
qemu-system-x86_64 -enable-kvm (initrd-test.img, 1 vCPU, 512 MiB, quiet) to the marker, and to its exit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAB = Path(__file__).resolve().parent
sys.path.insert(0, str(LAB))


def measure_labvm(runs: int) -> dict[str, object]:
    walls, uptimes = [], []
    for _ in range(runs):
        start = time.monotonic()
        done = subprocess.run(
            [str(LAB / "labvm"), "exec", "--", "cat", "/proc/uptime"],
            capture_output=True,
            text=True,
            check=True,
        )
        walls.append(time.monotonic() - start)
        uptimes.append(float(done.stdout.split()[0]))
    return {
        "what": "labvm exec -- cat /proc/uptime",
        "wall_s": [round(w, 2) for w in walls],
        "wall_median_s": round(statistics.median(walls), 2),
        "guest_uptime_at_command_median_s": round(statistics.median(uptimes), 2),
    }


def measure_guest(runs: int) -> dict[str, object]:
    from framework import GuestAssets, GuestConfig, MicroVM, QemuBackend

    assets = GuestAssets()
    marker, total = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            config = GuestConfig(kernel=assets.kernel, initrd=assets.initrd_test)
            vm = MicroVM(QemuBackend(), config, Path(tmp), f"run{i}").spawn()
            try:
                marker.append(vm.wait_for_console("KATA-LAB-GUEST-OK", timeout=300))
                vm.wait_exit(60)
                total.append(time.monotonic() - vm.started_at)
            finally:
                vm.kill()
    return {
        "what": "qemu-system-x86_64 -enable-kvm, initrd-test.img, 1 vCPU, 512 MiB, quiet",
        "marker_s": [round(m, 2) for m in marker],
        "marker_median_s": round(statistics.median(marker), 2),
        "exit_median_s": round(statistics.median(total), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["labvm", "guest"])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    result = measure_labvm(args.runs) if args.what == "labvm" else measure_guest(args.runs)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
