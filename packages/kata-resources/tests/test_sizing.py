"""Sandbox sizing: static from CRI annotations or the lone container's resources; dynamic (`VcpuPlan`)."""

from __future__ import annotations

import pytest

from kata_resources import (
    CONTAINER_TYPE,
    SANDBOX_CPU_PERIOD,
    SANDBOX_CPU_QUOTA,
    SANDBOX_MEMORY,
    CpuRequest,
    MemoryPlan,
    ResourceUpdateOp,
    VcpuPlan,
    VmSize,
    parse_cpuset,
    static_vm_size,
    vcpus_required,
    workload_size,
)


def test_pod_sandbox_is_sized_from_the_cri_annotations() -> None:
    spec = {
        "annotations": {
            CONTAINER_TYPE: "sandbox",
            SANDBOX_CPU_QUOTA: "220000",
            SANDBOX_CPU_PERIOD: "100000",
            SANDBOX_MEMORY: str(512 << 20),
        },
        # the pause container's own resources do not count
        "linux": {"resources": {"cpu": {"quota": 900000, "period": 100000}}},
    }
    assert workload_size(spec) == VmSize(3, 512)  # 2.2 CPUs round up
    assert static_vm_size(spec, 1, 2048) == VmSize(4, 2560)


def test_lone_container_is_sized_from_its_resources() -> None:
    """ctr run --cpus 2 --memory-limit 268435456."""
    spec = {
        "linux": {"resources": {"cpu": {"quota": 200000, "period": 100000}, "memory": {"limit": 268435456}}}
    }
    assert static_vm_size(spec, 1, 2048) == VmSize(3, 2304)


def test_nothing_asked_is_the_default_size() -> None:
    assert static_vm_size({}, 1, 2048) == VmSize(1, 2048)
    unlimited = {"linux": {"resources": {"cpu": {"quota": -1, "period": 100000}, "memory": {"limit": -1}}}}
    assert static_vm_size(unlimited, 1, 2048) == VmSize(1, 2048)
    garbage = {"annotations": {CONTAINER_TYPE: "sandbox", SANDBOX_CPU_QUOTA: "x", SANDBOX_MEMORY: "-5"}}
    assert static_vm_size(garbage, 2, 256) == VmSize(2, 256)


# --- dynamic sizing -------------------------------------------------------------------------------------


def test_cpu_request_rounds_the_quota_up_to_whole_vcpus() -> None:
    assert CpuRequest.from_oci({"quota": 150000, "period": 100000}).vcpus() == 2
    assert CpuRequest.from_oci({"quota": 1001, "period": 100}).vcpus() == 11  # kata-types' own example
    assert CpuRequest.from_oci({"quota": 100000, "period": 100000}).vcpus() == 1
    assert CpuRequest.from_oci({"quota": -1, "period": 100000}).vcpus() is None  # unconstrained
    assert CpuRequest.from_oci({"shares": 1024}).vcpus() is None
    assert CpuRequest.from_oci(None) == CpuRequest()


def test_cpusets_parse_and_count_only_without_any_quota() -> None:
    assert parse_cpuset("0-2, 5,") == {0, 1, 2, 5}
    for bad in ("2-1", "x", "0-99999", "-1"):
        with pytest.raises(ValueError):
            parse_cpuset(bad)
    only_sets = [CpuRequest(cpuset=frozenset({0, 1})), CpuRequest(cpuset=frozenset({1, 3}))]
    assert vcpus_required(only_sets) == 3
    assert vcpus_required([*only_sets, CpuRequest(200000, 100000)]) == 2  # a quota wins
    assert vcpus_required([]) == 0


def test_vcpu_plan_grows_with_containers_never_below_the_default_and_shrinks_on_removal() -> None:
    plan = VcpuPlan(default_vcpus=1)
    two = {"quota": 200000, "period": 100000}
    assert plan.update("a", {"shares": 2}, ResourceUpdateOp.ADD) is None  # nothing asked: stays at 1
    assert plan.update("b", two, ResourceUpdateOp.ADD) == 2
    plan.resized(2)
    assert plan.update("c", {"quota": 50000, "period": 100000}, ResourceUpdateOp.ADD) == 3  # ceil(0.5) = 1
    plan.resized(3)
    assert plan.update("b", {"quota": 400000, "period": 100000}, ResourceUpdateOp.UPDATE) == 5
    plan.resized(5)
    # an update with only a cpuset keeps b's quota
    assert plan.update("b", {"cpus": "0"}, ResourceUpdateOp.UPDATE) is None
    assert plan.requests["b"].quota == 400000
    assert plan.update("b", None, ResourceUpdateOp.DEL) == 1  # c's one, no less than the default
    plan.resized(1)
    assert plan.update("c", None, ResourceUpdateOp.DEL) is None  # 0 asked, default 1


def test_vcpu_plan_add_never_shrinks_and_del_never_grows() -> None:
    plan = VcpuPlan(default_vcpus=1, current=4)
    assert plan.update("a", {"quota": 100000, "period": 100000}, ResourceUpdateOp.ADD) is None
    assert plan.update("a", {"quota": 200000, "period": 100000}, ResourceUpdateOp.UPDATE) == 2
    plan = VcpuPlan(default_vcpus=2, current=1)
    plan.requests["x"] = CpuRequest(300000, 100000)
    assert plan.update("y", None, ResourceUpdateOp.DEL) is None
    with pytest.raises(ValueError):
        plan.update("z", {"cpus": "9-1"}, ResourceUpdateOp.ADD)
    assert "z" not in plan.requests


def test_memory_plan_follows_container_limits_and_never_goes_below_the_default() -> None:
    plan = MemoryPlan(256)
    assert plan.update("a", {"limit": 512 << 20}, ResourceUpdateOp.ADD) == 768
    plan.resized(768)
    assert plan.update("b", {}, ResourceUpdateOp.ADD) is None  # no limit: nothing to add
    assert plan.update("b", {"limit": (100 << 20) + 1}, ResourceUpdateOp.UPDATE) == 868
    plan.resized(868)
    assert plan.update("b", None, ResourceUpdateOp.UPDATE) is None  # no memory part: unchanged
    assert plan.update("b", {"limit": -1}, ResourceUpdateOp.UPDATE) is None  # no limit now: kept
    assert plan.update("a", None, ResourceUpdateOp.DEL) == 356
    plan.resized(356)
    assert plan.update("b", None, ResourceUpdateOp.DEL) == 256
    plan.resized(256)
    assert plan.update("zz", None, ResourceUpdateOp.DEL) is None


def test_memory_plan_add_never_shrinks_and_del_never_grows() -> None:
    plan = MemoryPlan(256, current=1024)  # e.g. the VM got more than asked (block rounding)
    assert plan.update("a", {"limit": 128 << 20}, ResourceUpdateOp.ADD) is None
    plan = MemoryPlan(256, current=128)
    assert plan.update("a", None, ResourceUpdateOp.DEL) is None
