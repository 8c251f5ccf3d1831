"""/run/kata/<sandbox id>/state.json: what `containerd-shim-kata-v2 delete` needs after a crash.

Written atomically (temporary file, fsync, rename), so a reader sees the old or the new state, never half.
Standard library and kata-resources only (its cleanup helpers): the delete path must start fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kata_resources import HOST_SHARED_ROOT
from kata_shim._proc import start_ticks
from kata_sys_util import write_atomic

ENV_STATE_ROOT = "KATA_SHIM_STATE_ROOT"
"""Overrides the state root (tests); the product uses /run/kata."""
DEFAULT_STATE_ROOT = Path("/run/kata")
ENV_SHARED_ROOT = "KATA_SHIM_SHARED_ROOT"
SHARED_ROOT = HOST_SHARED_ROOT
"""Kata's host root of the shared directories: <root>/<sandbox id> is the sandbox's, mounts and all."""
STATE_FILE = "state.json"
STATE_VERSION = 1


class PersistError(Exception):
    """state.json could not be written, or exists but cannot be understood."""


def state_root() -> Path:
    """/run/kata, or $KATA_SHIM_STATE_ROOT."""
    return Path(os.environ.get(ENV_STATE_ROOT) or DEFAULT_STATE_ROOT)


def sandbox_dir(sandbox_id: str, root: Path | None = None) -> Path:
    """The sandbox's own directory: everything the shim creates for it on the host goes below it
    (sockets, shared directories, mounts), so `delete` can find what a crash left."""
    if not sandbox_id or "/" in sandbox_id or sandbox_id in {".", ".."}:
        raise PersistError(f"invalid sandbox id {sandbox_id!r}")
    return (root or state_root()) / sandbox_id


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot): tells a pid from its reuse."""
    try:
        return start_ticks(f"/proc/{pid}/stat")
    except OSError:
        return None


@dataclass
class SandboxState:
    """One sandbox's host footprint, as far as cleanup after a crash needs it."""

    sandbox_id: str
    namespace: str = ""
    address: str = ""
    """The shim's own ttrpc address (unix://...)."""
    bundle: str = ""
    shim_pid: int = 0
    shim_start_time: int = 0
    runtime: str = ""
    hypervisor: str = ""
    config_path: str = ""
    mounts: list[str] = field(default_factory=list)
    """Mount points to unmount (besides every mount below the sandbox directory)."""
    paths: list[str] = field(default_factory=list)
    """Files or directories outside the sandbox directory to remove."""
    pids: list[int] = field(default_factory=list)
    """Helper processes to kill (an external VMM, virtiofsd); the shim itself is shim_pid."""
    extra: dict[str, object] = field(default_factory=dict)
    """Back-end specific facts (e.g. a tap or netns name) for the back-end's own cleanup."""
    version: int = STATE_VERSION


class StateStore:
    """Reads and writes state.json below a root (default /run/kata).

    `shared_root` is where the sandboxes' shared directories live, for cleanup: $KATA_SHIM_SHARED_ROOT,
    else /run/kata-containers/shared/sandboxes when the state root is the product's, else None (a test's
    private state root never reaches into the host's shared directories).
    """

    def __init__(self, root: Path | None = None, shared_root: Path | None = None) -> None:
        self.root = root or state_root()
        if shared_root is None and os.environ.get(ENV_SHARED_ROOT):
            shared_root = Path(os.environ[ENV_SHARED_ROOT])
        if shared_root is None and self.root == DEFAULT_STATE_ROOT:
            shared_root = SHARED_ROOT
        self.shared_root = shared_root

    def path(self, sandbox_id: str) -> Path:
        """Where the sandbox's state.json lives."""
        return sandbox_dir(sandbox_id, self.root) / STATE_FILE

    def save(self, state: SandboxState) -> None:
        """Write `state` atomically (creating the sandbox directory, mode 0700)."""
        target = self.path(state.sandbox_id)
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            data = json.dumps(dataclasses.asdict(state), indent=1, sort_keys=True).encode()
            write_atomic(target, data)
        except OSError as err:
            raise PersistError(f"cannot write {target}: {err}") from err

    def load(self, sandbox_id: str) -> SandboxState | None:
        """The saved state, or None when there is none."""
        path = self.path(sandbox_id)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise PersistError(f"cannot read {path}: {err}") from err
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            raise PersistError(f"{path}: not a version {STATE_VERSION} sandbox state")
        known = {f.name for f in dataclasses.fields(SandboxState)}
        try:
            return SandboxState(**{k: v for k, v in raw.items() if k in known})
        except TypeError as err:
            raise PersistError(f"{path}: {err}") from err

    def update(
        self,
        sandbox_id: str,
        *,
        mounts: list[str] | None = None,
        paths: list[str] | None = None,
        pids: list[int] | None = None,
        extra: dict[str, object] | None = None,
    ) -> SandboxState:
        """Add resources to the saved state (for a container abstraction recording what it made)."""
        state = self.load(sandbox_id) or SandboxState(sandbox_id)
        state.mounts += [m for m in mounts or [] if m not in state.mounts]
        state.paths += [p for p in paths or [] if p not in state.paths]
        state.pids += [p for p in pids or [] if p not in state.pids]
        state.extra.update(extra or {})
        self.save(state)
        return state

    def forget(self, sandbox_id: str, *keys: str) -> None:
        """Drop ``keys`` from the saved state's ``extra`` (what they recorded has been undone)."""
        state = self.load(sandbox_id)
        if state is None or not any(k in state.extra for k in keys):
            return
        for key in keys:
            state.extra.pop(key, None)
        self.save(state)
