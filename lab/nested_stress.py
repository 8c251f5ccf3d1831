#!/usr/bin/env python3
"""Stress the lab VM's nested virtualization: kata-vmm boots, over and over, a 2-vCPU 512 MiB guest that
writes 900 MiB to its RAM disk, then powers off (numbers for lab/README.md, "The lab VM's own failures").

    lab/labvm exec -- .nox/tests/bin/python lab/nested_stress.py --seconds 900
    LAB_APPEND=kvm_amd.vgif=1 lab/labvm exec -- .nox/tests/bin/python lab/nested_stress.py   # the old way

One line per boot (ok, seconds), a heartbeat line every 30 s (a lab VM whose own kernel froze stops
printing them), and on a nested guest that does not power off within --hang seconds: the lab kernel's KVM
exits for two seconds (tracefs) and the guest console's tail, then exit 3. Exit 0 when every boot passed.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNEL = REPO / "build/lab/guest/vmlinuz"
INIT = """#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
for i in 1 2 3; do dd if=/dev/zero of=/big bs=1M count=300 2>/dev/null; rm /big; done
echo STRESS-OK
poweroff -f
"""
TRACEFS = Path("/sys/kernel/tracing")
KVM_EVENTS = (
    "kvm_exit",
    "kvm_entry",
    "kvm_page_fault",
    "kvm_inj_virq",
    "kvm_inj_exception",
    "kvm_userspace_exit",
)


def say(text: str) -> None:
    print(text, flush=True)


def heartbeat() -> None:
    while True:
        time.sleep(30)
        say(f"alive {time.strftime('%H:%M:%S')} load {Path('/proc/loadavg').read_text().split()[:3]}")


def kvm_exits(seconds: float) -> tuple[list[str], collections.Counter[str]]:
    """The lab kernel's KVM trace for `seconds`: its lines and a count of exit reasons."""
    if not (TRACEFS / "trace").exists():
        subprocess.run(["mount", "-t", "tracefs", "tracefs", str(TRACEFS)], check=False)
    for event in KVM_EVENTS:
        (TRACEFS / "events" / "kvm" / event / "enable").write_text("1")
    (TRACEFS / "trace").write_text("")
    (TRACEFS / "tracing_on").write_text("1")
    time.sleep(seconds)
    (TRACEFS / "tracing_on").write_text("0")
    lines = [line for line in (TRACEFS / "trace").read_text().splitlines() if not line.startswith("#")]
    reasons = collections.Counter(
        line.split("reason ")[1].split()[0] for line in lines if "kvm_exit:" in line and "reason " in line
    )
    return lines, reasons


def main() -> int:
    from kata_vmm import VmConfig, Vmm
    from kata_vmm import testing as tk

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=900, help="how long to keep booting (default 900)")
    parser.add_argument("--hang", type=float, default=60, help="seconds a boot may take (default 60)")
    args = parser.parse_args()
    say(f"lab kernel: {Path('/proc/cmdline').read_text().strip()}")
    params = Path("/sys/module/kvm_amd/parameters")
    shown = " ".join(f"{p}={(params / p).read_text().strip()}" for p in ("npt", "vgif", "vls", "avic"))
    say(f"kvm_amd: {shown}")
    threading.Thread(target=heartbeat, daemon=True).start()
    work = Path(tempfile.mkdtemp(prefix="nested-stress-"))
    initrd = work / "stress.cpio"
    initrd.write_bytes(tk.busybox_initramfs(INIT, Path("/bin/busybox").read_bytes()))
    start = time.monotonic()
    boots = 0
    while time.monotonic() - start < args.seconds:
        out: list[bytes] = []
        vmm = Vmm()
        began = time.monotonic()
        try:
            vmm.configure(
                VmConfig(
                    kernel=KERNEL,
                    initrd=initrd,
                    vcpus=2,
                    memory_mib=512,
                    cmdline="console=ttyS0 quiet",
                    console_output=out.append,
                )
            )
            vmm.start()
            status = vmm.wait(args.hang)
            if status is None:
                lines, reasons = kvm_exits(2.0)
                exits = reasons.most_common(8)
                say(f"HANG in boot {boots + 1}: {len(lines)} KVM trace lines in 2 s, exits {exits}")
                for line in lines[:40]:
                    say(f"  {line.strip()}")
                say(f"console tail: {b''.join(out)[-1500:].decode(errors='replace')!r}")
                return 3
        finally:
            vmm.close()
        boots += 1
        passed = b"STRESS-OK" in b"".join(out)
        verdict = "ok" if passed else f"FAILED ({status.kind.value}, vCPU {status.vcpu}: {status.detail})"
        say(f"boot {boots} {verdict} {time.monotonic() - began:.1f} s")
        if not passed:
            say(f"console tail: {b''.join(out)[-1500:].decode(errors='replace')!r}")
            return 1
    say(f"{boots} boots in {time.monotonic() - start:.0f} s, all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
