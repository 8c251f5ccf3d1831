"""Hot-plug through the shim on the dragonball back-end (issue 17), with a real containerd 1.6 inside the
lab VM and the sandbox guest whose initramfs loads kata_upcall_srv.

- Dynamic sizing (`static_sandbox_resource_mgmt = false`, a copy of the shipped configuration with only
  that key changed; default_vcpus 1, default_maxvcpus 2): `ctr run --cpus 2` boots a 1-vCPU VM that the
  Create grows to 2 by vCPU hot-plug before the container starts; Task.Update (ctr 1.6 has no
  `ctr task update`: the test sends the shim's Task.Update over its ttrpc socket, as containerd would)
  grows and shrinks it, and the guest container's CPU limit follows (agent UpdateContainer).
- Memory (the same with `enable_virtio_mem = true`, `default_maxmemory = 1024`): a container's memory limit
  plugs that much memory into the 512 MiB VM by virtio-mem before it starts, and Task.Update with a larger
  limit plugs more (the guest onlines it: MemTotal grows).
- A raw block device (`ctr run --device /dev/loopN`): hot-plugged as virtio-blk, read inside the
  container, gone with the container (shipped configuration: block hot-plug does not depend on sizing).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from framework.containerd import BUSYBOX_IMAGE, KATA_RUNTIME, REPO, PrivateContainerd
from google.protobuf import any_pb2

from kata_proto.containerd import task_pb2
from kata_proto.ttrpc import NAMESPACE_METADATA_KEY, ServiceStub, open_ttrpc_client

RUN_TIMEOUT = 600
SHIPPED_CONFIG = REPO / "packages" / "kata-shim" / "src" / "kata_shim" / "config" / "configuration.toml"
LINUX_RESOURCES = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


def kata_run(ctrd: PrivateContainerd, *args: str) -> subprocess.CompletedProcess[str]:
    return ctrd.ctr("run", "--runtime", KATA_RUNTIME, *args, timeout=RUN_TIMEOUT, check=False)


def in_task(ctrd: PrivateContainerd, cid: str, script: str) -> str:
    done = ctrd.ctr(
        "task", "exec", "--exec-id", f"x{time.monotonic_ns()}", cid, "sh", "-c", script,
        timeout=RUN_TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{ctrd.log_tail(100)}"
    return done.stdout


def eventually(check: Callable[[], bool], what: str, timeout: float = 120) -> None:
    """Poll ``check()`` until it holds or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"{what} within {timeout} s")
        time.sleep(1)


def kill_and_delete(ctrd: PrivateContainerd, cid: str) -> None:
    """SIGKILL the task; its delete must succeed `eventually`; then the container's."""
    ctrd.ctr("task", "kill", "-s", "SIGKILL", cid, check=False)
    eventually(lambda: ctrd.ctr("task", "delete", cid, check=False).returncode == 0, "task deleted")
    ctrd.ctr("container", "delete", cid, check=False)


def task_update(ctrd: PrivateContainerd, cid: str, resources: dict[str, object]) -> None:
    """Task.Update to the container's shim, as containerd sends it (LinuxResources JSON in an Any)."""
    bundle = ctrd.state / "io.containerd.runtime.v2.task" / "default" / cid
    address = (bundle / "address").read_text().strip()
    path = address.removeprefix("unix://")

    async def call() -> None:
        async with open_ttrpc_client(path) as client:
            stub = ServiceStub(
                client,
                task_pb2.DESCRIPTOR.services_by_name["Task"],
                timeout=RUN_TIMEOUT,
                metadata={NAMESPACE_METADATA_KEY: "default"},
            )
            body = any_pb2.Any(type_url=LINUX_RESOURCES, value=json.dumps(resources).encode())
            await stub.Update(task_pb2.UpdateTaskRequest(id=cid, resources=body))

    trio.run(call)


@pytest.fixture
def dynamic_config(tmp_path: Path) -> Path:
    text = SHIPPED_CONFIG.read_text()
    assert "static_sandbox_resource_mgmt = true" in text
    path = tmp_path / "configuration.toml"
    path.write_text(
        text.replace("static_sandbox_resource_mgmt = true", "static_sandbox_resource_mgmt = false")
    )
    return path


@pytest.fixture
def memory_config(dynamic_config: Path) -> Path:
    """`dynamic_config` with memory hot-plug: a virtio-mem region up to default_maxmemory (1024 MiB)."""
    text = dynamic_config.read_text()
    assert "[hypervisor.dragonball]\n" in text
    keys = "[hypervisor.dragonball]\nenable_virtio_mem = true\ndefault_maxmemory = 1024\n"
    dynamic_config.write_text(text.replace("[hypervisor.dragonball]\n", keys, 1))
    return dynamic_config


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[str]:
    image = tmp_path / "raw.img"
    image.write_bytes(b"kata-raw-volume\n".ljust(4 << 20, b"\0"))
    node = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True)
    dev = node.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.lab
