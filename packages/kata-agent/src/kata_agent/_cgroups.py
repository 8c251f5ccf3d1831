"""Reading a container's cgroup (v1 or v2): stats for StatsContainer and OOM kill counters."""

from __future__ import annotations

import os

CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_paths(pid: int) -> dict[str, str]:
    """Map controller name -> directory of `pid`'s cgroup; the v2 unified one is under key ""."""
    paths: dict[str, str] = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if not controllers:
                paths[""] = os.path.join(CGROUP_ROOT, "unified", path.lstrip("/"))
                if not os.path.isdir(paths[""]):
                    paths[""] = os.path.join(CGROUP_ROOT, path.lstrip("/"))
                continue
            for raw in controllers.split(","):
                paths[raw.removeprefix("name=")] = os.path.join(
                    CGROUP_ROOT, controllers.removeprefix("name="), path.lstrip("/")
                )
    return paths


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return 0
    if text == "max":
        return 0
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return 0


def _read_kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    out[parts[0]] = int(parts[1])
    except OSError:
        pass
    return out


def _v1(paths: dict[str, str], controller: str) -> str | None:
    path = paths.get(controller)
    return path if path and os.path.isdir(path) else None


def _v2(paths: dict[str, str], filename: str) -> str | None:
    path = paths.get("")
    return path if path and os.path.exists(os.path.join(path, filename)) else None


def fill_stats(paths: dict[str, str], stats: object) -> None:
    """Fill a `grpc.CgroupStats` message from the cgroup files."""
    mem = stats.memory_stats  # type: ignore[attr-defined]
    cpu = stats.cpu_stats.cpu_usage  # type: ignore[attr-defined]
    pids = stats.pids_stats  # type: ignore[attr-defined]
    if (d := _v1(paths, "memory")) is not None:
        mem.usage.usage = _read_int(f"{d}/memory.usage_in_bytes")
        mem.usage.max_usage = _read_int(f"{d}/memory.max_usage_in_bytes")
        mem.usage.failcnt = _read_int(f"{d}/memory.failcnt")
        mem.usage.limit = _read_int(f"{d}/memory.limit_in_bytes")
        mem.use_hierarchy = _read_int(f"{d}/memory.use_hierarchy") == 1
        kv = _read_kv(f"{d}/memory.stat")
        mem.cache = kv.get("cache", 0)
        mem.stats.update(kv)
    elif (d := _v2(paths, "memory.current")) is not None:
        mem.usage.usage = _read_int(f"{d}/memory.current")
        mem.usage.limit = _read_int(f"{d}/memory.max")
        kv = _read_kv(f"{d}/memory.stat")
        mem.cache = kv.get("file", 0)
        mem.stats.update(kv)
    if (d := _v1(paths, "cpuacct")) is not None:
        cpu.total_usage = _read_int(f"{d}/cpuacct.usage")
        kv = _read_kv(f"{d}/cpuacct.stat")
        tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        cpu.usage_in_usermode = kv.get("user", 0) * tick
        cpu.usage_in_kernelmode = kv.get("system", 0) * tick
    elif (d := _v2(paths, "cpu.stat")) is not None:
        kv = _read_kv(f"{d}/cpu.stat")
        cpu.total_usage = kv.get("usage_usec", 0) * 1000
        cpu.usage_in_usermode = kv.get("user_usec", 0) * 1000
        cpu.usage_in_kernelmode = kv.get("system_usec", 0) * 1000
    if (d := _v1(paths, "pids")) is not None or (d := _v2(paths, "pids.current")) is not None:
        pids.current = _read_int(f"{d}/pids.current")
        pids.limit = _read_int(f"{d}/pids.max")


def oom_kills(paths: dict[str, str]) -> int:
    """How many processes the kernel's OOM killer took from this cgroup so far."""
    if (d := _v1(paths, "memory")) is not None:
        return _read_kv(f"{d}/memory.oom_control").get("oom_kill", 0)
    if (d := _v2(paths, "memory.events")) is not None:
        return _read_kv(f"{d}/memory.events").get("oom_kill", 0)
    return 0
