"""Boot-to-marker benchmark inside the lab VM: kata-vmm against qemu-system-x86_64 -enable-kvm.

Both boot the same kernel, initrd, memory, vCPU count and command line (``quiet``), alternating runs.
It prints every run (seconds to the marker, peak RSS), the medians and their ratio as one JSON line; it
gates on nothing but every run reaching the marker (exit 1 otherwise). `nox -s bench` runs it inside the
lab VM with 5 runs; by hand::

    lab/labvm exec -- .nox/tests/bin/python lab/bench/vmm_boot.py --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GUEST = REPO / "build/lab/guest"
KERNEL = GUEST / "vmlinuz"
INITRD = GUEST / "initrd-test.img"
MARKER = b"KATA-LAB-GUEST-OK"
CMDLINE = "console=ttyS0 quiet"
KATA_VMM = Path(sys.executable).parent / "kata-vmm"


def kata_vmm_command(vcpus: int, memory: int, kernel: Path | None = None) -> list[str]:
    return [
        str(KATA_VMM), "run", "--kernel", str(kernel or KERNEL), "--initrd", str(INITRD), "--timeout", "300",
        "--vcpus", str(vcpus), "--memory", str(memory), "--cmdline", CMDLINE, "--stats",
    ]  # fmt: skip


def qemu_command(machine: str, vcpus: int, memory: int, kernel: Path | None = None) -> list[str]:
    # -no-reboot: a guest reboot ends QEMU too, like kata-vmm; microvm powers off through ACPI GED
    return [
        "qemu-system-x86_64", "-enable-kvm", "-cpu", "host", "-M", machine, "-smp", str(vcpus),
        "-m", str(memory), "-kernel", str(kernel or KERNEL), "-initrd", str(INITRD), "-append", CMDLINE,
        "-nographic", "-nodefaults", "-no-user-config", "-serial", "stdio", "-no-reboot",
    ]  # fmt: skip


def time_boot(command: list[str], timeout: float = 300) -> dict[str, object]:
    """Run ``command`` until it exits; seconds from spawn to the marker line, exit status, peak RSS (KiB)."""
    start = time.monotonic()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    marker_at = None
    deadline = start + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            chunk = proc.stdout.read()
            if not chunk:
                break
            out += chunk
            if marker_at is None and MARKER in out:
                marker_at = time.monotonic() - start
    else:
        proc.kill()
    _pid, status, usage = os.wait4(proc.pid, 0)
    total = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    stats = None
    for line in err.splitlines():
        if line.startswith("{"):
            stats = json.loads(line)
    return run_record(
        marker_at,
        total,
        proc.returncode,
        usage.ru_maxrss,
        stats=stats,
        stderr=err[-2000:] if proc.returncode else "",
        console_tail=out[-300:].decode(errors="replace"),
    )


def run_record(
    marker_s: float | None,
    exit_s: float,
    returncode: int,
    max_rss_kib: int,
    *,
    stats: dict | None = None,
    stderr: str = "",
    console_tail: str = "",
) -> dict[str, object]:
    """One boot as the JSON line lists it (``marker_s`` None: the marker never came)."""
    return {
        "marker_s": marker_s,
        "exit_s": exit_s,
        "returncode": returncode,
        "max_rss_kib": max_rss_kib,
        "stats": stats,
        "stderr": stderr,
        "console_tail": console_tail,
    }


def bench(
    runs: int,
    vcpus: int = 2,
    memory: int = 512,
    machines: tuple[str, ...] = ("microvm",),
    vmlinux: Path | None = None,
) -> dict:
    peers = {"kata-vmm": kata_vmm_command(vcpus, memory)}
    for machine in machines:
        peers[f"qemu-{machine}"] = qemu_command(machine, vcpus, memory)
    if vmlinux is not None:  # the same kernel, uncompressed: both VMMs enter it through PVH
        peers["kata-vmm-pvh"] = kata_vmm_command(vcpus, memory, vmlinux)
        peers["qemu-q35-pvh"] = qemu_command("q35", vcpus, memory, vmlinux)
    results: dict[str, list[dict[str, object]]] = {name: [] for name in peers}
    for _ in range(runs):
        for name, command in peers.items():  # alternate, so drift hits every peer alike
            results[name].append(time_boot(command))
    return summarize(results, runs, vcpus, memory)


def summarize(results: dict[str, list[dict[str, object]]], runs: int, vcpus: int, memory: int) -> dict:
    """The JSON line: every run of each peer as `time_boot` returned it (the raw samples), medians, ratio."""
    summary: dict[str, object] = {"runs": runs, "vcpus": vcpus, "memory_mib": memory, "results": results}
    medians: dict[str, float] = {}
    for name, rs in results.items():
        times = [float(r["marker_s"]) for r in rs if isinstance(r["marker_s"], float)]
        if times:
            medians[name] = statistics.median(times)
    summary["median_marker_s"] = medians
    qemu_best = min((v for k, v in medians.items() if k.startswith("qemu")), default=None)
    if "kata-vmm" in medians and qemu_best:
        summary["ratio_kata_vs_best_qemu"] = medians["kata-vmm"] / qemu_best
    return summary


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vcpus", type=int, default=2)
    parser.add_argument("--memory", type=int, default=512)
    parser.add_argument("--machines", default="microvm", help="comma-separated QEMU machine types")
    parser.add_argument("--kernel", type=Path, default=KERNEL)
    parser.add_argument("--initrd", type=Path, default=INITRD)
    parser.add_argument(
        "--vmlinux", type=Path, help="also boot this uncompressed ELF of the same kernel (PVH)"
    )
    args = parser.parse_args()
    globals().update(KERNEL=args.kernel, INITRD=args.initrd)
    if shutil.which("qemu-system-x86_64") is None:
        print("qemu-system-x86_64 not found", file=sys.stderr)
        return 2
    summary = bench(args.runs, args.vcpus, args.memory, tuple(args.machines.split(",")), args.vmlinux)
    sys.stdout.write(json.dumps(summary) + "\n")
    failed = [
        (name, r)
        for name, rs in summary["results"].items()
        for r in rs
        if r["marker_s"] is None or r["returncode"] != 0
    ]
    for name, r in failed:
        print(f"{name}: run did not reach the marker or exit 0: {r}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
