"""Guest-wide operations on /sys, /proc and files: plain functions (these never block for long)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import time
from collections.abc import Callable
from typing import Any

from kata_proto import ttrpc


def kernel_param(cmdline: str, name: str) -> str | None:
    """The value of ``name=VALUE`` on a kernel command line (the last one wins, as the kernel's own
    parsing does), None when absent."""
    value = None
    for word in cmdline.split():
        key, sep, found = word.partition("=")
        if sep and key == name:
            value = found
    return value


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


CPU_SYSFS = "/sys/devices/system/cpu"


def online_cpus(target: int, base: str | None = None) -> int:
    """Switch offline CPUs on, in name order, until ``target`` of them are online (0: every one); returns
    how many are online then (the boot CPU has no switch and counts). A CPU hot-added through ACPI shows up
    here only once the guest kernel has handled the event: a caller that needs it calls again."""
    base = base or CPU_SYSFS
    cpus = sorted(n for n in os.listdir(base) if re.fullmatch(r"cpu\d+", n)) if os.path.isdir(base) else []
    online = sum(1 for n in cpus if _read(os.path.join(base, n, "online"), "1") == "1")
    if target and online >= target:
        return online
    return online + _online_all(base, r"cpu\d+", "online", ("0", "1"), target - online if target else 0)


def _read(path: str, absent: str) -> str:
    """A sysfs attribute's text, ``absent`` when the file is not there."""
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return absent


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


RANDOM_DEVICE = "/dev/random"
# <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07)
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MAX_SEED_BYTES = 4096
"""The most ReseedRandomDev mixes in (the kernel's own write to /dev/random is not bounded; ours is)."""


def set_realtime(sec: int, usec: int) -> None:
    """SetGuestDateTime: CLOCK_REALTIME to `sec` seconds and `usec` microseconds after the epoch (upstream
    calls settimeofday with the same pair); exact to the nanosecond, no float in between."""
    if not 0 <= usec < 1_000_000:
        raise ttrpc.InvalidArgument(f"SetGuestDateTime: usec {usec} is not in 0..999999")
    if sec < 0:
        raise ttrpc.InvalidArgument(f"SetGuestDateTime: sec {sec} is before the epoch")
    time.clock_settime_ns(time.CLOCK_REALTIME, sec * 1_000_000_000 + usec * 1_000)


def reseed_random(
    data: bytes,
    device: str = RANDOM_DEVICE,
    ioctl: Callable[[int, int, bytes | int], object] | None = None,
) -> None:
    """ReseedRandomDev: mix `data` into the kernel's pool *and* credit it (RNDADDENTROPY, 8 bits a byte: the
    host drew it from its own CSPRNG), then RNDRESEEDCRNG so the next read of /dev/urandom or getrandom()
    comes from a key that includes it. Upstream writes the bytes to /dev/random and credits them with
    RNDADDTOENTCNT; RNDADDENTROPY does both in one call. A VM restored from a template shares the template's
    CRNG state until this runs."""
    if not data:
        raise ttrpc.InvalidArgument("ReseedRandomDev: no data")
    if len(data) > MAX_SEED_BYTES:
        raise ttrpc.InvalidArgument(f"ReseedRandomDev: {len(data)} bytes (at most {MAX_SEED_BYTES})")
    padded = data + b"\0" * (-len(data) % 4)  # struct rand_pool_info's buf is __u32[]
    info = struct.pack("ii", len(data) * 8, len(data)) + padded
    call: Callable[..., object] = ioctl if ioctl is not None else fcntl.ioctl
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        call(fd, RNDADDENTROPY, info)
        call(fd, RNDRESEEDCRNG, 0)
    finally:
        os.close(fd)
