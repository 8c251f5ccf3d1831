"""What the back-ends share: the kernel parameters every guest gets, the checks of their configuration, the
serial console sink, netns paths, virtio-blk names and the report on a late guest (the guest's run-able
time, `GuestClock`, is kata-sys-util's: the VMM uses it too)."""

from __future__ import annotations

import collections
import fnmatch
import logging
import os
import threading
import time
from pathlib import Path

from kata_shim._ratelimit import LineRateLimit
from kata_shim.hypervisor._base import Capabilities, HypervisorConfig, HypervisorError
from kata_shim.persist import sandbox_dir

BASE_CMDLINE = "console=ttyS0 reboot=k panic=1"
"""Kernel parameters every guest gets; `quiet` is added unless `enable_debug` (each console byte is a VM
exit, which costs ~1 ms under nested virtualisation), then `kernel_params` from the config."""
CONSOLE_TAIL_BYTES = 8192


class ConsoleSink:
    """Receives serial output on VMM threads: logs whole lines, keeps the last bytes for error messages.

    Lines are logged at most at `LineRateLimit`'s rate (the guest decides how much it prints); dropped
    lines are counted (``rate_limit.dropped``) and still reach the tail kept for error messages.
    """

    def __init__(
        self, logger: logging.Logger, limit: int = CONSOLE_TAIL_BYTES, rate_limit: LineRateLimit | None = None
    ) -> None:
        self._log = logger
        self._limit = limit
        self.rate_limit = rate_limit or LineRateLimit("guest console")
        self._tail: collections.deque[bytes] = collections.deque()
        self._tail_size = 0
        self._partial = bytearray()
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self._lock:
            self._tail.append(bytes(data))
            self._tail_size += len(data)
            while self._tail_size > self._limit and len(self._tail) > 1:
                self._tail_size -= len(self._tail.popleft())
            self._partial += data
            *done, rest = self._partial.split(b"\n")
            lines = [bytes(line) for line in done]
            self._partial = bytearray(rest)
            if len(self._partial) > self._limit:  # a guest that never ends a line
                lines.append(bytes(self._partial))
                self._partial.clear()
        for line in lines:
            if self.rate_limit.allow():
                self._log.info("guest console: %s", line.rstrip(b"\r").decode(errors="replace"))

    def tail(self, max_lines: int = 40) -> str:
        """The last console lines (at most ``max_lines``), for an error message."""
        with self._lock:
            text = b"".join(self._tail)[-self._limit :].decode(errors="replace")
        return "\n".join(text.replace("\r", "").splitlines()[-max_lines:])


def netns_path(netns: str) -> Path:
    """A netns given by name (as ``ip netns`` names them, under /run/netns) or by path."""
    return Path(netns) if netns.startswith("/") else Path("/run/netns") / netns


