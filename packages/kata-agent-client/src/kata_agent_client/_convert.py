"""Translation between the client's dataclasses and the agent protobuf messages (the edge)."""

from __future__ import annotations

from kata_agent_client._types import (
    BLKIO_LISTS,
    BlkioEntry,
    ContainerSpec,
    ContainerStats,
    HugetlbStats,
    MemoryEntry,
    NetworkStats,
    Process,
    Resources,
    Storage,
)
from kata_proto.agent import agent_pb2, oci_pb2, types_pb2
from kata_proto.network import ARPNeighbor, Interface, IPAddress, Route


def _family(v: int) -> types_pb2.IPFamily:
    return types_pb2.IPFamily.v6 if v == 6 else types_pb2.IPFamily.v4


def process_pb(p: Process) -> oci_pb2.Process:
    """oci.Process from a Process."""
    msg = oci_pb2.Process(Args=list(p.args), Env=list(p.env), Cwd=p.cwd, Terminal=p.terminal)
    msg.User.UID = p.uid
    msg.User.GID = p.gid
    msg.NoNewPrivileges = p.no_new_privileges
    if p.console_rows or p.console_columns:
        msg.ConsoleSize.Height = p.console_rows
        msg.ConsoleSize.Width = p.console_columns
    return msg


def _resources_into(msg: oci_pb2.LinuxResources, r: Resources | ContainerSpec) -> None:
    if r.memory_limit:
        msg.Memory.Limit = r.memory_limit
    if r.cpu_shares:
        msg.CPU.Shares = r.cpu_shares
    if r.cpu_quota:
        msg.CPU.Quota = r.cpu_quota
    if r.cpu_period:
        msg.CPU.Period = r.cpu_period
    if r.pids_limit:
        msg.Pids.Limit = r.pids_limit


def resources_pb(r: Resources) -> oci_pb2.LinuxResources:
    """oci.LinuxResources from Resources."""
    msg = oci_pb2.LinuxResources()
    _resources_into(msg, r)
    return msg


def spec_pb(spec: ContainerSpec) -> oci_pb2.Spec:
    """oci.Spec from a ContainerSpec."""
    msg = oci_pb2.Spec(Version="1.0.2", Hostname=spec.hostname)
    msg.Process.CopyFrom(process_pb(spec.process))
    msg.Root.Path = spec.root
    msg.Root.Readonly = spec.readonly_root
    for m in spec.mounts:
        msg.Mounts.add(destination=m.destination, type=m.type, source=m.source, options=list(m.options))
    msg.Annotations.update(spec.annotations)
    linux = msg.Linux
    _resources_into(linux.Resources, spec)
    linux.CgroupsPath = spec.cgroups_path
    for ns in spec.namespaces:
        linux.Namespaces.add(Type=ns)
    linux.MaskedPaths.extend(spec.masked_paths)
    linux.ReadonlyPaths.extend(spec.readonly_paths)
    return msg


def storage_pb(s: Storage) -> agent_pb2.Storage:
    """grpc.Storage from a Storage."""
    return agent_pb2.Storage(
        driver=s.driver,
        driver_options=list(s.driver_options),
        source=s.source,
        fstype=s.fstype,
        options=list(s.options),
        mount_point=s.mount_point,
    )


def interface_pb(i: Interface) -> types_pb2.Interface:
    """types.Interface from an Interface."""
    msg = types_pb2.Interface(device=i.device, name=i.name, mtu=i.mtu, hwAddr=i.hw_addr, type=i.type)
    for a in i.addresses:
        msg.IPAddresses.add(family=_family(a.family), address=a.address, mask=str(a.prefix))
    return msg


def interface_from_pb(msg: types_pb2.Interface) -> Interface:
    """An Interface from types.Interface."""
    return Interface(
        name=msg.name,
        hw_addr=msg.hwAddr,
        device=msg.device,
        mtu=msg.mtu,
        addresses=[
            IPAddress(a.address, int(a.mask or 0), 6 if a.family == types_pb2.IPFamily.v6 else 4)
            for a in msg.IPAddresses
        ],
        type=msg.type,
        raw_flags=msg.raw_flags,
    )


def route_pb(r: Route) -> types_pb2.Route:
    """types.Route from a Route."""
    return types_pb2.Route(
        dest=r.dest,
        gateway=r.gateway,
        device=r.device,
        source=r.source,
        scope=r.scope,
        family=_family(r.family),
    )


def route_from_pb(msg: types_pb2.Route) -> Route:
    """A Route from types.Route."""
    family = 6 if msg.family == types_pb2.IPFamily.v6 else 4
    return Route(msg.dest, msg.gateway, msg.device, msg.source, msg.scope, family)


def neighbor_pb(n: ARPNeighbor) -> types_pb2.ARPNeighbor:
    """types.ARPNeighbor from an ARPNeighbor."""
    msg = types_pb2.ARPNeighbor(device=n.device, lladdr=n.lladdr, state=n.state)
    msg.toIPAddress.address = n.address
    msg.toIPAddress.family = _family(6 if ":" in n.address else 4)
    return msg


def stats_from_pb(msg: agent_pb2.StatsContainerResponse) -> ContainerStats:
    """ContainerStats from a StatsContainerResponse."""
    c = msg.cgroup_stats
    mem = c.memory_stats
    cpu = c.cpu_stats.cpu_usage
    throttling = c.cpu_stats.throttling_data
    return ContainerStats(
        memory_usage=mem.usage.usage,
        memory_max_usage=mem.usage.max_usage,
        memory_limit=mem.usage.limit,
        memory_cache=mem.cache,
        cpu_total_ns=cpu.total_usage,
        cpu_user_ns=cpu.usage_in_usermode,
        cpu_kernel_ns=cpu.usage_in_kernelmode,
        pids_current=c.pids_stats.current,
        pids_limit=c.pids_stats.limit,
        memory_stats=dict(mem.stats),
        memory_failcnt=mem.usage.failcnt,
        memory_swap=_memory_entry(mem.swap_usage),
        memory_kernel=_memory_entry(mem.kernel_usage),
        cpu_per_cpu_ns=list(cpu.percpu_usage),
        throttling_periods=throttling.periods,
        throttled_periods=throttling.throttled_periods,
        throttled_time_ns=throttling.throttled_time,
        hugetlb={
            size: HugetlbStats(h.usage, h.max_usage, h.failcnt) for size, h in sorted(c.hugetlb_stats.items())
        },
        blkio={
            name: [BlkioEntry(e.op, e.major, e.minor, e.value) for e in getattr(c.blkio_stats, name)]
            for name in BLKIO_LISTS
        },
        network=[
            NetworkStats(
                n.name,
                n.rx_bytes,
                n.rx_packets,
                n.rx_errors,
                n.rx_dropped,
                n.tx_bytes,
                n.tx_packets,
                n.tx_errors,
                n.tx_dropped,
            )
            for n in msg.network_stats
        ],
    )


def _memory_entry(m: agent_pb2.MemoryData) -> MemoryEntry:
    return MemoryEntry(m.usage, m.max_usage, m.limit, m.failcnt)
