"""A private containerd for host tests: its own root, state, sockets and opt dir, CRI disabled unless asked.

Plain module, reusable from any package's tests (put this directory on sys.path):

    with private_containerd() as ctrd:
        subprocess.run([*ctrd.ctr(), "version"], check=True)
        ...  # ctrd.address (gRPC), ctrd.ttrpc_address, ctrd.root, ctrd.state

The daemon runs in its own process group; teardown kills it and any shim started for it
(found by its socket path in their argv), unmounts anything left under its directory and
removes the directory, whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CONTAINERD = os.environ.get("KATA_TEST_CONTAINERD", "/usr/bin/containerd")
CTR = os.environ.get("KATA_TEST_CTR", "/usr/bin/ctr")

_CONFIG = """\
version = {version}
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{ttrpc_address}"

[debug]
  level = "{level}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"""
# containerd 2.x serves NRI by default on a host-wide socket (/var/run/nri/nri.sock): not for a private one
_CONFIG_V3 = """
[plugins."io.containerd.nri.v1.nri"]
  disable = true
"""


def skip_reason() -> str | None:
    """Why a private containerd cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "a private containerd needs root"
    for binary in (CONTAINERD, CTR):
        if not os.access(binary, os.X_OK):
            return f"{binary} is not installed"
    return None


class ContainerdLog:
    """containerd's log file (`log_path`), read for assertion messages; lab/framework's class shares it."""

    log_path: Path

    def log(self) -> str:
        """What containerd (and the shims, whose log fifos it drains) wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """The last `lines` lines of `log()`."""
        return "\n".join(self.log().splitlines()[-lines:])


@dataclass
class PrivateContainerd(ContainerdLog):
    """A running private containerd and where to reach it."""

    base: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    address: str = field(init=False)
    ttrpc_address: str = field(init=False)
    root: Path = field(init=False)
    state: Path = field(init=False)
    opt: Path = field(init=False)

    def __post_init__(self) -> None:
        self.address = str(self.base / "containerd.sock")
        self.ttrpc_address = self.address + ".ttrpc"
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.opt = self.base / "opt"

    def ctr(self, namespace: str | None = None) -> list[str]:
        """argv prefix for `ctr` talking to this containerd."""
        argv = [CTR, "--address", self.address]
        if namespace is not None:
            argv += ["--namespace", namespace]
        return argv


def _can_connect(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def processes() -> Iterator[tuple[int, str]]:
    """(pid, argv joined by spaces) of every process but this one."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        yield int(entry.name), argv


def kill_strays(needle: str) -> list[int]:
    """SIGKILL every process whose argv contains `needle`: the shims containerd started (runc's, ours) run
    in their own sessions, so killing containerd's group misses them; their argv has its socket path."""
    killed = []
    for pid, argv in processes():
        if needle in argv:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def mounts_below(directory: Path) -> list[str]:
    """Mount points at or below `directory` (from /proc/self/mounts; `\\040` read back as a space)."""
    prefix = str(directory).rstrip("/") + "/"
    try:
        with open("/proc/self/mounts") as f:
            points = [line.split()[1].replace("\\040", " ") for line in f]
    except OSError:
        return []
    return [p for p in points if p.startswith(prefix) or p == str(directory)]


def unmount_below(directory: Path) -> None:
    """Lazily unmount everything at or below `directory`, deepest first (a killed test may have left a busy
    container mount)."""
    for point in sorted(mounts_below(directory), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


@contextlib.contextmanager
def private_containerd(
    *,
    ready_timeout: float = 30.0,
    debug: bool = False,
    env: dict[str, str] | None = None,
    error: type[Exception] = RuntimeError,
    keep_log: Callable[[Path], None] | None = None,
    cri_config: Callable[[Path], str] | None = None,
    containerd: str | None = None,
    config_version: int = 2,
    plugin_config: Callable[[Path], str] | None = None,
) -> Iterator[PrivateContainerd]:
    """Start a private containerd, wait until both its sockets answer, stop and remove it after.

    `debug` sets containerd's log level; `env` is its whole environment (None: this process's); `error` is
    what a failure to start raises (lab/framework/containerd.py builds on this with its own); `keep_log` is
    called with the log's path after containerd stopped, before its directory is removed. `cri_config`
    None keeps the CRI plugin disabled; else it is called with the private directory (before containerd
    starts) and what it returns (the CRI plugin's TOML tables) is appended to the configuration, the plugin
    enabled (lab/framework/cri.py's CriConfig writes it). `containerd` is the daemon's binary (None:
    KATA_TEST_CONTAINERD, by default the system's) and `config_version` its configuration's version: 2 for
    containerd 1.x, 3 for 2.x (whose top-level tables are the same; 2.x reads version 2 too, migrated).
    `plugin_config`, like `cri_config` but without enabling CRI, returns more plugin tables (a
    snapshotter's, say: lab/framework/containerd.py's BlockfileSnapshotter) and may prepare files there."""
    reason = skip_reason()
    if reason is not None:
        raise error(reason)
    # Short path under /tmp: unix socket paths are limited to 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="kata-ctrd-", dir="/tmp"))
    log_path = base / "containerd.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        for sub in ("root", "state", "opt"):
            (base / sub).mkdir()
        config = base / "config.toml"
        sock = base / "containerd.sock"
        config.write_text(
            _CONFIG.format(
                root=base / "root",
                state=base / "state",
                address=sock,
                ttrpc_address=f"{sock}.ttrpc",
                opt=base / "opt",
                version=config_version,
                level="debug" if debug else "info",
                disabled="" if cri_config is not None else '"io.containerd.grpc.v1.cri"',
            )
            + (_CONFIG_V3 if config_version >= 3 else "")
            + (cri_config(base) if cri_config is not None else "")
            + (plugin_config(base) if plugin_config is not None else "")
        )
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [containerd or CONTAINERD, "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=base,
            )
        instance = PrivateContainerd(base, process, log_path)
        deadline = time.monotonic() + ready_timeout
        while not (_can_connect(instance.address) and _can_connect(instance.ttrpc_address)):
            if process.poll() is not None:
                raise error(f"containerd exited with {process.returncode}:\n{instance.log_tail()}")
            if time.monotonic() > deadline:
                raise error(f"containerd not ready after {ready_timeout} s:\n{instance.log_tail()}")
            time.sleep(0.05)
        yield instance
    finally:
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        kill_strays(str(base))
        unmount_below(base)
        if keep_log is not None and log_path.exists():
            keep_log(log_path)
        shutil.rmtree(base, ignore_errors=True)
