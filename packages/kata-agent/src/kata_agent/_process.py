"""A process the agent started in a container: its stdio, its exit status and its pty."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import struct
import termios

import trio

from kata_agent._passfd import PassfdStdio
from kata_proto import ttrpc

#: Seconds a read waits for more output once the process has exited before reporting EOF.
DRAIN_AFTER_EXIT = 0.5


class Process:
    """One container process (the init or an exec): stdio streams, reaping, signals, resize.

    The process is a child of the agent (runc leaves it to the agent, a child subreaper), so its
    exit is watched through a pidfd and its status collected with waitpid.
    """

    def __init__(self, exec_id: str, *, terminal: bool) -> None:
        self.exec_id = exec_id
        self.terminal = terminal
        self.pid = 0
        self.exit_status: int | None = None
        self._exited = trio.Event()
        self.stdin: trio.lowlevel.FdStream | None = None
        self.stdout: trio.lowlevel.FdStream | None = None
        self.stderr: trio.lowlevel.FdStream | None = None
        self._pty_fd = -1
        self._read_locks = (trio.Lock(), trio.Lock())
        self._write_lock = trio.Lock()
        self._stdin_closed = False
        self.eof = [False, False]
        self.waited = False
        self.passfd: PassfdStdio | None = None
        self._copied = trio.Event()
        self._copied.set()
        self._stdin_scope = trio.CancelScope()

    # -- set-up -------------------------------------------------------------------------------
    def open_pipes(self) -> tuple[int, int, int]:
        """Make the stdio pipes; returns the child's ends (stdin, stdout, stderr) to hand to runc."""
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        self.stdin = trio.lowlevel.FdStream(in_w)
        self.stdout = trio.lowlevel.FdStream(out_r)
        self.stderr = trio.lowlevel.FdStream(err_r)
        return in_r, out_w, err_w

    def attach_pty(self, master_fd: int) -> None:
        """Use the pty master runc handed over for stdin and stdout (stderr is merged in a tty)."""
        self._pty_fd = os.dup(master_fd)
        self.stdin = trio.lowlevel.FdStream(master_fd)
        self.stdout = trio.lowlevel.FdStream(os.dup(master_fd))
        self.eof[1] = True  # a tty has no separate stderr

    def attach_passfd(self, stdio: PassfdStdio, nursery: trio.Nursery) -> None:
        """Pump stdio through the passfd streams (the process's output, then EOF; stdin until EOF).

        WaitProcess answers only once every output stream got all the output and was closed.
        """
        self.passfd = stdio
        outputs = [(1, stdio.stdout), (2, None if self.terminal else stdio.stderr)]
        pending = [(which, stream) for which, stream in outputs if stream is not None]
        if pending:
            copied = self._copied = trio.Event()

            async def pump_outputs() -> None:
                try:
                    async with trio.open_nursery() as pumps:
                        for which, stream in pending:
                            pumps.start_soon(self._pump_output, which, stream)
                finally:
                    copied.set()

            nursery.start_soon(pump_outputs)
        if stdio.stdin is not None:
            nursery.start_soon(self._pump_stdin, stdio.stdin)

    async def _pump_output(self, which: int, stream: trio.SocketStream) -> None:
        peer_gone = False
        try:
            while True:
                data = await self.read(which, 65536)
                if not data:
                    break
                if peer_gone:
                    continue  # keep draining so the process never blocks on a full pipe
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    peer_gone = True
        finally:
            with contextlib.suppress(OSError):
                stream.socket.close()

    async def _pump_stdin(self, stream: trio.SocketStream) -> None:
        with self._stdin_scope:
            try:
                while True:
                    try:
                        data = await stream.receive_some(65536)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                    if not data:
                        break
                    await self.write_stdin(data)
            except ttrpc.FailedPrecondition:
                pass  # the process closed its stdin or went: the rest is dropped
            finally:
                with contextlib.suppress(OSError):
                    stream.socket.close()
            await self.close_stdin()

    async def watch(self, pid: int) -> None:
        """Wait for `pid` to exit and record its status (128+N for a signal, as shells report)."""
        self.pid = pid
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = -1
        try:
            if pidfd >= 0:
                await trio.lowlevel.wait_readable(pidfd)
            while True:
                try:
                    got, status = _reap(pid)
                except ChildProcessError:
                    # Not our child (no subreaper, say): the pidfd told us it is gone.
                    self._set_exit(255)
                    return
                if got == pid:
                    break
                await trio.sleep(0.01)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        code = os.waitstatus_to_exitcode(status)
        self._set_exit(128 - code if code < 0 else code)

    def _set_exit(self, status: int) -> None:
        self.exit_status = status
        self._exited.set()

    @property
    def exited(self) -> bool:
        """True once the process has been reaped."""
        return self._exited.is_set()

    async def wait_exited(self) -> None:
        """Wait until the process has been reaped (without counting as WaitProcess)."""
        await self._exited.wait()

    async def wait(self) -> int:
        """The exit status, waiting as long as it takes."""
        await self._exited.wait()
        await self._copied.wait()  # passfd: the output reached the streams first
        assert self.exit_status is not None
        self.waited = True
        return self.exit_status

    # -- stdio ----------------------------------------------------------------------------------
    async def read(self, which: int, length: int) -> bytes:
        """Up to `length` bytes of stdout (1) or stderr (2), waiting for some; b"" means EOF."""
        stream = self.stdout if which == 1 else self.stderr
        data = b""
        if stream is not None:
            async with self._read_locks[which - 1], trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_reading_after_exit, nursery.cancel_scope)
                try:
                    data = await stream.receive_some(max(1, min(length or 65536, 1 << 20)))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # A pty master reads EIO once the last slave closes: that is EOF.
                    data = b""
                nursery.cancel_scope.cancel()
        if not data:
            self.eof[which - 1] = True
        return data

    async def _stop_reading_after_exit(self, scope: trio.CancelScope) -> None:
        # A child the process left behind (`sleep 100 &`) may hold the pipe open for ever:
        # once the process has exited and the pipe stays quiet for a while, report EOF.
        await self._exited.wait()
        await trio.sleep(DRAIN_AFTER_EXIT)
        scope.cancel()

    @property
    def finished(self) -> bool:
        """Exited, its status collected by WaitProcess, and both output streams read to EOF."""
        return self.exited and self.waited and all(self.eof)

    async def write_stdin(self, data: bytes) -> int:
        """Write all of `data` to stdin; empty data closes stdin (PROTOCOLS.md)."""
        if not data:
            await self.close_stdin()
            return 0
        if self.stdin is None or self._stdin_closed:
            raise ttrpc.FailedPrecondition(f"stdin of process {self.exec_id or 'init'} is closed")
        async with self._write_lock:
            try:
                await self.stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as err:
                raise ttrpc.FailedPrecondition(f"stdin of process {self.exec_id or 'init'}: {err}") from err
        return len(data)

    async def close_stdin(self) -> None:
        """Close stdin so the process reads EOF; for a tty, send the EOF character instead."""
        if self._stdin_closed or self.stdin is None:
            return
        self._stdin_closed = True
        if self.terminal:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stdin.send_all(b"\x04")
            return
        await self.stdin.aclose()

    def resize(self, rows: int, columns: int) -> None:
        """Set the pty window size (the kernel sends SIGWINCH to the foreground group)."""
        if self._pty_fd < 0:
            raise ttrpc.FailedPrecondition(f"process {self.exec_id or 'init'} has no terminal")
        fcntl.ioctl(self._pty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def signal(self, signo: int) -> None:
        """Send `signo`; a process already reaped is NotFound."""
        if self.exited or self.pid <= 0:
            raise ttrpc.NotFound(f"process {self.exec_id or 'init'} is not running")
        try:
            os.kill(self.pid, signal.Signals(signo) if signo in signal.Signals._value2member_map_ else signo)
        except ProcessLookupError as err:
            raise ttrpc.NotFound(f"process {self.exec_id or 'init'} is not running") from err
        except OSError as err:
            if err.errno == errno.EINVAL:
                raise ttrpc.InvalidArgument(f"bad signal {signo}") from err
            raise

    def close(self) -> None:
        """Close every stdio fd (the agent is done with this process)."""
        self._stdin_scope.cancel()
        if self.passfd is not None:
            self.passfd.close()
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self._pty_fd >= 0:
            os.close(self._pty_fd)
            self._pty_fd = -1


def _reap(pid: int) -> tuple[int, int]:
    # Never blocks: the pidfd said the child exited (WNOHANG covers a spurious wake-up).
    return os.waitpid(pid, os.WNOHANG)
