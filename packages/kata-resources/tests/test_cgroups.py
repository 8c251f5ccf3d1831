"""The sandbox's host cgroup on v1 (this host) and v2 (the unified mount here; limits in the lab VM).

Only child processes the tests start are moved, never the test runner itself; tests that move tasks on
v1 leave out the memory controller, so no task leaves the memory cgroup it was started in.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_resources import (
    CGROUP_ROOT,
    CgroupError,
    CgroupLimits,
    SandboxCgroup,
    cgroup_relative_path,
    cgroup_version,
)

V1_NO_MEMORY = ("cpu", "cpuacct", "cpuset", "pids")
UNIFIED = CGROUP_ROOT / "unified"


def _v1_here() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (cgroupfs)")
    if cgroup_version() != 1 or not (CGROUP_ROOT / "cpu" / "tasks").exists():
        pytest.skip("host is not cgroup v1 (hybrid); the v2 tests cover it")


def _cgroup_of(pid: int, controller: str, tid: int | None = None) -> str:
    where = f"/proc/{pid}/task/{tid}/cgroup" if tid else f"/proc/{pid}/cgroup"
    for line in Path(where).read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(",") or (controller == "" and names == ""):
            return path
    raise AssertionError(f"no {controller!r} line in {where}")


@pytest.fixture
def child() -> Iterator[int]:
    """A sleeping child process to move around."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def sid() -> str:
    return f"kres-{uuid.uuid4().hex[:8]}"


# -- pure: paths and limits --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cgroups_path", "expected"),
    [
        ("/kubepods/pod1", "kubepods/pod1"),
        ("", "kata_sb"),
        ("system.slice:docker:abc", "system.slice/docker-abc.scope"),
        ("kubepods-besteffort-pod1.slice:cri-containerd:c1",
         "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-c1.scope"),
        (":kata:c1", "system.slice/kata-c1.scope"),
        ("-:kata:c1", "kata-c1.scope"),
        ("kubepods.slice::pod1.slice", "kubepods.slice/pod1.slice"),
    ],
)  # fmt: skip
def test_cgroups_path_forms(cgroups_path: str, expected: str) -> None:
    assert cgroup_relative_path(cgroups_path, "sb") == expected


@pytest.mark.parametrize("bad", ["/a/../b", "a-.slice:p:n", "x:p:n", "system.slice:p:a/b", "/"])
def test_bad_cgroups_path_is_refused(bad: str) -> None:
    with pytest.raises(CgroupError):
        cgroup_relative_path(bad, "sb")


def test_limits_from_oci_and_the_sandbox_sum() -> None:
    a = CgroupLimits.from_oci({"cpu": {"quota": 200_000, "period": 100_000, "shares": 1024},
                               "memory": {"limit": 256 << 20}})  # fmt: skip
    b = CgroupLimits.from_oci({"cpu": {"quota": 25_000, "period": 50_000}})
    none = CgroupLimits.from_oci({"cpu": {"quota": -1}, "memory": {"limit": 0}})
    assert (a.cpus, b.cpus, none.cpus, none.memory_limit) == (2.0, 0.5, None, None)
    total = CgroupLimits.sandbox([a, b, none], overhead=CgroupLimits(memory_limit=64 << 20))
    assert (total.cpu_quota, total.cpu_period, total.memory_limit) == (250_000, 100_000, 320 << 20)
    assert CgroupLimits.sandbox([none]) == CgroupLimits()


def test_bad_record_is_refused() -> None:
    with pytest.raises(CgroupError):
        SandboxCgroup.from_dict({"path": "x"})
    record = SandboxCgroup("a", sandbox_id="s", version=1, created=["cpu/../../etc"]).to_dict()
    with pytest.raises(CgroupError):
        SandboxCgroup.from_dict(record)


# -- cgroup v1 (this host) ----------------------------------------------------------------------------------


@pytest.mark.root
def test_v1_sandbox_cgroup_holds_the_process_and_its_limits_then_is_removed(sid: str, child: int) -> None:
    _v1_here()
    cg = SandboxCgroup.create(sid, f"/{sid}/pod", controllers=V1_NO_MEMORY)
    try:
        cg.add_processes([child])
        assert _cgroup_of(child, "cpu") == f"/{sid}/pod"
        assert _cgroup_of(child, "pids") == f"/{sid}/pod"
        cg.set_limits(CgroupLimits(cpu_quota=50_000, cpu_period=100_000, cpu_shares=512, cpuset_cpus="0"))
        cpu = CGROUP_ROOT / "cpu" / sid / "pod"
        assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert (cpu / "cpu.shares").read_text().strip() == "512"
        assert (CGROUP_ROOT / "cpuset" / sid / "pod" / "cpuset.cpus").read_text().strip() == "0"
        assert child in cg.tasks()
    finally:
        cg.delete()
    assert _cgroup_of(child, "cpu") == "/"
    for controller in V1_NO_MEMORY:
        assert not (CGROUP_ROOT / controller / sid).exists()


