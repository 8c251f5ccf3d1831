"""kata-vmm snapshot and restore with the stock Debian kernel inside the nested-KVM lab VM (marked ``lab``).

The guest (a busybox init with virtio-blk) counts in a shell variable (memory) and on its disk, prints
KATA-SNAPSHOT-NOW at count 5 and waits for a line on the console. ``kata-vmm run --snapshot-on`` snapshots it
there and stops; the disk image is copied once per clone (a disk's content is the caller's to keep); each
clone is ``kata-vmm restore``d with its own copy, gets its own line typed, and must count on from 6 to 40 in
memory and on disk, exactly as the other clone does. Same harness as ``test_vmm_boot.py``: the test asks the
lab VM to run this file's ``__main__`` and checks the JSON line it prints.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_vmm_boot import KATA_VMM, KERNEL, LABVM, PYTHON, _drive, busybox_initrd_with_modules

pytestmark = pytest.mark.lab

COUNT_INIT = """#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_mmio virtio_blk; do insmod /lib/$m.ko; done
disk() { dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n 1; }
n=0
while [ $n -lt 40 ]; do
  n=$((n + 1))
  echo $n | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null
  echo "KATA-COUNT $n disk=$(disk)"
  if [ $n -eq 5 ]; then
    echo "KATA-BOOT-ID $(cat /proc/sys/kernel/random/boot_id)"
    echo KATA-SNAPSHOT-NOW
    read line
    echo "KATA-GOT=$line"
    echo "KATA-RANDOM $(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' ')"
  fi
done
echo "KATA-DONE count=$n disk=$(disk)"
poweroff -f
"""
MODULES = ("virtio_ring", "virtio", "virtio_mmio", "virtio_blk")


# --- host side ---------------------------------------------------------------------------------------------
def test_guest_counting_in_memory_and_on_disk_restores_twice_from_the_same_state() -> None:
    result = subprocess.run(
        [str(LABVM), "exec", "--", str(PYTHON), str(Path(__file__).resolve()), "snapshot-restore"],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result from the lab VM (exit {result.returncode}): {result.stderr[-3000:]}"
    r = json.loads(lines[-1])
    origin = r["origin"]
    assert origin["returncode"] == 0, origin
    assert "KATA-COUNT 5 disk=5" in origin["stdout"] and "KATA-COUNT 6" not in origin["stdout"], origin
    assert "snapshot written to" in origin["stderr"], origin
    assert r["saved_disk"] == "5", r  # the snapshot's own disk image is never touched by a clone
    for name in ("a", "b"):
        clone = r[name]
        out = clone["stdout"]
        assert clone["returncode"] == 0, clone
        assert f"KATA-GOT=go-{name}" in out, clone
        counts = [int(c) for c in re.findall(r"KATA-COUNT (\d+) disk=\1\b", out)]
        assert counts == list(range(6, 41)), clone  # on from 6, memory and disk agreeing at every step
        assert "KATA-DONE count=40 disk=40" in out, clone
        assert "KATA-COUNT 5" not in out and "KATA-BOOT-ID" not in out, clone  # no reboot: continued
        assert r[f"disk_{name}"] == "40", r


# --- lab-VM side -------------------------------------------------------------------------------------------
def _run(command: list[str], stdin: bytes, timeout: float) -> dict[str, object]:
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        return {"returncode": "timeout", "stdout": str(err.stdout), "stderr": str(err.stderr)}
    return {
        "returncode": done.returncode,
        "stdout": done.stdout.decode(errors="replace"),
        "stderr": done.stderr.decode(errors="replace"),
    }


def _scenario() -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="kata-vmm-snap-"))
    initrd = busybox_initrd_with_modules(COUNT_INIT, MODULES, work / "count.cpio")
    disk = work / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    snap = work / "snap"
    run = [str(KATA_VMM), "run", "--kernel", str(KERNEL), "--initrd", str(initrd), "--vcpus", "2"]
    run += ["--memory", "512", "--cmdline", "console=ttyS0 quiet", "--timeout", "600", "--block", str(disk)]
    run += ["--snapshot-on", "KATA-SNAPSHOT-NOW", "--snapshot-dir", str(snap)]
    out: dict[str, object] = {"origin": _drive(run, timeout=900)}
    for name in ("a", "b"):
        copy = work / f"disk-{name}.img"
        shutil.copyfile(disk, copy)
        restore = [str(KATA_VMM), "restore", str(snap), "--timeout", "600", "--block", str(copy)]
        # the guest waits in `read` on the console: this clone's own line is typed as it resumes
        out[name] = _run(restore, f"go-{name}\n".encode(), timeout=900)
        out[f"disk_{name}"] = copy.read_bytes()[:512].split(b"\n")[0].decode(errors="replace")
    out["saved_disk"] = disk.read_bytes()[:512].split(b"\n")[0].decode(errors="replace")
    shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["snapshot-restore"])
    parser.parse_args()
    print(json.dumps(_scenario()))
    sys.exit(0)
