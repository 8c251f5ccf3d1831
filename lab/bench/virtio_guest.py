"""Virtio throughput inside the lab VM, kata-vmm (virtio-mmio) against QEMU on the same inputs.

virtio-blk sequential read (QEMU: virtio-blk-pci), virtio-fs small-file stat+read (QEMU: vhost-user-fs-pci
with virtiofsd).

Both VMMs boot the same kernel and initrd-test.img with the same raw image as /dev/vda (read-only) and
run scripts/blk_read.sh, which reads the whole disk once to /dev/null (1 MiB requests, cold guest page
cache, warm host page cache) and prints the guest-side seconds. The test checks both read the same
bytes; it prints MB/s and the ratio and never gates on an absolute time.

A benchmark, not a test: `nox -s bench` runs it inside the lab VM
(`lab/labvm exec -- .nox/tests/bin/python -m pytest -s lab/bench/virtio_guest.py`); `nox -s lab` does
not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1]
if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))

from framework import (  # noqa: E402
    GuestAssets,
    GuestConfig,
    KataVmmBackend,
    MicroVMFactory,
    QemuBackend,
    in_labvm,
    initrd_with_files,
)

SCRIPTS = LAB / "tests" / "scripts"


# `nox -s bench` keeps this file's stdout in build/bench/virtio_guest.txt; lab/bench/report.py reads these
RESULT_PREFIX = "VIRTIO-BENCH "


def result_line(bench: str, unit: str, workload: str, results: dict[str, float]) -> str:
    """One machine-readable line: the rate each VMM reached (one run each), keyed by back-end name."""
    record = {
        "bench": bench,
        "unit": unit,
        "workload": workload,
        "samples": {k: [v] for k, v in results.items()},
    }
    return RESULT_PREFIX + json.dumps(record)


@pytest.fixture(autouse=True)
def _inside_lab() -> None:
    if not in_labvm():
        pytest.fail(
            "run inside the lab VM: "
            "lab/labvm exec -- .nox/tests/bin/python -m pytest -s lab/bench/virtio_guest.py"
        )


@pytest.fixture
def guest_assets() -> GuestAssets:
    return GuestAssets()


IMAGE_MIB = int(os.environ.get("KATA_LAB_BLK_MIB", "128"))


def test_virtio_blk_sequential_read_kata_vmm_vs_qemu(guest_assets: GuestAssets, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(IMAGE_MIB << 20))
    md5 = hashlib.md5(disk.read_bytes()).hexdigest()
    initrd = initrd_with_files(
        guest_assets.initrd_test, {"/lab/run.sh": (SCRIPTS / "blk_read.sh").read_text()}, tmp_path / "initrd"
    )
    config = GuestConfig(
        kernel=guest_assets.kernel,
        initrd=initrd,
        cmdline="console=ttyS0 quiet panic=-1 lab.run=/lab/run.sh",
        memory_mib=512,
        disks=[disk],
    )
    results: dict[str, float] = {}
    for backend in (QemuBackend(), KataVmmBackend()):
        if isinstance(backend, KataVmmBackend):
            config.disks, config.extra_args = [], {"kata-vmm": ["--timeout", "600", "--block", f"{disk},ro"]}
        factory = MicroVMFactory(tmp_path / backend.name, backend, guest_assets)
        try:
            vm = factory.build(config).spawn()
            vm.wait_for_console("lab-init: /lab/run.sh exited", timeout=600)
            assert vm.wait_exit(timeout=60) == 0, vm.stderr
        finally:
            factory.kill_all()
        match = re.search(r"^BLK-READ (\d+) ([\d.]+) ([\d.]+) (\w+)$", vm.console, re.MULTILINE)
        assert match, vm.console[-3000:]
        sectors, t0, t1, got = match.groups()
        assert int(sectors) * 512 == IMAGE_MIB << 20 and got == md5
        results[backend.name] = (IMAGE_MIB << 20) / 1e6 / max(float(t1) - float(t0), 0.01)
    ours, qemu = results["kata-vmm"], results["qemu"]
    print(
        f"virtio-blk sequential read of {IMAGE_MIB} MiB: qemu {qemu:.1f} MB/s, "
        f"kata-vmm {ours:.1f} MB/s, kata-vmm/qemu = {ours / qemu:.3f}"
    )
    print(result_line("virtio-blk", "MB/s", f"sequential read of {IMAGE_MIB} MiB", results))


VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
SMALL_FILES = int(os.environ.get("KATA_LAB_FS_FILES", "1000"))


def test_virtio_fs_small_file_reads_kata_vmm_vs_qemu_virtiofsd(
    guest_assets: GuestAssets, tmp_path: Path
) -> None:
    """Stat+read of many 1-4 KiB files: our inline virtio-fs against QEMU's vhost-user-fs with virtiofsd."""
    if not os.access(VIRTIOFSD, os.X_OK):
        pytest.fail(f"{VIRTIOFSD} missing (qemu-system-common)")
    shared = tmp_path / "shared"
    files = shared / "files"
    files.mkdir(parents=True)
    for i in range(SMALL_FILES):
        (files / f"f{i:05d}").write_bytes(os.urandom(1024 + (i * 37) % 3072))
    md5 = hashlib.md5(b"".join(p.read_bytes() for p in sorted(files.iterdir()))).hexdigest()
    initrd = initrd_with_files(
        guest_assets.initrd_test, {"/lab/run.sh": (SCRIPTS / "fs_read.sh").read_text()}, tmp_path / "initrd"
    )
    sock = tmp_path / "virtiofsd.sock"
    qemu_fs = [
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on", "-numa", "node,memdev=mem",
        "-chardev", f"socket,id=fs,path={sock}", "-device", "vhost-user-fs-pci,chardev=fs,tag=rootfs",
    ]  # fmt: skip
    config = GuestConfig(
        kernel=guest_assets.kernel,
        initrd=initrd,
        cmdline="console=ttyS0 quiet panic=-1 lab.run=/lab/run.sh lab.virtiofs=rootfs",
        memory_mib=512,
        extra_args={"qemu": qemu_fs, "kata-vmm": ["--timeout", "600", "--fs", f"rootfs={shared}"]},
    )
    results: dict[str, float] = {}
    for backend in (QemuBackend(), KataVmmBackend()):
        daemon = None
        if isinstance(backend, QemuBackend):
            daemon = subprocess.Popen(
                [str(VIRTIOFSD), f"--socket-path={sock}", "-o", f"source={shared}", "-o", "cache=auto"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 30
            while not sock.exists():
                assert time.monotonic() < deadline and daemon.poll() is None, "virtiofsd did not start"
                time.sleep(0.05)
        factory = MicroVMFactory(tmp_path / backend.name, backend, guest_assets)
        try:
            vm = factory.build(config).spawn()
            vm.wait_for_console("lab-init: /lab/run.sh exited", timeout=600)
            assert vm.wait_exit(timeout=60) == 0, vm.stderr
        finally:
            factory.kill_all()
            if daemon is not None:
                daemon.kill()
                daemon.wait()
        match = re.search(r"^FS-READ (\d+) (\w+) ([\d.]+) ([\d.]+)$", vm.console, re.MULTILINE)
        assert match, vm.console[-3000:]
        count, got, t0, t1 = match.groups()
        assert int(count) == SMALL_FILES and got == md5
        results[backend.name] = SMALL_FILES / max(float(t1) - float(t0), 0.01)
    ours, qemu = results["kata-vmm"], results["qemu"]
    print(
        f"virtio-fs stat+read of {SMALL_FILES} small files: qemu+virtiofsd {qemu:.0f} files/s, "
        f"kata-vmm {ours:.0f} files/s, kata-vmm/qemu = {ours / qemu:.3f}"
    )
    print(result_line("virtio-fs", "files/s", f"stat+read of {SMALL_FILES} small files", results))