def test_a_cpu_quota_grows_the_vm_by_vcpu_hotplug(ctrd: PrivateContainerd, dynamic_config: Path) -> None:
    done = kata_run(
        ctrd, "--rm", "--runtime-config-path", str(dynamic_config), "--cpus", "2",
        BUSYBOX_IMAGE, "hp1", "sh", "-c", "nproc; cat /sys/devices/system/cpu/online",
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{ctrd.log_tail(100)}"
    assert done.stdout.split() == ["2", "0-1"], done.stdout
    assert "vCPUs 1 -> 2 (container hp1)" in ctrd.log(), ctrd.log_tail(100)


@pytest.mark.lab
def test_task_update_grows_and_shrinks_the_vm(ctrd: PrivateContainerd, dynamic_config: Path) -> None:
    """Task.Update with a CPU quota hot-adds a vCPU and a smaller one removes it again. That the quota also
    reaches the guest's cgroup (agent UpdateContainer) is checked by the shim's unit tests only: the container
    has no cgroup filesystem here, and mounting cgroup2 inside it failed in the lab."""
    cid = "hp2"
    done = kata_run(
        ctrd, "-d", "--runtime-config-path", str(dynamic_config), BUSYBOX_IMAGE, cid, "sleep", "3600"
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stderr}\n{ctrd.log_tail(100)}"
    try:
        assert in_task(ctrd, cid, "nproc").split() == ["1"]  # no quota: default_vcpus
        task_update(ctrd, cid, {"cpu": {"quota": 200000, "period": 100000}})
        assert in_task(ctrd, cid, "nproc").split() == ["2"]
        task_update(ctrd, cid, {"cpu": {"quota": 100000, "period": 100000}})
        eventually(lambda: in_task(ctrd, cid, "nproc").split() == ["1"], "the guest back at 1 CPU")
        log = ctrd.log()
        assert "vCPUs 1 -> 2 (container hp2)" in log and "vCPUs 2 -> 1 (container hp2)" in log
    finally:
        kill_and_delete(ctrd, cid)
    eventually(lambda: not ctrd.shim_pids(), "the shim gone")


@pytest.mark.lab
def test_a_raw_block_device_is_hot_plugged_into_the_container_and_goes_with_it(
    ctrd: PrivateContainerd, loop_disk: str
) -> None:
    done = kata_run(
        ctrd, "--rm", "--device", loop_disk, BUSYBOX_IMAGE, "blk1",
        "sh", "-c", f"head -n 1 {loop_disk}; ls -l {loop_disk}",
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{ctrd.log_tail(100)}"
    lines = done.stdout.splitlines()
    assert lines[0] == "kata-raw-volume", done.stdout
    assert lines[1].startswith("b"), done.stdout  # a block node in the container
    assert "is /dev/vd" in ctrd.log(), ctrd.log_tail(100)  # "... (host /dev/loopN) is /dev/vdb in the guest"
    eventually(lambda: not ctrd.shim_pids(), "the shim gone")


MEMTOTAL_KIB = "sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo"


@pytest.mark.lab
def test_memory_limits_grow_the_vm_by_virtio_mem(ctrd: PrivateContainerd, memory_config: Path) -> None:
    """512 MiB at boot; the container's 256 MiB limit makes it 768 before the container starts, Task.Update
    to a 448 MiB limit makes it 960: each time the shim asks the guest's virtio_mem driver for the
    difference and the guest onlines it."""
    cid = "hpm"
    done = kata_run(
        ctrd, "-d", "--runtime-config-path", str(memory_config), "--memory-limit", str(256 << 20),
        BUSYBOX_IMAGE, cid, "sleep", "3600",
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stderr}\n{ctrd.log_tail(100)}"
    try:
        first = int(in_task(ctrd, cid, MEMTOTAL_KIB))
        assert (768 - 128) * 1024 < first <= 768 * 1024, first  # boot + plugged, less what the kernel keeps
        task_update(ctrd, cid, {"memory": {"limit": 448 << 20}})
        second = int(in_task(ctrd, cid, MEMTOTAL_KIB))
        assert 180 * 1024 <= second - first <= 192 * 1024, (first, second)
        log = ctrd.log()
        assert "memory 512 -> 768 MiB (container hpm)" in log, ctrd.log_tail(100)
        assert "memory 768 -> 960 MiB (container hpm)" in log, ctrd.log_tail(100)
    finally:
        kill_and_delete(ctrd, cid)
    eventually(lambda: not ctrd.shim_pids(), "the shim gone")
