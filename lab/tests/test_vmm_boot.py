"""kata-vmm boots the stock Debian kernel inside the nested-KVM lab VM (marked ``lab``).

Each test asks the lab VM (``lab/labvm exec``) to run one scenario of this same file's ``__main__``
harness, which drives ``kata-vmm run`` interactively there (waiting for a prompt before typing on the
serial console) and prints one JSON line the test then checks.  Guest boots under nested TCG take tens
of seconds, so the scenarios share boots where they can.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUEST = REPO / "build/lab/guest"
KERNEL = Path(os.environ.get("KATA_LAB_KERNEL", GUEST / "vmlinuz"))
INITRD = Path(os.environ.get("KATA_LAB_INITRD", GUEST / "initrd-test.img"))
LABVM = REPO / "lab/labvm"
# The interpreter running the tests (the nox tests venv under `nox -s lab`) has kata-vmm installed.
PYTHON = Path(sys.executable)
KATA_VMM = PYTHON.parent / "kata-vmm"
MARKER = "KATA-LAB-GUEST-OK"

pytestmark = pytest.mark.lab

INTROSPECT_INIT = """#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "KATA-CPUS=$(cat /sys/devices/system/cpu/online) $(grep -c ^processor /proc/cpuinfo)"
echo "KATA-$(grep MemTotal /proc/meminfo | tr -s ' ')"
echo "KATA-WAITING-INPUT"
read line
echo "KATA-GOT=$line"
echo KATA-LAB-GUEST-OK
poweroff -f
"""


VIRTIO_RNG_INIT = """#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_mmio virtio-rng; do insmod /lib/$m.ko; done
for d in /sys/bus/virtio/devices/*; do echo "KATA-VIRTIO $(basename $d) device=$(cat $d/device)"; done
echo "KATA-RNG-CURRENT=$(cat /sys/class/misc/hw_random/rng_current)"
echo "KATA-RNG-BYTES=$(head -c 16 /dev/hwrng | od -An -tx1 | tr -d ' \\n')"
echo KATA-LAB-GUEST-OK
poweroff -f
"""
MODULES = ("virtio_ring", "virtio", "virtio_mmio", "virtio-rng")


# --- host side ---------------------------------------------------------------------------------------------
def in_lab(scenario: str, timeout: float = 900) -> dict[str, object]:
    result = subprocess.run(
        [str(LABVM), "exec", "--", str(PYTHON), str(Path(__file__).resolve()), scenario],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result from the lab VM (exit {result.returncode}): {result.stderr[-3000:]}"
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def test_debian_kernel_prints_marker_and_powers_off() -> None:
    r = in_lab("marker")
    assert MARKER in str(r["stdout"]), r
    assert r["returncode"] == 0, r
    stderr_lines = str(r["stderr"]).splitlines()
    assert [line for line in stderr_lines if not line.startswith("{")] == [], r  # only the --stats line
    stats = json.loads(stderr_lines[-1])
    assert stats["exits"]["io"] > 0


def test_guest_sees_two_cpus_512_mib_and_serial_input() -> None:
    r = in_lab("introspect")
    out = str(r["stdout"])
    assert r["returncode"] == 0, r
    assert "KATA-CPUS=0-1 2" in out, out
    mem_kib = int(re.search(r"KATA-MemTotal: (\d+) kB", out).group(1))  # type: ignore[union-attr]
    assert 450 * 1024 < mem_kib <= 512 * 1024, out
    assert "KATA-GOT=hello from the host" in out, out
    assert MARKER in out


def test_virtio_mmio_device_in_the_dsdt_is_found_and_used_by_the_stock_kernel() -> None:
    # the DSDT's LNRO0005 slots are how Debian kernels find virtio-mmio devices: a kata-virtio rng proves it
    r = in_lab("virtio-rng")
    out = str(r["stdout"])
    assert r["exit"] == "power-off", r
    assert "KATA-VIRTIO virtio0 device=0x0004" in out, out
    assert "KATA-RNG-CURRENT=virtio_rng.0" in out, out
    random_hex = re.search(r"KATA-RNG-BYTES=([0-9a-f]{32})", out)
    assert random_hex is not None and random_hex.group(1) != "0" * 32, out
    assert int(str(r["mmio_exits"])) > 10, r  # probe, feature negotiation, queue set-up and notifies


def test_triple_fault_ends_with_exit_one_and_message() -> None:
    r = in_lab("triple-fault")
    assert r["returncode"] == 1, r
    assert "triple fault" in str(r["stderr"]), r
    assert str(r["stderr"]).count("\n") == 1, r


def test_hung_guest_times_out_with_exit_124() -> None:
    r = in_lab("hang")
    assert r["returncode"] == 124, r
    assert "did not power off within" in str(r["stderr"]), r


# --- lab-VM side -------------------------------------------------------------------------------------------
def _drive(
    command: list[str], *, prompt: str | None = None, reply: bytes = b"", timeout: float = 600
) -> dict:
    """Run ``command``; when ``prompt`` appears on stdout, type ``reply``; collect everything until exit."""
    start = time.monotonic()
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin and proc.stdout and proc.stderr
    out = bytearray()
    marker_at = None
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() - start < timeout:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if not ready:
            continue
        chunk = proc.stdout.read()
        if not chunk:
            break
        out += chunk
        if marker_at is None and MARKER.encode() in out:
            marker_at = time.monotonic() - start
        if prompt and prompt.encode() in out:
            prompt = None
            time.sleep(0.5)  # let the shell reach its read
            proc.stdin.write(reply)
            proc.stdin.flush()
    else:
        proc.kill()
    proc.wait()
    return {
        "returncode": proc.returncode,
        "stdout": out.decode(errors="replace"),
        "stderr": proc.stderr.read().decode(errors="replace"),
        "seconds": time.monotonic() - start,
        "marker_seconds": marker_at,
    }


def _kata(kernel: Path, initrd: Path | None, *extra: str) -> list[str]:
    cmd = [str(KATA_VMM), "run", "--kernel", str(kernel), "--vcpus", "2", "--memory", "512"]
    if initrd is not None:
        cmd += ["--initrd", str(initrd)]
    return cmd + list(extra)


def _scenario(name: str) -> dict:
    from kata_vmm import testing as tk

    work = Path(tempfile.mkdtemp(prefix="kata-vmm-lab-"))
    if name == "marker":
        return _drive(
            _kata(KERNEL, INITRD, "--cmdline", "console=ttyS0 quiet", "--timeout", "300", "--stats")
        )
    if name == "introspect":
        initrd = work / "introspect.cpio"
        initrd.write_bytes(tk.busybox_initramfs(INTROSPECT_INIT, Path("/bin/busybox").read_bytes()))
        command = _kata(KERNEL, initrd, "--cmdline", "console=ttyS0 quiet", "--timeout", "300")
        return _drive(command, prompt="KATA-WAITING-INPUT", reply=b"hello from the host\n")
    if name == "virtio-rng":
        return _virtio_rng(work)
    if name == "triple-fault":
        kernel = work / "ud2.bzImage"
        kernel.write_bytes(tk.tiny_bzimage(tk.UD2))
        return _drive(_kata(kernel, None, "--timeout", "60"))
    if name == "hang":
        kernel = work / "spin.bzImage"
        kernel.write_bytes(tk.tiny_bzimage(tk.spin_forever()))
        return _drive(_kata(kernel, None, "--timeout", "5"))
    raise SystemExit(f"unknown scenario {name}")


def busybox_initrd_with_modules(init: str, modules: tuple[str, ...], initrd: Path) -> Path:
    """Write ``initrd``: a busybox initramfs running ``init``, plus the guest kernel's ``modules`` (names
    without .ko) in /lib. Also test_vmm_snapshot_lab's."""
    from kata_vmm import testing as tk

    tree = next((GUEST / "modules/lib/modules").iterdir())
    entries = [
        (f"lib/{m}.ko", tk.S_IFREG | 0o644, next(tree.rglob(f"{m}.ko")).read_bytes(), (0, 0)) for m in modules
    ]
    base = tk.busybox_initramfs(init, Path("/bin/busybox").read_bytes())
    # concatenated cpio archives unpack in order: the base image, then /lib with the modules
    initrd.write_bytes(base + tk.cpio_newc([("lib", tk.S_IFDIR | 0o755, b"", (0, 0)), *entries]))
    return initrd


def _virtio_rng(work: Path) -> dict:
    from kata_virtio import MmioTransport, VirtioRng
    from kata_vmm import VmConfig, Vmm

    initrd = busybox_initrd_with_modules(VIRTIO_RNG_INIT, MODULES, work / "virtio-rng.cpio")
    out: list[bytes] = []
    vmm = Vmm()
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
        vmm.add_device(lambda memory, irq, slot: MmioTransport(VirtioRng(), memory, irq))
        vmm.start()
        status = vmm.wait(300)
        stats = vmm.statistics()
    finally:
        vmm.close()
    return {
        "exit": status.kind.value if status else "timeout",
        "stdout": b"".join(out).decode(errors="replace"),
        "mmio_exits": stats.exits.get("mmio", 0),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    print(json.dumps(_scenario(parser.parse_args().scenario)))
    sys.exit(0)
