"""The agent's StatsContainerResponse as containerd's cgroups v1 Metrics (what `ctr task metrics` shows)."""

from __future__ import annotations

from typing import Any

from kata_proto.containerd import cgroups_v1_metrics_pb2 as metrics_pb2

# memory.stat keys (cgroup v1) whose Metrics field is spelled differently; the rest keep their name.
_MEMORY_STAT_FIELDS = {
    "pgpgin": "pg_pg_in",
    "pgpgout": "pg_pg_out",
    "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault",
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
}
_BLKIO_LISTS = (
    "io_service_bytes_recursive",
    "io_serviced_recursive",
    "io_queued_recursive",
    "io_service_time_recursive",
    "io_wait_time_recursive",
    "io_merged_recursive",
    "io_time_recursive",
    "sectors_recursive",
)


def _memory_field(key: str) -> str:
    if key.startswith("total_"):
        return "total_" + _MEMORY_STAT_FIELDS.get(key.removeprefix("total_"), key.removeprefix("total_"))
    return _MEMORY_STAT_FIELDS.get(key, key)


def _entry(dst: Any, src: Any) -> None:
    dst.limit = src.limit
    dst.usage = src.usage
    dst.max = src.max_usage
    dst.failcnt = src.failcnt


def metrics_from_stats(resp: Any) -> metrics_pb2.Metrics:
    """Translate a grpc.StatsContainerResponse into io.containerd.cgroups.v1.Metrics."""
    out = metrics_pb2.Metrics()
    c = resp.cgroup_stats
    for pagesize, h in sorted(c.hugetlb_stats.items()):
        out.hugetlb.add(usage=h.usage, max=h.max_usage, failcnt=h.failcnt, pagesize=pagesize)
    out.pids.current = c.pids_stats.current
    out.pids.limit = c.pids_stats.limit
    cpu = c.cpu_stats
    out.cpu.usage.total = cpu.cpu_usage.total_usage
    out.cpu.usage.kernel = cpu.cpu_usage.usage_in_kernelmode
    out.cpu.usage.user = cpu.cpu_usage.usage_in_usermode
    out.cpu.usage.per_cpu.extend(cpu.cpu_usage.percpu_usage)
    out.cpu.throttling.periods = cpu.throttling_data.periods
    out.cpu.throttling.throttled_periods = cpu.throttling_data.throttled_periods
    out.cpu.throttling.throttled_time = cpu.throttling_data.throttled_time
    mem = c.memory_stats
    out.memory.cache = mem.cache
    _entry(out.memory.usage, mem.usage)
    _entry(out.memory.swap, mem.swap_usage)
    _entry(out.memory.kernel, mem.kernel_usage)
    known = {f.name for f in metrics_pb2.MemoryStat.DESCRIPTOR.fields}
    for key, value in mem.stats.items():
        name = _memory_field(key)
        if name in known and name not in {"usage", "swap", "kernel", "kernel_tcp"}:
            setattr(out.memory, name, value)
    for name in _BLKIO_LISTS:
        target = getattr(out.blkio, name)
        for e in getattr(c.blkio_stats, name):
            target.add(op=e.op, major=e.major, minor=e.minor, value=e.value)
    for n in resp.network_stats:
        out.network.add(
            name=n.name,
            rx_bytes=n.rx_bytes,
            rx_packets=n.rx_packets,
            rx_errors=n.rx_errors,
            rx_dropped=n.rx_dropped,
            tx_bytes=n.tx_bytes,
            tx_packets=n.tx_packets,
            tx_errors=n.tx_errors,
            tx_dropped=n.tx_dropped,
        )
    return out