def boot_report(vcpu_tids: list[int], console_tail: str, started: float) -> str:
    """Why a guest may be late, for the error when its agent does not answer: the seconds since start, the
    host's load, the CPU seconds each vCPU thread used (near the wall time: the guest ran and is slow or
    stuck; near zero: it was starved or blocked), and the console's last lines."""
    tick = os.sysconf("SC_CLK_TCK")
    cpus = []
    for tid in vcpu_tids:
        try:
            fields = Path(f"/proc/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            cpus.append(f"{tid} gone")
            continue
        cpus.append(f"{tid} {(int(fields[11]) + int(fields[12])) / tick:.1f} s")
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    since = time.monotonic() - started
    lines = [
        f"{since:.0f} s since the VM started; host load {load} on {os.cpu_count()} CPUs; "
        f"vCPU threads' CPU time: {', '.join(cpus) or 'none known'}",
        f"guest console (last lines):\n{console_tail}" if console_tail else "the guest console is empty",
    ]
    return "\n".join(lines)


def matches(path: str, globs: list[str]) -> bool:
    """Whether ``path`` is allowed by upstream's ``valid_*_paths`` globs (an empty list allows any)."""
    return not globs or any(fnmatch.fnmatchcase(path, g) for g in globs)


def disk_letters(index: int) -> str:
    """0 -> a, 25 -> z, 26 -> aa (the kernel's virtio_blk naming)."""
    letters = ""
    index += 1
    while index > 0:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return letters


def check_vmm_binary(cfg: HypervisorConfig, name: str, binary: str) -> None:
    """An external back-end's VMM: configured, allowed by ``valid_hypervisor_paths``, executable."""
    if not cfg.path:
        raise HypervisorError(f"no {binary} binary configured ([hypervisor.{name}] path)")
    if not matches(cfg.path, cfg.valid_hypervisor_paths):
        raise HypervisorError(f"{name} path {cfg.path} is not in valid_hypervisor_paths")
    if not os.access(cfg.path, os.X_OK):
        raise HypervisorError(f"{binary} binary {cfg.path} not found or not executable")


def check_guest(cfg: HypervisorConfig, name: str, capabilities: Capabilities) -> None:
    """What every back-end needs of the guest: a kernel, a root filesystem (image or initrd) that exist, at
    least one vCPU and 64 MiB, a ``shared_fs`` the back-end serves and, for virtio-fs, an allowed daemon."""
    if cfg.kernel == Path():
        raise HypervisorError(f"no guest kernel configured ([hypervisor.{name}] kernel)")
    if not Path(cfg.kernel).is_file():
        raise HypervisorError(f"kernel {cfg.kernel} not found")
    for what, path in (("initrd", cfg.initrd), ("image", cfg.image)):
        if path is not None and not Path(path).is_file():
            raise HypervisorError(f"{what} {path} not found")
    if cfg.image is None and cfg.initrd is None:
        raise HypervisorError("neither image nor initrd configured: the guest has no root filesystem")
    if cfg.default_vcpus < 1:
        raise HypervisorError(f"default_vcpus must be at least 1, not {cfg.default_vcpus}")
    if cfg.default_memory < 64:
        raise HypervisorError(f"default_memory must be at least 64 MiB, not {cfg.default_memory}")
    if cfg.shared_fs not in capabilities.shared_fs | {"none", ""}:
        offered = ", ".join(sorted(capabilities.shared_fs)) or "none: capabilities().shared_fs is empty"
        raise HypervisorError(f"shared_fs {cfg.shared_fs!r} is not supported by {name} ({offered})")
    if cfg.shared_fs == "virtio-fs" and "inline-virtio-fs" not in capabilities.shared_fs:
        daemon = cfg.virtio_fs_daemon
        if not daemon:
            raise HypervisorError("shared_fs is virtio-fs but virtio_fs_daemon is not set")
        if not matches(daemon, cfg.valid_virtio_fs_daemon_paths):
            raise HypervisorError(f"virtio_fs_daemon {daemon} is not in valid_virtio_fs_daemon_paths")
        if not os.access(daemon, os.X_OK):
            raise HypervisorError(f"virtio_fs_daemon {daemon} not found or not executable")


def guest_cmdline(cfg: HypervisorConfig, *extra: str) -> str:
    """The guest kernel command line: `BASE_CMDLINE`, ``quiet`` unless debugging, the configured
    ``kernel_params``, then ``extra``."""
    parts = [BASE_CMDLINE]
    if not cfg.enable_debug:
        parts.append("quiet")
    if cfg.kernel_params.strip():
        parts.append(cfg.kernel_params.strip())
    return " ".join([*parts, *extra])


def make_state_dir(
    sandbox_id: str, state_root: Path | None, sockets: tuple[str, ...], *, room: int = 0, mode: int = 0o700
) -> Path:
    """Create the sandbox's state directory (/run/kata/<sandbox id>/) for the back-end's unix ``sockets``,
    which must fit in a socket path with ``room`` bytes to spare; `HypervisorError` otherwise."""
    try:
        state_dir = sandbox_dir(sandbox_id, state_root)
    except Exception as err:
        raise HypervisorError(str(err)) from err
    if max(len(str(state_dir / name)) for name in sockets) + room >= 108:
        raise HypervisorError(f"state directory {state_dir} is too long for a unix socket path")
    try:
        state_dir.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as err:
        raise HypervisorError(f"cannot create {state_dir}: {err.strerror}") from err
    return state_dir
