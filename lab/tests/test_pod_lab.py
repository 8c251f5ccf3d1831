"""A pod, not just a container (issue 14), with a real containerd 1.6 inside the lab VM.

The pod's network namespace is made here as CNI would leave it: a netns with a veth ``eth0`` (address,
default route) whose peer is on the lab VM's side with the gateway's address. `ctr run --with-ns
network:<path>` hands that netns to the shim, which joins a tap to the veth (tc redirect) and gives the
guest a virtio-net NIC with the veth's MAC; the agent names and addresses it as the veth. The lab VM is
cgroup v2: the sandbox cgroup is at the container's cgroupsPath (ctr: /<namespace>/<id>), the vCPU
thread in it while the pod runs. After the container is gone nothing is left: no tap, no qdisc, no
filter, no cgroup. The systemd form of cgroupsPath (`slice:prefix:name`, `ctr run --cgroup`) is checked
too; the lab VM's init is not systemd, so the shim makes the slice and scope directories itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from framework.containerd import (
    BUSYBOX_IMAGE,
    KATA_RUNTIME,
    PrivateContainerd,
    thread_names,
)

RUN_TIMEOUT = 600
NETNS = "kata-pod-lab"
NETNS_PATH = f"/var/run/netns/{NETNS}"
POD_IP, HOST_IP = "10.99.0.2", "10.99.0.1"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PING = [shutil.which("ping")] if shutil.which("ping") else ["/bin/busybox", "ping"]


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True).stdout


@pytest.fixture
def pod_netns() -> Iterator[str]:
    """A netns as CNI leaves it: veth eth0 (POD_IP/24, default via HOST_IP); its peer on our side."""
    sh("ip", "netns", "add", NETNS)
    try:
        sh("ip", "link", "add", "kpod-host", "type", "veth", "peer", "name", "eth0", "netns", NETNS)
        sh("ip", "-n", NETNS, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
        sh("ip", "-n", NETNS, "link", "set", "eth0", "up")
        sh("ip", "-n", NETNS, "link", "set", "lo", "up")
        sh("ip", "-n", NETNS, "route", "add", "default", "via", HOST_IP)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", "kpod-host")
        sh("ip", "link", "set", "kpod-host", "up")
        yield json.loads(sh("ip", "-n", NETNS, "-j", "link", "show", "eth0"))[0]["address"]
    finally:
        sh("ip", "link", "delete", "kpod-host", check=False)
        sh("ip", "netns", "delete", NETNS, check=False)


def kata_run(ctrd: PrivateContainerd, *args: str) -> subprocess.CompletedProcess[str]:
    return ctrd.ctr("run", "--runtime", KATA_RUNTIME, *args, timeout=RUN_TIMEOUT, check=False)


def pod_leftovers(ctrd: PrivateContainerd, cid: str) -> dict[str, object]:
    """What a pod could leave: shims, taps or ingress qdiscs in the netns, its cgroup."""
    return {
        "shims": ctrd.shim_pids(),
        # (a pod without the netns fixture has no netns: nothing can be left in it)
        "taps": [
            line
            for line in sh("ip", "-n", NETNS, "-o", "link", "show", check=False).splitlines()
            if "_kata" in line
        ],
        "qdiscs": [
            q
            for q in sh("tc", "-n", NETNS, "qdisc", "show", "dev", "eth0", check=False).splitlines()
            if "ingress" in q
        ],
        "cgroup": (CGROUP_ROOT / "default" / cid).exists(),
    }


def assert_pod_gone(ctrd: PrivateContainerd, cid: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while True:
        left = pod_leftovers(ctrd, cid)
        if not any(left.values()) or time.monotonic() > end:
            break
        time.sleep(0.5)
    assert not any(left.values()), f"{cid}: left behind {left}\n{ctrd.log_tail()}"


@pytest.mark.lab
def test_container_in_a_cni_style_netns_has_the_veths_address_and_reaches_the_host(
    ctrd: PrivateContainerd, pod_netns: str
) -> None:
    script = f"ip -o addr show eth0; ip -o link show eth0; ip route; ping -c 3 -W 20 {HOST_IP}"
    done = kata_run(
        ctrd, "--rm", "--with-ns", f"network:{NETNS_PATH}", BUSYBOX_IMAGE, "net1", "sh", "-c", script
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{ctrd.log_tail(100)}"
    assert f"inet {POD_IP}/24" in done.stdout, done.stdout
    assert pod_netns in done.stdout, done.stdout  # the guest NIC has the veth's MAC
    assert f"default via {HOST_IP} dev eth0" in done.stdout, done.stdout
    assert "3 packets received" in done.stdout or " 0% packet loss" in done.stdout, done.stdout
    assert_pod_gone(ctrd, "net1")


@pytest.mark.lab
def test_sandbox_cgroup_holds_the_vcpu_thread_while_the_pod_runs_and_goes_after(
    ctrd: PrivateContainerd, pod_netns: str
) -> None:
    cid = "cg1"
    done = kata_run(ctrd, "-d", "--with-ns", f"network:{NETNS_PATH}", BUSYBOX_IMAGE, cid, "sleep", "600")
    assert done.returncode == 0, f"{done.stderr}\n{ctrd.log_tail(100)}"
    try:
        shims = ctrd.shim_pids()
        assert len(shims) == 1, shims
        shim = shims[0]
        cgroup = CGROUP_ROOT / "default" / cid
        assert cgroup.is_dir(), sorted(p.name for p in (CGROUP_ROOT / "default").iterdir())
        vcpus = [
            int(t.name)
            for t in Path(f"/proc/{shim}/task").iterdir()
            if (t / "comm").read_text().strip().startswith("kata-vcpu")
        ]
        assert vcpus, thread_names(shim)
        inside = {int(x) for f in cgroup.rglob("cgroup.threads") for x in f.read_text().split()}
        assert set(vcpus) <= inside, (vcpus, sorted(inside))
        # the shim in the sandbox's domain (a threaded child's cgroup.procs cannot be read)
        assert shim in {int(x) for x in (cgroup / "cgroup.procs").read_text().split()}
        # the network is up while it runs: tap and redirect in the pod's netns
        assert "tap0_kata" in sh("ip", "-n", NETNS, "-o", "link", "show")
        ping = subprocess.run(
            [*PING, "-c", "2", "-W", "20", POD_IP], capture_output=True, text=True, check=False
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr  # the host reaches the guest too
    finally:
        ctrd.remove(cid)
    assert_pod_gone(ctrd, cid)


@pytest.mark.lab
def test_vm_is_sized_from_the_containers_limits_plus_the_defaults(ctrd: PrivateContainerd) -> None:
    # the shipped config: default_vcpus 1, default_memory 512 MiB; the container asks 1 CPU and 512 MiB
    script = "nproc; grep MemTotal /proc/meminfo"
    done = kata_run(
        ctrd,
        "--rm",
        "--cpus",
        "1",
        "--memory-limit",
        str(512 << 20),
        BUSYBOX_IMAGE,
        "size1",
        "sh",
        "-c",
        script,
    )
    assert done.returncode == 0, f"{done.stderr}\n{ctrd.log_tail(100)}"
    lines = done.stdout.split()
    assert lines[0] == "2", done.stdout
    mem_kib = int(lines[2])
    assert 900 * 1024 < mem_kib <= 1024 * 1024, done.stdout  # 1 GiB less what the guest kernel keeps


@pytest.mark.lab
def test_systemd_form_cgroups_path_makes_the_scope_below_its_slices_and_removes_them(
    ctrd: PrivateContainerd,
) -> None:
    # the lab VM's init is not systemd: the shim makes slice and scope directories itself (no systemd unit,
    # as kata-resources documents), and removes every one it made
    cid = "sd1"
    slices = CGROUP_ROOT / "kata.slice"
    scope = slices / "kata-lab.slice" / f"kata-{cid}.scope"
    assert not slices.exists()
    done = kata_run(ctrd, "-d", "--cgroup", f"kata-lab.slice:kata:{cid}", BUSYBOX_IMAGE, cid, "sleep", "600")
    assert done.returncode == 0, f"{done.stderr}\n{ctrd.log_tail(100)}"
    try:
        shims = ctrd.shim_pids()
        assert len(shims) == 1, shims
        assert scope.is_dir(), sorted(str(p.relative_to(CGROUP_ROOT)) for p in slices.rglob("*.s*"))
        assert shims[0] in {int(x) for x in (scope / "cgroup.procs").read_text().split()}
    finally:
        ctrd.remove(cid)
    end = time.monotonic() + 60
    while slices.exists() and time.monotonic() < end:
        time.sleep(0.5)
    assert not slices.exists(), sorted(str(p.relative_to(CGROUP_ROOT)) for p in slices.rglob("*"))
    assert not ctrd.shim_pids()


@pytest.mark.lab
def test_two_containers_of_a_pod_share_hostname_ipc_uts_and_dev_shm(ctrd: PrivateContainerd) -> None:
    """Pod-wide namespaces (issue 14): a second container joined to the pod (CRI sandbox annotations) is in
    the sandbox's IPC and UTS namespaces (one SysV IPC space: the same ipc namespace inode) and sees the
    file the first one wrote to /dev/shm, the pod's one sized tmpfs."""
    pod, member = "pns1", "pns1-c2"
    join = [
        "--annotation", "io.kubernetes.cri.container-type=container",
        "--annotation", f"io.kubernetes.cri.sandbox-id={pod}",
    ]  # fmt: skip
    done = kata_run(ctrd, "-d", BUSYBOX_IMAGE, pod, "sleep", "600")
    assert done.returncode == 0, f"{done.stderr}\n{ctrd.log_tail(100)}"
    try:
        done = kata_run(ctrd, "-d", *join, BUSYBOX_IMAGE, member, "sleep", "600")
        assert done.returncode == 0, f"{done.stderr}\n{ctrd.log_tail(100)}"
        assert len(ctrd.shim_pids()) == 1, "the second container must join the pod's VM"
        probe = "hostname; readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts; df -k /dev/shm | tail -1"
        first = ctrd.ctr(
            "task", "exec", "--exec-id", "w", pod, "sh", "-c", f"echo from-{pod} > /dev/shm/marker; {probe}",
            timeout=RUN_TIMEOUT,
        ).stdout.split("\n")  # fmt: skip
        second = ctrd.ctr(
            "task", "exec", "--exec-id", "r", member, "sh", "-c", f"cat /dev/shm/marker; {probe}",
            timeout=RUN_TIMEOUT,
        ).stdout.split("\n")  # fmt: skip
        print(f"pod namespaces: {first} / {second}")
        assert second[0] == f"from-{pod}", second  # one /dev/shm
        assert second[1:5] == first[0:4], (first, second)  # one hostname, one ipc and one uts namespace
        assert first[1].startswith("ipc:[") and first[2].startswith("uts:["), first
    finally:
        for cid in (member, pod):
            ctrd.remove(cid)
    assert_pod_gone(ctrd, pod)