@pytest.mark.root
def test_v1_overhead_cgroup_takes_the_process_and_the_sandbox_the_vcpu_thread(sid: str, child: int) -> None:
    _v1_here()
    cg = SandboxCgroup.create(sid, f"/{sid}", sandbox_cgroup_only=False, controllers=V1_NO_MEMORY)
    try:
        assert cg.overhead_path == f"kata_overhead/{sid}"
        cg.add_processes([child])
        assert _cgroup_of(child, "cpu") == f"/kata_overhead/{sid}"
        cg.add_threads([child])  # its only thread stands in for a vCPU thread
        assert _cgroup_of(child, "cpu", tid=child) == f"/{sid}"
    finally:
        cg.delete()
    assert _cgroup_of(child, "cpu") == "/"
    assert not (CGROUP_ROOT / "cpu" / OVERHEAD / sid).exists()
    assert not (CGROUP_ROOT / "cpu" / sid).exists()


OVERHEAD = "kata_overhead"


@pytest.mark.root
def test_v1_memory_limit(sid: str) -> None:
    _v1_here()
    cg = SandboxCgroup.create(sid, f"/{sid}", controllers=("memory",))
    try:
        cg.set_limits(CgroupLimits(memory_limit=256 << 20))
        assert (CGROUP_ROOT / "memory" / sid / "memory.limit_in_bytes").read_text().strip() == str(256 << 20)
    finally:
        cg.delete()
    assert not (CGROUP_ROOT / "memory" / sid).exists()


@pytest.mark.root
def test_v1_restored_record_deletes_after_a_crash(sid: str, child: int) -> None:
    _v1_here()
    cg = SandboxCgroup.create(sid, f"/{sid}/a/b", controllers=V1_NO_MEMORY)
    cg.add_processes([child])
    SandboxCgroup.from_dict(json.loads(json.dumps(cg.to_dict()))).delete()
    assert _cgroup_of(child, "cpu") == "/"
    assert not (CGROUP_ROOT / "cpu" / sid).exists()
    cg.delete()  # the original record, again: already gone is fine


@pytest.mark.root
def test_v1_existing_parent_is_kept_and_takes_the_tasks_back(sid: str, child: int) -> None:
    """As kubelet's pod cgroup: made by someone else, it outlives the sandbox and gets its tasks."""
    _v1_here()
    (CGROUP_ROOT / "cpu" / sid).mkdir()
    try:
        cg = SandboxCgroup.create(sid, f"/{sid}/pod/kata", controllers=("cpu",))
        cg.add_processes([child])
        assert _cgroup_of(child, "cpu") == f"/{sid}/pod/kata"
        cg.delete()
        assert _cgroup_of(child, "cpu") == f"/{sid}"
        assert (CGROUP_ROOT / "cpu" / sid).is_dir()
        assert not (CGROUP_ROOT / "cpu" / sid / "pod").exists()
    finally:
        _evict_all(CGROUP_ROOT / "cpu" / sid)
        (CGROUP_ROOT / "cpu" / sid).rmdir()


def _evict_all(cgroup: Path) -> None:
    root = CGROUP_ROOT / cgroup.relative_to(CGROUP_ROOT).parts[0]
    for tid in (cgroup / "tasks").read_text().split():
        with contextlib.suppress(ProcessLookupError):
            (root / "tasks").write_text(tid)


# -- cgroup v2 ------------------------------------------------------------------------------------------


def _v2_root() -> Path:
    """The unified hierarchy: /sys/fs/cgroup on a pure v2 host, /sys/fs/cgroup/unified on a hybrid one."""
    if os.geteuid() != 0:
        pytest.skip("needs root (cgroupfs)")
    for root in (CGROUP_ROOT, UNIFIED):
        if cgroup_version(root) == 2:
            return root
    raise AssertionError("no cgroup2 hierarchy mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified")


@pytest.mark.root
def test_v2_threaded_layout_moves_process_and_vcpu_thread_then_is_removed(sid: str, child: int) -> None:
    root = _v2_root()
    cg = SandboxCgroup.create(sid, f"/{sid}", sandbox_cgroup_only=False, root=root, version=2)
    try:
        assert (root / sid / "sandbox" / "cgroup.type").read_text().strip() == "threaded"
        assert (root / sid / "overhead" / "cgroup.type").read_text().strip() == "threaded"
        cg.add_processes([child])
        cg.add_threads([child], overhead=True)
        assert _cgroup_of(child, "", tid=child) == f"/{sid}/overhead"
        cg.add_threads([child])
        assert _cgroup_of(child, "", tid=child) == f"/{sid}/sandbox"
        assert cg.tasks() == [child]
    finally:
        cg.delete()
    assert _cgroup_of(child, "") == "/"
    assert not (root / sid).exists()


