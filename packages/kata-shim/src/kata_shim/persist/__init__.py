"""Sandbox state under /run/kata/<sandbox id> (state.json, written atomically) and cleanup after a crash."""

from kata_shim.persist._cleanup import (
    CGROUP_KEY,
    MOUNTS_FILE,
    NETWORK_KEY,
    PROCESSES_KEY,
    CleanupReport,
    cleanup_sandbox,
    mounts_below,
)
from kata_shim.persist._state import (
    DEFAULT_STATE_ROOT,
    ENV_SHARED_ROOT,
    ENV_STATE_ROOT,
    SHARED_ROOT,
    PersistError,
    SandboxState,
    StateStore,
    process_start_time,
    sandbox_dir,
    state_root,
)

__all__ = [
    "CGROUP_KEY",
    "DEFAULT_STATE_ROOT",
    "ENV_SHARED_ROOT",
    "ENV_STATE_ROOT",
    "MOUNTS_FILE",
    "NETWORK_KEY",
    "PROCESSES_KEY",
    "SHARED_ROOT",
    "CleanupReport",
    "PersistError",
    "SandboxState",
    "StateStore",
    "cleanup_sandbox",
    "mounts_below",
    "process_start_time",
    "sandbox_dir",
    "state_root",
]
