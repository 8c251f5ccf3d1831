"""Undo what a sandbox left on the host, from its state.json and its directory (after a crash too).

Nothing here follows a path the guest could have written: the mount ledger is undone by mount id
(kata_resources.undo_mount_record), leftovers below the sandbox's directories are unmounted only through
fds opened beneath them (unmount_below), and directories are removed without following symlinks or
deleting through a mount (remove_tree): what cannot be proven safe is left and reported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from kata_resources import (
    MountError,
    ResourceError,
    remove_tree,
    umount,
    undo_mount_record,
    unmount_below,
)
from kata_shim._proc import stat_fields
from kata_shim.persist._state import SandboxState, StateStore, process_start_time, sandbox_dir
from kata_sys_util import mounts_below

log = logging.getLogger("kata_shim.persist")

MOUNTS_FILE = "mounts.json"
"""<sandbox dir>/mounts.json: the container abstraction's mount ledger (kata_resources.MountLedger)."""
NETWORK_KEY = "network"
"""state.json ``extra[NETWORK_KEY]``: the pod's network (`kata_resources.Network.to_dict`), torn down here."""
CGROUP_KEY = "cgroup"
"""state.json ``extra[CGROUP_KEY]``: the sandbox's host cgroup (`SandboxCgroup.to_dict`), removed here."""
PROCESSES_KEY = "processes"
"""state.json ``extra[PROCESSES_KEY]``: an external VMM's processes (``[{"name", "pid", "start_time"}]``),
killed here only while each pid still has the start time recorded (a reused pid is left alone)."""

__all__ = [
    "CGROUP_KEY",
    "MOUNTS_FILE",
    "NETWORK_KEY",
    "PROCESSES_KEY",
    "CleanupReport",
    "cleanup_sandbox",
    "mounts_below",
]


@dataclass
class CleanupReport:
    """What `cleanup_sandbox` did (and what it could not do)."""

    killed: list[int] = field(default_factory=list)
    unmounted: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


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


def cleanup_sandbox(
    sandbox_id: str, store: StateStore | None = None, *, kill_shim: bool = True
) -> CleanupReport:
    """Kill the sandbox's leftover processes, unmount, remove its files and its state directory.

    Unmounted: the state's `mounts`, the mount ledger (mounts.json, newest first, each only if it is still
    the mount recorded), then anything still mounted below the state directory or below
    ``<store.shared_root>/<sandbox id>`` (by mount id, through fds that follow no symlink); both
    directories are then removed, never through a mount. Idempotent, never raises for what it finds:
    problems (and whatever was left for safety) are listed in the report.
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
        victims += _recorded_processes(state.extra.get(PROCESSES_KEY))
        if kill_shim and state.shim_pid:
            victims.append((state.shim_pid, state.shim_start_time or None))
        for pid, start in victims:
            if _kill(pid, start):
                report.killed.append(pid)
        if report.killed:
            _wait_gone(report.killed, timeout=5.0)
    if state is not None:
        _release_host_resources(state, report)
    owned = [directory] + ([store.shared_root / sandbox_id] if store.shared_root is not None else [])
    for point in state.mounts if state else []:
        # Recorded by the shim itself (trusted host paths): unmount every stacked mount there.
        for _ in range(8):
            try:
                if not umount(point):
                    break
                report.unmounted.append(point)
            except MountError as err:
                report.errors.append(f"umount {point}: {err}")
                break
    try:
        report.unmounted += undo_mount_record(directory / MOUNTS_FILE)
    except (MountError, ResourceError) as err:
        report.errors.append(f"mount ledger: {err}")
    for owned_dir in owned:
        try:
            report.unmounted += unmount_below(owned_dir)
        except MountError as err:
            report.errors.append(str(err))
    for path in [*(state.paths if state else []), *map(str, owned)]:
        p = Path(path)
        if not os.path.lexists(p):
            continue
        try:
            remove_tree(p)
            report.removed.append(path)
        except ResourceError as err:
            report.errors.append(f"remove {path}: {err}")
    for line in report.errors:
        log.warning("cleanup of sandbox %s: %s", sandbox_id, line)
    return report


def _release_host_resources(state: SandboxState, report: CleanupReport) -> None:
    """Tear down the pod's taps, qdiscs and filters and remove its host cgroup, as recorded.

    The network and cgroup code (pyroute2, cgroupspy) is imported only for a pod that had them: `delete`
    must stay within containerd's few seconds under emulation."""
    network = state.extra.get(NETWORK_KEY)
    if isinstance(network, dict):
        from kata_resources import Network, teardown_network_sync

        try:
            teardown_network_sync(Network.from_dict(network))
            report.removed.append(f"network {network.get('netns', '')}")
        except (ResourceError, OSError) as err:
            report.errors.append(f"network: {err}")
    cgroup = state.extra.get(CGROUP_KEY)
    if isinstance(cgroup, dict):
        from kata_resources import SandboxCgroup

        try:
            SandboxCgroup.from_dict(cgroup).delete()
            report.removed.append(f"cgroup {cgroup.get('path', '')}")
        except (ResourceError, OSError) as err:
            report.errors.append(f"cgroup: {err}")


def _recorded_processes(value: object) -> list[tuple[int, int | None]]:
    """(pid, start time) of each well-formed `PROCESSES_KEY` entry; one without a start time is skipped
    (it could be any process by now)."""
    found: list[tuple[int, int | None]] = []
    for entry in value if isinstance(value, list) else []:
        if not isinstance(entry, dict):
            continue
        pid, start = entry.get("pid"), entry.get("start_time")
        if isinstance(pid, int) and isinstance(start, int) and start > 0 and not isinstance(pid, bool):
            found.append((pid, start))
    return found


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(process_start_time(p) is None or _is_zombie(p) for p in pids):
            return
        time.sleep(0.02)


def _is_zombie(pid: int) -> bool:
    try:
        return stat_fields(f"/proc/{pid}/stat")[0] == b"Z"
    except OSError:
        return True
    except (ValueError, IndexError):
        return False
