"""Static sandbox sizing from CRI annotations or the lone container's resources."""

from __future__ import annotations

from kata_resources import (
    CONTAINER_TYPE,
    SANDBOX_CPU_PERIOD,
    SANDBOX_CPU_QUOTA,
    SANDBOX_MEMORY,
    VmSize,
    static_vm_size,
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
