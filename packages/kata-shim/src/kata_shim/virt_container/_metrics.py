"""The agent's container stats as containerd's cgroups v1 Metrics (what `ctr task metrics` shows)."""

from __future__ import annotations

from typing import Any

from kata_agent_client import BLKIO_LISTS, ContainerStats, MemoryEntry
from kata_proto.containerd import cgroups_v1_metrics_pb2 as metrics_pb2

# memory.stat keys (cgroup v1) whose Metrics field is spelled differently; the rest keep their name.
_MEMORY_STAT_FIELDS = {
    "pgpgin": "pg_pg_in",
    "pgpgout": "pg_pg_out",
    "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault",
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
}


def _memory_field(key: str) -> str:
    if key.startswith("total_"):
        return "total_" + _MEMORY_STAT_FIELDS.get(key.removeprefix("total_"), key.removeprefix("total_"))
    return _MEMORY_STAT_FIELDS.get(key, key)


def _entry(dst: Any, src: MemoryEntry) -> None:
    dst.limit = src.limit
    dst.usage = src.usage
    dst.max = src.max_usage
    dst.failcnt = src.failcnt


def metrics_from_stats(stats: ContainerStats) -> metrics_pb2.Metrics:
    """The agent's ContainerStats as io.containerd.cgroups.v1.Metrics."""
    out = metrics_pb2.Metrics()
    for pagesize, h in sorted(stats.hugetlb.items()):
        out.hugetlb.add(usage=h.usage, max=h.max_usage, failcnt=h.failcnt, pagesize=pagesize)
    out.pids.current = stats.pids_current
    out.pids.limit = stats.pids_limit
    out.cpu.usage.total = stats.cpu_total_ns
    out.cpu.usage.kernel = stats.cpu_kernel_ns
    out.cpu.usage.user = stats.cpu_user_ns
    out.cpu.usage.per_cpu.extend(stats.cpu_per_cpu_ns)
    out.cpu.throttling.periods = stats.throttling_periods
    out.cpu.throttling.throttled_periods = stats.throttled_periods
    out.cpu.throttling.throttled_time = stats.throttled_time_ns
    out.memory.cache = stats.memory_cache
    usage = MemoryEntry(stats.memory_usage, stats.memory_max_usage, stats.memory_limit, stats.memory_failcnt)
    _entry(out.memory.usage, usage)
    _entry(out.memory.swap, stats.memory_swap)
    _entry(out.memory.kernel, stats.memory_kernel)
    known = {f.name for f in metrics_pb2.MemoryStat.DESCRIPTOR.fields}
    for key, value in stats.memory_stats.items():
        name = _memory_field(key)
        if name in known and name not in {"usage", "swap", "kernel", "kernel_tcp"}:
            setattr(out.memory, name, value)
    for name in BLKIO_LISTS:
        target = getattr(out.blkio, name)
        for e in stats.blkio.get(name, []):
            target.add(op=e.op, major=e.major, minor=e.minor, value=e.value)
    for n in stats.network:
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
