"""What the pod asks of the host, read from the sandbox container's OCI spec.

The network namespace containerd or CNI made for the pod, the VM size (runtime-rs static sizing), the
host cgroup path, the limits of each container, and the guest network as the agent's types. Pure
functions: `VirtSandbox` does the work.
"""

from __future__ import annotations

import os
from typing import Any

from kata_agent_client import ARPNeighbor, Interface, Route
from kata_resources import CgroupLimits, Network, VmSize, static_vm_size
from kata_shim.hypervisor._base import HypervisorConfig


def _namespaces(spec: dict[str, Any]) -> list[dict[str, Any]]:
    linux = spec.get("linux") or {}
    return [ns for ns in linux.get("namespaces") or [] if isinstance(ns, dict)]


def pod_netns(spec: dict[str, Any]) -> str | None:
    """The path of the pod's network namespace (``linux.namespaces`` type network), None without one.

    A network namespace without a path is a new, empty one: nothing to connect, so no network either."""
    for ns in _namespaces(spec):
        if ns.get("type") == "network":
            path = ns.get("path") or ""
            return str(path) if path else None
    return None


def shares_sandbox_pidns(spec: dict[str, Any]) -> bool:
    """Whether a container joins the pod's PID namespace: CRI gives a container of a pod with
    ``shareProcessNamespace`` the sandbox's ``/proc/<pid>/ns/pid`` as its PID namespace path (a host
    path the guest cannot use: CreateContainer's ``sandbox_pidns`` says it instead, as runtime-rs does)."""
    return any(ns.get("type") == "pid" and ns.get("path") for ns in _namespaces(spec))


def cgroups_path(spec: dict[str, Any]) -> str:
    """``linux.cgroupsPath`` of the sandbox container (empty: the sandbox's default)."""
    return str((spec.get("linux") or {}).get("cgroupsPath") or "")


def container_limits(spec_or_resources: dict[str, Any] | None, *, resources: bool = False) -> CgroupLimits:
    """The CPU limits of a container's OCI spec (or of a LinuxResources object with ``resources``).

    Only CPU: the sandbox cgroup holds the VM's memory, which is the guest's whole RAM plus the VMM's
    own, so a memory limit summed from the containers would have the host OOM-kill the VMM (upstream
    leaves memory to the guest's cgroups too)."""
    if resources:
        res = spec_or_resources or {}
    else:
        res = ((spec_or_resources or {}).get("linux") or {}).get("resources") or {}
    limits = CgroupLimits.from_oci(res)
    return CgroupLimits(
        cpu_quota=limits.cpu_quota, cpu_period=limits.cpu_period, cpu_shares=limits.cpu_shares
    )


def vm_size(config: HypervisorConfig, spec: dict[str, Any]) -> VmSize:
    """The VM's size before boot: ``default_vcpus``/``default_memory`` plus what the pod asks
    (`kata_resources.static_vm_size`), vCPUs capped at ``default_maxvcpus`` (0: the host's CPUs)."""
    size = static_vm_size(spec, config.default_vcpus, config.default_memory)
    cap = config.default_maxvcpus or os.cpu_count() or 1
    return VmSize(max(1, min(size.vcpus, max(cap, config.default_vcpus))), size.memory_mib)


def guest_network(network: Network) -> tuple[list[Interface], list[Route], list[ARPNeighbor]]:
    """What the agent is told about ``network``: interfaces with a tap (model none has no guest NIC),
    and the routes and neighbours of those interfaces (kata-resources scans them as the client's types)."""
    connected = {e.veth for e in network.endpoints if e.tap}
    interfaces = [i for i in network.interfaces if i.name in connected]
    routes = [r for r in network.routes if r.device in connected]
    neighbors = [n for n in network.neighbors if n.device in connected]
    return interfaces, routes, neighbors
