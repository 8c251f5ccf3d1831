"""Static sandbox sizing: the VM's vCPUs and memory from what the pod asks, plus the configured base.

As upstream's ``static_sandbox_resource_mgmt``: the workload's size comes from the sandbox container's
CRI annotations (containerd writes the pod's summed CPU quota/period and memory limit there) or, for a
lone container without them (``ctr run --cpus 2 --memory-limit ...``), from its own OCI
``linux.resources``. vCPUs are the quota over the period rounded up, memory the limit in whole MiB; both
are *added* to ``default_vcpus``/``default_memory`` (the guest kernel and agent's share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: The CRI annotations containerd sets on the sandbox container.
CONTAINER_TYPE = "io.kubernetes.cri.container-type"
SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"


@dataclass(frozen=True)
class VmSize:
    """vCPUs and memory (MiB) the VM boots with."""

    vcpus: int
    memory_mib: int


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _vcpus(quota: int, period: int) -> int:
    return math.ceil(quota / period) if quota > 0 and period > 0 else 0


def _mib(limit: int) -> int:
    return limit // (1 << 20) if limit > 0 else 0


def workload_size(spec: dict[str, Any]) -> VmSize:
    """What the workload of the sandbox container's OCI ``spec`` asks for (zeros when nothing is set)."""
    annotations = spec.get("annotations") or {}
    if annotations.get(CONTAINER_TYPE) == "sandbox":
        quota, period = _int(annotations.get(SANDBOX_CPU_QUOTA)), _int(annotations.get(SANDBOX_CPU_PERIOD))
        return VmSize(_vcpus(quota, period), _mib(_int(annotations.get(SANDBOX_MEMORY))))
    resources = (spec.get("linux") or {}).get("resources") or {}
    cpu, memory = resources.get("cpu") or {}, resources.get("memory") or {}
    return VmSize(_vcpus(_int(cpu.get("quota")), _int(cpu.get("period"))), _mib(_int(memory.get("limit"))))


def static_vm_size(spec: dict[str, Any], default_vcpus: int, default_memory_mib: int) -> VmSize:
    """The VM size: ``default_vcpus``/``default_memory_mib`` plus `workload_size`."""
    work = workload_size(spec)
    return VmSize(default_vcpus + work.vcpus, default_memory_mib + work.memory_mib)
