"""Guest-wide operations on /sys, /proc and files: plain functions (these never block for long)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from kata_proto import ttrpc


def write_json(path: str, obj: Any) -> None:
    """Write `obj` as JSON to `path` (bundle files on the guest's tmpfs)."""
    with open(path, "w") as f:
        json.dump(obj, f)


def read_pid(path: str) -> int:
    """The pid a runtime wrote to its --pid-file."""
    with open(path) as f:
        return int(f.read().strip())


def is_dir(path: str) -> bool:
    """os.path.isdir, for use from async handlers."""
    return os.path.isdir(path)


def write_resolv_conf(lines: list[str]) -> None:
    """/etc/resolv.conf from CreateSandbox's dns lines."""
    with open("/etc/resolv.conf", "w") as f:
        f.writelines(f"{line}\n" for line in lines)


def online_cpus(limit: int, base: str = "/sys/devices/system/cpu") -> int:
    """Bring offline CPUs online (at most `limit`, 0 = all); returns how many."""
    return _online_all(base, r"cpu\d+", "online", ("0", "1"), limit)


def online_memory(base: str = "/sys/devices/system/memory") -> int:
    """Online every offline memory block; returns how many."""
    return _online_all(base, r"memory\d+", "state", ("offline", "online"))


def _online_all(base: str, pattern: str, attr: str, off_on: tuple[str, str], limit: int = 0) -> int:
    """Write `on` to `<base>/<entry>/<attr>` of each entry named `pattern` whose attr reads `off`, in name
    order, at most `limit` (0 = all); returns how many (the sysfs hotplug switches of CPUs and memory)."""
    off, on = off_on
    count = 0
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        if limit and count >= limit:
            break
        path = os.path.join(base, name, attr)
        if not re.fullmatch(pattern, name) or not os.path.exists(path):
            continue
        with open(path) as f:
            if f.read().strip() != off:
                continue
        with open(path, "w") as f:
            f.write(on)
        count += 1
    return count


def memory_block_size() -> int:
    """The memory hotplug block size in bytes (0 when the guest has no memory hotplug)."""
    try:
        with open("/sys/devices/system/memory/block_size_bytes") as f:
            return int(f.read().strip(), 16)
    except OSError:
        return 0


def has_memory_probe() -> bool:
    """True when the guest kernel offers /sys/devices/system/memory/probe."""
    return os.path.exists("/sys/devices/system/memory/probe")


def copy_file(base: str, req: Any) -> None:
    """CopyFile: write one chunk at its offset under `base`; InvalidArgument for a path outside it."""
    base = os.path.realpath(base)
    path = os.path.realpath(req.path)
    if not path.startswith(base + os.sep):
        raise ttrpc.InvalidArgument(f"CopyFile path {req.path!r} is outside {base}")
    os.makedirs(os.path.dirname(path), mode=req.dir_mode or 0o755, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, req.file_mode or 0o644)
    try:
        os.pwrite(fd, req.data, req.offset)
        if req.offset + len(req.data) >= req.file_size:
            os.ftruncate(fd, req.file_size)
        os.fchmod(fd, req.file_mode or 0o644)
        os.fchown(fd, req.uid, req.gid)
    finally:
        os.close(fd)


def rss_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
