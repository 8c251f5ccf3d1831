"""Sandbox sizing: the VM's vCPUs and memory from what the pod asks, plus the configured base.

Static (upstream's ``static_sandbox_resource_mgmt = true``): the workload's size comes from the sandbox
container's CRI annotations (containerd writes the pod's summed CPU quota/period and memory limit
there) or, for a lone container without them (``ctr run --cpus 2 --memory-limit ...``), from its own OCI
``linux.resources``. vCPUs are the quota over the period rounded up, memory the limit in whole MiB; both
are *added* to ``default_vcpus``/``default_memory`` (the guest kernel and agent's share).

Dynamic (``false``, runtime-rs's resource manager, `VcpuPlan`): the VM boots with ``default_vcpus`` and
follows its containers' CPU quotas: each container needs ceil(quota/period) vCPUs, the pod their sum (or
its cpusets' CPU count when no container has a quota), never fewer than ``default_vcpus``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
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


# --- dynamic sizing (static_sandbox_resource_mgmt = false) ----------------------------------------------

#: The highest CPU id a cpuset may name (Linux's NR_CPUS limit is 8192).
MAX_CPU_ID = 8191


class ResourceUpdateOp(enum.Enum):
    """Why a container's resources change (runtime-rs ``ResourceUpdateOp``)."""

    ADD = "add"
    """The container is being created."""
    UPDATE = "update"
    """Task.Update."""
    DEL = "del"
    """The container is gone."""


def parse_cpuset(text: str) -> frozenset[int]:
    """The CPU ids of a cpuset list (``"0-2,5"``); ``ValueError`` for anything else or ids past
    `MAX_CPU_ID`."""
    ids: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, sep, high = part.partition("-")
        first, last = int(low), int(high) if sep else int(low)
        if not 0 <= first <= last <= MAX_CPU_ID:
            raise ValueError(f"cpuset {text!r}: bad range {part!r}")
        ids.update(range(first, last + 1))
    return frozenset(ids)


@dataclass(frozen=True)
class CpuRequest:
    """What one container's OCI ``linux.resources.cpu`` asks of the VM (kata-types
    ``LinuxContainerCpuResources``): a CFS quota over a period, and a cpuset."""

    quota: int = -1
    period: int = 0
    cpuset: frozenset[int] = frozenset()

    @classmethod
    def from_oci(cls, cpu: Mapping[str, Any] | None) -> CpuRequest:
        """From ``linux.resources.cpu`` (absent fields: unconstrained); ``ValueError`` for a bad cpuset."""
        cpu = cpu or {}
        quota = _int(cpu.get("quota")) if cpu.get("quota") is not None else -1
        return cls(quota, max(0, _int(cpu.get("period"))), parse_cpuset(str(cpu.get("cpus") or "")))

    def vcpus(self) -> int | None:
        """vCPUs the quota needs: quota/period in milli-vCPUs, rounded up to whole vCPUs (1.5 -> 2); None
        when unconstrained (quota -1 or no period)."""
        if self.quota < 0 or self.period == 0:
            return None
        millis = self.quota * 1000 // self.period
        return (millis + 999) // 1000


def vcpus_required(requests: Iterable[CpuRequest]) -> int:
    """The vCPUs a pod's containers need together: the sum of each one's `CpuRequest.vcpus`; when no
    container has a quota, the number of CPUs their cpusets name (0: nothing asked)."""
    total = 0
    cpus: set[int] = set()
    for request in requests:
        total += request.vcpus() or 0
        cpus |= request.cpuset
    return total if total or not cpus else len(cpus)


class VcpuPlan:
    """The VM's vCPU count as containers come, change and go (runtime-rs ``CpuResource``): `update` says
    what to resize the VM to, the caller resizes and reports back with `resized`.

    Never below ``default_vcpus`` (computing power is not taken away); a new container never shrinks the
    VM and a removed one never grows it; an update that drops a quota but keeps a cpuset keeps the quota.
    """

    def __init__(self, default_vcpus: int, current: int | None = None) -> None:
        self.default_vcpus = default_vcpus
        self.current = default_vcpus if current is None else current
        """vCPUs the VM runs now."""
        self.requests: dict[str, CpuRequest] = {}

    def update(self, container_id: str, cpu: Mapping[str, Any] | None, op: ResourceUpdateOp) -> int | None:
        """Record the container's ``linux.resources.cpu`` (None: unchanged; DEL forgets it) and return the
        vCPU count to resize to, or None when the VM stays as it is. ``ValueError`` for a bad cpuset
        (nothing recorded then)."""
        if op is ResourceUpdateOp.DEL:
            self.requests.pop(container_id, None)
        elif cpu is not None:
            request = CpuRequest.from_oci(cpu)
            old = self.requests.get(container_id)
            if op is ResourceUpdateOp.UPDATE and old is not None and old.quota > 0 and request.quota < 0:
                request = old  # a quota outranks a cpuset: a cpuset-only update does not drop it
            self.requests[container_id] = request
        required = vcpus_required(self.requests.values())
        if required == self.current:
            return None
        if (op is ResourceUpdateOp.ADD and self.current > required) or (
            op is ResourceUpdateOp.DEL and self.current < required
        ):
            return None
        target = max(required, self.default_vcpus)
        return None if target == self.current else target

    def resized(self, vcpus: int) -> None:
        """The VM now runs ``vcpus``."""
        self.current = vcpus


class MemoryPlan:
    """The VM's memory as containers come, change and go (runtime-rs ``MemResource``): ``default_mib`` plus
    the sum of the containers' memory limits (``linux.resources.memory.limit``, whole MiB; a container
    without one adds nothing). `update` says what to resize the VM to, the caller resizes and reports the
    size it got with `resized`.

    Never below ``default_mib``; a new container never shrinks the VM and a removed one never grows it; an
    update without a memory part (or without a limit) keeps the container's limit.
    """

    def __init__(self, default_mib: int, current: int | None = None) -> None:
        self.default_mib = default_mib
        self.current = default_mib if current is None else current
        """MiB the VM has now."""
        self.requests: dict[str, int] = {}
        """MiB limit of each container that has one."""

    def update(self, container_id: str, memory: Mapping[str, Any] | None, op: ResourceUpdateOp) -> int | None:
        """Record the container's ``linux.resources.memory`` (None: unchanged; DEL forgets it) and return
        the MiB to resize to, or None when the VM stays as it is."""
        if op is ResourceUpdateOp.DEL:
            self.requests.pop(container_id, None)
        elif memory is not None:
            limit = _mib(_int(memory.get("limit")))
            if limit:
                self.requests[container_id] = limit
            elif op is ResourceUpdateOp.ADD:
                self.requests.pop(container_id, None)
        target = self.default_mib + sum(self.requests.values())
        if target == self.current:
            return None
        if (op is ResourceUpdateOp.ADD and self.current > target) or (
            op is ResourceUpdateOp.DEL and self.current < target
        ):
            return None
        return target

    def resized(self, mib: int) -> None:
        """The VM now has ``mib`` MiB."""
        self.current = mib