@pytest.mark.root
def test_v2_sandbox_cgroup_only_is_one_leaf(sid: str, child: int) -> None:
    root = _v2_root()
    cg = SandboxCgroup.create(sid, f"/{sid}/pod", root=root, version=2)
    try:
        cg.add_processes([child])
        cg.add_threads([child])
        assert _cgroup_of(child, "") == f"/{sid}/pod"
        assert cg.overhead_path is None
    finally:
        SandboxCgroup.from_dict(cg.to_dict()).delete()
    assert not (root / sid).exists()


@pytest.mark.root
def test_v2_cgroup_of_a_process_just_killed_is_removed_once_it_exited(sid: str) -> None:
    """Crash cleanup kills the VMM's processes, then removes the sandbox cgroup: a task that is still
    exiting can neither be moved nor leave the cgroup removable (EBUSY, as a CI run's QEMU pod left its
    cgroup behind); `delete` waits for it within DELETE_SETTLE."""
    root = _v2_root()
    cg = SandboxCgroup.create(sid, f"/{sid}/pod", root=root, version=2)
    proc = subprocess.Popen(["sleep", "600"])
    try:
        cg.add_processes([proc.pid])
        proc.kill()  # not waited for: still exiting when delete begins
        cg.delete()
        assert not (root / sid).exists()
    finally:
        proc.kill()
        proc.wait()
        with contextlib.suppress(CgroupError):
            SandboxCgroup.from_dict(cg.to_dict()).delete(settle=0)


@pytest.mark.root
def test_v2_parent_made_by_another_sandbox_meanwhile_is_used_and_left_to_it(
    sid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten sandboxes started at once all make their namespace's parent (ctr: /default): the one that loses
    the race between looking and mkdir used to fail its start with EEXIST (the lab's load bench: 8 of 10)."""
    root = _v2_root()
    parent = root / sid
    enable = SandboxCgroup._enable_v2

    def other_sandbox_wins(self: SandboxCgroup, where: Path, controllers: list[str]) -> None:
        enable(self, where, controllers)
        if where == root and not parent.exists():
            parent.mkdir()  # the other shim's mkdir lands first

    monkeypatch.setattr(SandboxCgroup, "_enable_v2", other_sandbox_wins)
    try:
        cg = SandboxCgroup.create(sid, f"/{sid}/pod", root=root, version=2)
        assert (parent / "pod").is_dir()
        assert cg.created == [f"{sid}/pod"]  # only what it made is its to remove
        cg.delete()
        assert parent.is_dir() and not (parent / "pod").exists()
    finally:
        with contextlib.suppress(FileNotFoundError):
            (parent / "pod").rmdir()
        parent.rmdir()


@pytest.mark.root
def test_v2_parent_removed_by_its_maker_meanwhile_is_made_again_and_is_then_ours(
    sid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other race of sandboxes starting and stopping at once: the sandbox that made the shared parent
    removes it (its cleanup) between our look and our mkdir below it: the walk starts over and makes it."""
    root = _v2_root()
    parent = root / sid
    parent.mkdir()  # made by another sandbox
    enable = SandboxCgroup._enable_v2
    removed: list[bool] = []

    def other_sandbox_cleans_up(self: SandboxCgroup, where: Path, controllers: list[str]) -> None:
        if where == parent and not removed:
            removed.append(True)
            parent.rmdir()  # its maker's cleanup lands first
        enable(self, where, controllers)

    monkeypatch.setattr(SandboxCgroup, "_enable_v2", other_sandbox_cleans_up)
    try:
        cg = SandboxCgroup.create(sid, f"/{sid}/pod", root=root, version=2)
        assert removed and (parent / "pod").is_dir()
        assert cg.created == [sid, f"{sid}/pod"]  # made again by us: ours to remove
        cg.delete()
        assert not parent.exists()
    finally:
        with contextlib.suppress(FileNotFoundError):
            (parent / "pod").rmdir()
        with contextlib.suppress(FileNotFoundError):
            parent.rmdir()


@pytest.mark.lab
@pytest.mark.root
def test_v2_limits_on_a_pure_v2_host(sid: str, child: int) -> None:
    """Runs in the lab VM (pure v2 with cpu and memory controllers); fails clearly where they are missing."""
    assert cgroup_version() == 2, (
        "needs a pure cgroup v2 host (/sys/fs/cgroup is cgroup2): run it in the lab VM"
    )
    have = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
    assert {"cpu", "memory"} <= set(have), f"cgroup v2 root offers only {have}"
    cg = SandboxCgroup.create(sid, f"/{sid}", sandbox_cgroup_only=False)
    try:
        cg.add_processes([child])
        cg.add_threads([child])
        cg.set_limits(CgroupLimits(cpu_quota=200_000, cpu_period=100_000, memory_limit=256 << 20))
        assert (CGROUP_ROOT / sid / "sandbox" / "cpu.max").read_text().split() == ["200000", "100000"]
        assert (CGROUP_ROOT / sid / "memory.max").read_text().strip() == str(256 << 20)
    finally:
        cg.delete()
    assert not (CGROUP_ROOT / sid).exists()
