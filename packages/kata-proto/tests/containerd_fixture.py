"""A private containerd for host tests: its own root, state, sockets and opt dir, CRI disabled.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CONTAINERD = os.environ.get("KATA_TEST_CONTAINERD", "/usr/bin/containerd")
CTR = os.environ.get("KATA_TEST_CTR", "/usr/bin/ctr")

_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{ttrpc_address}"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"""


def skip_reason() -> str | None:
    """Why a private containerd cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "a private containerd needs root"
    for binary in (CONTAINERD, CTR):
        if not os.access(binary, os.X_OK):
            return f"{binary} is not installed"
    return None


@dataclass
class PrivateContainerd:
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

    def log(self) -> str:
        """What containerd wrote to its log so far (for assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _can_connect(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _kill_strays(base: Path) -> None:
    # Shims containerd started (runc, ours) run in their own sessions, so killing containerd's
    # group misses them; they carry this containerd's socket path in their argv.
    needle = str(base).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)


def _unmount_below(base: Path) -> None:
    prefix = str(base) + "/"
    try:
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
    except OSError:
        return
    # Deepest first, lazily: a test that was killed may have left a busy container mount.
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


@contextlib.contextmanager
def private_containerd(*, ready_timeout: float = 30.0) -> Iterator[PrivateContainerd]:
    """Start a private containerd, wait until both its sockets answer, stop and remove it after."""
    reason = skip_reason()
    if reason is not None:
        raise RuntimeError(reason)
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
            )
        )
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [CONTAINERD, "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        instance = PrivateContainerd(base, process, log_path)
        deadline = time.monotonic() + ready_timeout
        while not (_can_connect(instance.address) and _can_connect(instance.ttrpc_address)):
            if process.poll() is not None:
                raise RuntimeError(f"containerd exited with {process.returncode}:\n{instance.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd not ready after {ready_timeout} s:\n{instance.log()}")
            time.sleep(0.05)
        yield instance
    finally:
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        _kill_strays(base)
        _unmount_below(base)
        shutil.rmtree(base, ignore_errors=True)
