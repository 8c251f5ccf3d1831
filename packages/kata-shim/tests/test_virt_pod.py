"""What VirtSandbox reads from the sandbox container's OCI spec (issue 14): netns, VM size, cgroup
limits, PID namespace sharing, and the guest network as the agent's types. No root."""

from __future__ import annotations

import os
from typing import Any

from kata_agent_client import ARPNeighbor, Interface, IPAddress, Route
from kata_resources import (
    CgroupLimits,
    Endpoint,
    InterfaceSpec,
    IPAddressSpec,
    NeighborSpec,
    Network,
    NetworkModel,
    RouteSpec,
)
from kata_shim.hypervisor import HypervisorConfig
from kata_shim.virt_container._pod import (
    cgroups_path,
    container_limits,
    guest_network,
    pod_netns,
    shares_sandbox_pidns,
    vm_size,
)


def _spec(namespaces: list[dict[str, str]], **linux: Any) -> dict[str, Any]:
    return {"linux": {"namespaces": namespaces, **linux}}


def test_pod_netns_is_the_network_namespace_path_or_none() -> None:
    assert pod_netns(_spec([{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}])) == (
        "/var/run/netns/cni-1"
    )
    assert pod_netns(_spec([{"type": "network"}])) is None  # a new, empty netns: nothing to connect
    assert pod_netns(_spec([{"type": "pid"}])) is None
    assert pod_netns({}) is None


def test_a_container_shares_the_pod_pidns_when_cri_gives_it_a_path() -> None:
    assert shares_sandbox_pidns(_spec([{"type": "pid", "path": "/proc/42/ns/pid"}]))
    assert not shares_sandbox_pidns(_spec([{"type": "pid"}]))  # ctr run, or CRI's default: its own
    assert not shares_sandbox_pidns(_spec([]))


def test_cgroups_path_and_cpu_only_limits() -> None:
    assert cgroups_path(_spec([], cgroupsPath="/default/c1")) == "/default/c1"
    assert cgroups_path({}) == ""
    resources = {"cpu": {"quota": 50_000, "period": 100_000, "shares": 512}, "memory": {"limit": 1 << 30}}
    limits = container_limits(_spec([], resources=resources))
    # the VM's memory is guest RAM plus the VMM: a summed container memory limit would OOM-kill the VMM
    assert limits == CgroupLimits(cpu_quota=50_000, cpu_period=100_000, cpu_shares=512)
    assert container_limits(resources, resources=True) == limits
    assert container_limits(None, resources=True) == CgroupLimits()


def test_vm_size_adds_the_pod_to_the_defaults_and_caps_vcpus() -> None:
    config = HypervisorConfig(default_vcpus=1, default_memory=512, default_maxvcpus=2)
    ctr = _spec([], resources={"cpu": {"quota": 150_000, "period": 100_000}, "memory": {"limit": 256 << 20}})
    size = vm_size(config, ctr)
    assert (size.vcpus, size.memory_mib) == (2, 768)  # 1 + 2 vCPUs capped at default_maxvcpus
    annotated = {
        "annotations": {
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-cpu-quota": "100000",
            "io.kubernetes.cri.sandbox-cpu-period": "100000",
            "io.kubernetes.cri.sandbox-memory": str(512 << 20),
        }
    }
    assert vm_size(config, annotated) == type(size)(2, 1024)
    assert vm_size(config, {}) == type(size)(1, 512)
    uncapped = HypervisorConfig(default_vcpus=1, default_memory=512, default_maxvcpus=0)
    assert vm_size(uncapped, ctr).vcpus == min(3, os.cpu_count() or 1)


def test_guest_network_tells_the_agent_about_connected_endpoints_only() -> None:
    network = Network(
        "/var/run/netns/x",
        NetworkModel.TCFILTER,
        endpoints=[
            Endpoint(0, "eth0", "02:00:00:00:00:01", 1500, "tap0_kata"),
            Endpoint(1, "eth1", "m", 1500),
        ],
        interfaces=[
            InterfaceSpec("eth0", "02:00:00:00:00:01", 1500, [IPAddressSpec("10.0.0.2", 24)]),
            InterfaceSpec("eth1", "m", 1500),
        ],
        routes=[RouteSpec("", "10.0.0.1", "eth0"), RouteSpec("10.1.0.0/16", "", "eth1")],
        neighbors=[NeighborSpec("10.0.0.9", "02:00:00:00:00:09", "eth0")],
    )
    interfaces, routes, neighbors = guest_network(network)
    assert interfaces == [
        Interface("eth0", "02:00:00:00:00:01", mtu=1500, addresses=[IPAddress("10.0.0.2", 24)])
    ]
    assert routes == [Route("", "10.0.0.1", "eth0")]
    assert neighbors == [ARPNeighbor("10.0.0.9", "02:00:00:00:00:09", "eth0")]


def test_the_network_specs_are_the_agent_clients_types() -> None:
    # One home (kata_proto.network): what kata-resources scans is what the client sends, no mapping between.
    import kata_agent_client
    import kata_resources

    assert kata_resources.InterfaceSpec is kata_agent_client.Interface
    assert kata_resources.IPAddressSpec is kata_agent_client.IPAddress
    assert kata_resources.RouteSpec is kata_agent_client.Route
    assert kata_resources.NeighborSpec is kata_agent_client.ARPNeighbor
