"""test_pod_lab's pod over the external back-end (issue 15: "the pod tests pass on QEMU too").

Imported unchanged (one copy each): the pod-wide namespaces and the systemd form of the cgroups path. Written
for QEMU: where the built-in back-end's check reads its own threads, an external VMM's pod is processes, so
the sandbox cgroup must hold QEMU and virtiofsd (the shim forks them inside it), and the VM's size is the
lab qemu configuration's defaults (1 vCPU, 1024 MiB) plus the container's limits, its vCPUs capped by
upstream's `default_maxvcpus = 0`, i.e. the host's CPUs (one in a lab VM of `nox -s lab`). The containerd is
test_shim_qemu_lab's: its shims read upstream's configuration-qemu-runtime-rs.toml.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from framework.configs import QEMU_LAB_MEMORY_MIB
from framework.containerd import BUSYBOX_IMAGE, PrivateContainerd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_pod_lab
import test_shim_qemu_lab
from test_pod_lab import CGROUP_ROOT, NETNS, NETNS_PATH, PING, POD_IP, assert_pod_gone, kata_run, sh
from test_qemu_lab import _processes

ctrd = test_shim_qemu_lab.ctrd
pod_netns = test_pod_lab.pod_netns
test_two_containers_of_a_pod_share_hostname_ipc_uts_and_dev_shm = (
    test_pod_lab.test_two_containers_of_a_pod_share_hostname_ipc_uts_and_dev_shm
)
test_systemd_form_cgroups_path_makes_the_scope_below_its_slices_and_removes_them = (
    test_pod_lab.test_systemd_form_cgroups_path_makes_the_scope_below_its_slices_and_removes_them
)
QEMU, VIRTIOFSD = "qemu-system-x86_64", "virtiofsd"


@pytest.mark.lab
def test_sandbox_cgroup_holds_qemu_and_virtiofsd_on_the_pods_network_and_goes_after(
    ctrd: PrivateContainerd, pod_netns: str
) -> None:
    cid = "qcg1"
    done = kata_run(ctrd, "-d", "--with-ns", f"network:{NETNS_PATH}", BUSYBOX_IMAGE, cid, "sleep", "600")
    assert done.returncode == 0, f"{done.stderr}\n{ctrd.log_tail(100)}"
    try:
        shims = ctrd.shim_pids()
        assert len(shims) == 1, shims
        cgroup = CGROUP_ROOT / "default" / cid
        assert cgroup.is_dir(), sorted(p.name for p in (CGROUP_ROOT / "default").iterdir())
        inside = {int(x) for f in cgroup.rglob("cgroup.procs") for x in f.read_text().split()}
        vmm = _processes(QEMU) + _processes(VIRTIOFSD)
        assert _processes(QEMU) and _processes(VIRTIOFSD), vmm
        assert {shims[0], *vmm} <= inside, (shims, vmm, sorted(inside))
        # the pod's network: QEMU's NIC on the tap joined to the veth, both ways
        assert "tap0_kata" in sh("ip", "-n", NETNS, "-o", "link", "show")
        ping = subprocess.run(
            [*PING, "-c", "2", "-W", "20", POD_IP], capture_output=True, text=True, check=False
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
    finally:
        ctrd.remove(cid)
    assert_pod_gone(ctrd, cid)
    assert not _processes(QEMU) and not _processes(VIRTIOFSD)


@pytest.mark.lab
def test_qemu_vm_is_sized_from_the_containers_limits_plus_the_defaults(ctrd: PrivateContainerd) -> None:
    limit_mib = 512
    script = "nproc; grep MemTotal /proc/meminfo"
    done = kata_run(
        ctrd, "--rm", "--cpus", "1", "--memory-limit", str(limit_mib << 20), BUSYBOX_IMAGE, "qsize1",
        "sh", "-c", script,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stderr}\n{ctrd.log_tail(100)}"
    lines = done.stdout.split()
    # 1 + 1 vCPUs, but upstream's qemu configuration says default_maxvcpus = 0: no more than the host has
    assert int(lines[0]) == min(2, os.cpu_count() or 1), done.stdout
    total_kib = (QEMU_LAB_MEMORY_MIB + limit_mib) * 1024
    assert total_kib - 128 * 1024 < int(lines[2]) <= total_kib, done.stdout  # less what the kernel keeps
