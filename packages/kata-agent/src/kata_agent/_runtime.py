"""Driving the OCI runtime binary (crun in the guest, runc on hosts) and its console socket."""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket as _socket
import subprocess
import time

import trio

from kata_agent._errors import RuntimeFailed


class OciRuntime:
    """Runs `runtime [--root R] --log L <command> ...` and turns a failure into RuntimeFailed."""

    def __init__(self, path: str, root: str | None = None) -> None:
        self.path = path
        self.root = root

    def _argv(self, log: str | None, args: list[str]) -> list[str]:
        argv = [self.path]
        if self.root:
            argv += ["--root", self.root]
        if log:
            argv += ["--log", log, "--log-format", "json"]
        return argv + args

    async def run(
        self,
        args: list[str],
        *,
        log: str | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = subprocess.DEVNULL,
        stderr: int | None = None,
    ) -> None:
        """Run one runtime command to completion; RuntimeFailed with its error message otherwise."""
        capture = stderr is None
        argv = self._argv(log, args)
        if capture:
            result = await trio.run_process(
                argv, stdin=stdin, stdout=stdout, capture_stderr=True, check=False
            )
        else:
            result = await trio.run_process(argv, stdin=stdin, stdout=stdout, stderr=stderr, check=False)
        if result.returncode != 0:
            message = _last_error(log) or (result.stderr or b"").decode(errors="replace").strip()
            raise RuntimeFailed(args[0], message or f"exit status {result.returncode}")


def preload_runtime(path: str, timeout: float = 10.0) -> float | None:
    """Run ``path --version`` once, before the agent serves: the runtime's binary and shared libraries are
    then in the guest's page cache, so the first CreateContainer does not read them from the root disk, and
    neither does any sandbox restored from a VM template saved at agent-ready (each clone's first `crun
    create` read them from the root disk again: in the lab it took 1.07-1.18 s, 0.73-0.84 s with this).
    Seconds it took, or None when it could not run (which the first create will then report)."""
    started = time.monotonic()
    try:
        subprocess.run(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return time.monotonic() - started


def _last_error(log: str | None) -> str:
    if not log:
        return ""
    try:
        with open(log, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", ""))
    return ""


class ConsoleSocket:
    """A unix socket on which the runtime sends the pty master of a terminal process (SCM_RIGHTS)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)

    async def __aenter__(self) -> ConsoleSocket:
        await self._sock.bind(self.path)
        self._sock.listen(1)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def receive_fd(self) -> int:
        """Accept the runtime's connection and return the fd it sends."""
        conn, _ = await self._sock.accept()
        with conn:
            fds = array.array("i")
            _, ancdata, _, _ = await conn.recvmsg(4096, _socket.CMSG_SPACE(4 * fds.itemsize))
            for level, kind, data in ancdata:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if not fds:
            raise RuntimeFailed("console-socket", "the runtime sent no pty fd")
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(fds[0], False)
        return fds[0]
