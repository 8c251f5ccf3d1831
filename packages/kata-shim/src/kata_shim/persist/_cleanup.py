"""Undo what a sandbox left on the host, from its state.json and its directory (after a crash too)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from kata_shim.persist._state import SandboxState, StateStore, process_start_time, sandbox_dir

log = logging.getLogger("kata_shim.persist")

MNT_DETACH = 2
MOUNTS_FILE = "mounts.json"
"""<sandbox dir>/mounts.json: the container abstraction's mount ledger (a JSON list, oldest first)."""


@dataclass
class CleanupReport:
    """What `cleanup_sandbox` did (and what it could not do)."""

    killed: list[int] = field(default_factory=list)
    unmounted: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def mounts_below(directory: Path) -> list[str]:
    """Mount points at or below `directory`, deepest first (from /proc/self/mountinfo)."""
    prefix = str(directory).rstrip("/")
    points: list[str] = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = _unescape(line.split()[4])
                if point == prefix or point.startswith(prefix + "/"):
                    points.append(point)
    except OSError:
        return []
    return sorted(set(points), key=lambda p: (p.count("/"), len(p)), reverse=True)


def _unescape(field_: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return field_.encode().decode("unicode_escape") if "\\" in field_ else field_


def _umount(point: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.umount2(point.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), point)


def _kill(pid: int, start_time: int | None) -> bool:
    """SIGKILL `pid` if it is still the process recorded (same start time); True if signalled."""
    if pid <= 1 or pid == os.getpid():
        return False
    now = process_start_time(pid)
    if now is None or (start_time is not None and now != start_time):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        return True
    return False


def _ledger(directory: Path) -> list[str]:
    try:
        entries = json.loads((directory / MOUNTS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [e for e in reversed(entries) if isinstance(e, str)] if isinstance(entries, list) else []


def cleanup_sandbox(
    sandbox_id: str, store: StateStore | None = None, *, kill_shim: bool = True
) -> CleanupReport:
    """Kill the sandbox's leftover processes, unmount, remove its files and its state directory.

    Unmounted: the state's `mounts`, the mount ledger (mounts.json, newest first), then anything still
    mounted below the state directory or below ``<store.shared_root>/<sandbox id>``; both directories
    are removed. Idempotent, never raises for what it finds: problems are listed in the report.
    """
    store = store or StateStore()
    report = CleanupReport()
    directory = sandbox_dir(sandbox_id, store.root)
    state: SandboxState | None
    try:
        state = store.load(sandbox_id)
    except Exception as err:  # a corrupt file must not stop the cleanup
        report.errors.append(str(err))
        state = None
    if state is not None:
        victims: list[tuple[int, int | None]] = [(p, None) for p in state.pids]
        if kill_shim and state.shim_pid:
            victims.append((state.shim_pid, state.shim_start_time or None))
        for pid, start in victims:
            if _kill(pid, start):
                report.killed.append(pid)
        if report.killed:
            _wait_gone(report.killed, timeout=5.0)
    owned = [directory] + ([store.shared_root / sandbox_id] if store.shared_root is not None else [])
    points = list(state.mounts if state else [])
    points += [p for p in _ledger(directory) if p not in points]
    for owned_dir in owned:
        points += [p for p in mounts_below(owned_dir) if p not in points]
    for point in points:
        # A point may appear twice (stacked mounts): unmount until nothing is mounted there.
        for _ in range(8):
            if point not in mounts_below(Path(point)):
                break
            try:
                _umount(point)
                report.unmounted.append(point)
            except OSError as err:
                report.errors.append(f"umount {point}: {err.strerror}")
                break
    for path in [*(state.paths if state else []), *map(str, owned)]:
        p = Path(path)
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            report.removed.append(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            report.errors.append(f"remove {path}: {err.strerror}")
    for line in report.errors:
        log.warning("cleanup of sandbox %s: %s", sandbox_id, line)
    return report


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(process_start_time(p) is None or _is_zombie(p) for p in pids):
            return
        time.sleep(0.02)


def _is_zombie(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return data[data.rfind(b")") + 2 : data.rfind(b")") + 3] == b"Z"
