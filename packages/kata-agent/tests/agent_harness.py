"""Test helpers: a busybox rootfs fixture and an in-process agent on a unix socket driven by the client."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from kata_agent import AgentConfig, AgentService, open_agent
from kata_agent_client import AgentClient, open_agent_client

BUSYBOX = "/bin/busybox"
RUNC = shutil.which("runc") or "/usr/bin/runc"


def runc_skip_reason() -> str | None:
    """Why containers cannot run here with runc and busybox (None: they can)."""
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists(RUNC):
        return "needs runc"
    if not os.path.exists(BUSYBOX):
        return "needs Debian's busybox-static at /bin/busybox"
    return None


@contextmanager
def busybox_tree(
    prefix: str, *, extra_dirs: tuple[str, ...] = (), files: dict[str, str] | None = None
) -> Iterator[Path]:
    """A minimal rootfs in a new /tmp directory, removed after (the test is skipped where runc cannot run):
    the static busybox, a symlink per applet, empty mount points (plus `extra_dirs`), a root-only
    /etc/passwd, and `files` (relative path -> text). Also used by kata-shim's tests (this directory on
    sys.path)."""
    reason = runc_skip_reason()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        for d in ("bin", "proc", "dev", "sys", "tmp", "etc", "root", *extra_dirs):
            (root / d).mkdir()
        shutil.copy2(BUSYBOX, root / "bin/busybox")
        applets = subprocess.run(
            [BUSYBOX, "--list"], capture_output=True, text=True, check=True
        ).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        for rel, text in (files or {}).items():
            (root / rel).write_text(text)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def busybox_rootfs() -> Iterator[Path]:
    """A minimal rootfs (`busybox_tree`) for the whole session."""
    with busybox_tree("kata-bb-") as root:
        yield root


@dataclass
class AgentUnderTest:
    """The agent's service object (state) and a client connected to it."""

    service: AgentService
    client: AgentClient
    address: str
    run_dir: str


@asynccontextmanager
async def running_agent(*, netns: str | None = None, log: bool = False) -> AsyncIterator[AgentUnderTest]:
    """Serve an agent with runc on a unix socket in a short tmp dir; everything is removed after."""
    base = tempfile.mkdtemp(prefix="ka-", dir="/tmp")
    sock = os.path.join(base, "agent.sock")
    config = AgentConfig(
        runtime=RUNC, runtime_root=os.path.join(base, "runc"), run_dir=os.path.join(base, "run"), netns=netns
    )
    try:
        async with (
            open_agent(f"unix:{sock}", config, log_listen=f"unix:{sock}.log" if log else None) as service,
            open_agent_client(f"unix:{sock}", ready_timeout=10) as client,
        ):
            yield AgentUnderTest(service, client, f"unix:{sock}", config.run_dir)
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def fd_chunks(fd: int, size: int = 65536) -> AsyncIterator[bytes]:
    """What a process's stdio gives on the non-blocking `fd` (a fifo, a pipe), chunk by chunk until EOF;
    waits with trio. Also used by kata-shim's tests and the lab's agent tests (this directory on sys.path)."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            chunk = os.read(fd, size)
        except BlockingIOError:
            continue
        if not chunk:
            return
        yield chunk


def mounts_under(prefix: str) -> list[str]:
    """Mount points in this mount namespace at or below `prefix`."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(prefix)]
