"""The shim's zygote: `start` has a warm parent fork the shim (real processes, as containerd runs them)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from kata_proto import ttrpc
from kata_proto.containerd import TASK_SERVICE, task_pb2
from kata_shim.persist import SandboxState, StateStore, process_start_time, sandbox_dir
from kata_shim.shim._address import socket_path
from kata_shim.shim._zygote import (
    MAGIC,
    Request,
    ZygoteError,
    changed_file,
    delete_via_zygote,
    end_zygotes,
    fork_via_zygote,
    key,
    module_files,
)

SHIM = str(Path(sys.executable).parent / "containerd-shim-kata-v2")
ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="the shim socket lives under /run/containerd/s (root)"
)


def eventually(check: Callable[[], object], timeout: float = 20) -> object:
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.05)


def proc_strings(pid: int, name: str) -> list[bytes]:
    return [item for item in Path(f"/proc/{pid}/{name}").read_bytes().split(b"\0") if item]


@pytest.mark.parametrize(
    "request_",
    [
        Request(
            ["/usr/bin/python3", "/s", "-id", "a b", "-debug"], 2, {"A": "1", "B": "x=y", "E": ""}, "/b", 0o22
        ),
        Request([], 0, {}, "/", 0),
        Request(["p", "\udcff-id"], 1, {"K": "\udcfe"}, "/bundle/\udcfd", 0o777),  # bytes that are not UTF-8
    ],
)
def test_a_request_round_trips(request_: Request) -> None:
    assert Request.decode(request_.encode()) == request_


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"kata-zygote-0\0/\x0022\x000\x000",  # another version
        MAGIC + b"\0relative\x0022\x000\x000",
        MAGIC + b"\0/\x0099\x000\x000",  # not octal
        MAGIC + b"\0/\x001000\x000\x000",  # no umask
        MAGIC + b"\0/\x0022\x003\x001\0argv",  # head past argv
        MAGIC + b"\0/\x0022\x000\x005\0a",  # fewer argv than said
        MAGIC + b"\0/\x0022\x000\x000\0NOEQUALS",
        MAGIC + b"\0/\x0022\x000\x000\0=value",
    ],
)
def test_a_malformed_request_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        Request.decode(data)


def test_a_nul_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        Request(["a\0b"], 0, {}, "/", 0).encode()


def test_changed_file_names_a_rewritten_or_removed_module(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("x = 1\n")
    seen = {**module_files(), str(module): (module.stat().st_mtime_ns, module.stat().st_size)}
    assert changed_file(seen) is None
    assert sys.executable in seen
    module.write_text("x = 22\n")
    assert changed_file(seen) == str(module)
    module.unlink()
    assert changed_file(seen) == str(module)


PROC_STRINGS = textwrap.dedent(
    """
    import os, sys
    from kata_shim.shim._zygote import set_proc_strings
    ok = set_proc_strings(sys.argv[1], sys.argv[2].split(","))
    print(ok, flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize("area", ["arg", "env"])
def test_proc_cmdline_and_environ_read_what_was_set_in_place(area: str) -> None:
    items = ["shim", "-id", "x"] if area == "arg" else ["A=1", "B=2"]
    child = subprocess.Popen(
        [sys.executable, "-c", PROC_STRINGS, area, ",".join(items), "padding" * 10],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PADDING": "p" * 200},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"True\n"
        name = "cmdline" if area == "arg" else "environ"
        assert proc_strings(child.pid, name) == [i.encode() for i in items]
    finally:
        child.communicate(b"")


def test_proc_cmdline_longer_than_the_area_moves_or_is_refused() -> None:
    items = ["x" * 5000, "y"]
    child = subprocess.Popen(
        [sys.executable, "-c", PROC_STRINGS, "arg", ",".join(items)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        said = child.stdout.readline()
        # CAP_SYS_RESOURCE points the kernel at a new buffer; without it nothing changes.
        expected = [i.encode() for i in items] if said == b"True\n" else None
        cmdline = proc_strings(child.pid, "cmdline")
        if expected is None:
            assert said == b"False\n" and cmdline[0] == sys.executable.encode()
        else:
            assert cmdline == expected
    finally:
        child.communicate(b"")


class Starts:
    """`containerd-shim-kata-v2 start` as containerd runs it, with a zygote directory of the test's."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.zygotes = tmp / "z"
        self.address = str(tmp / "containerd.sock")
        self.env = {
            **os.environ,
            "KATA_SHIM_STATE_ROOT": str(tmp / "run-kata"),
            "TTRPC_ADDRESS": "",
            "KATA_SHIM_ZYGOTE_DIR": str(self.zygotes),
        }
        self.pids: list[int] = []
        self.cleanup_paths: list[Path] = []

    def start(self, id: str = "", **env: str) -> tuple[int, str]:
        """Start a shim for a new container (ids of one length: the forks' cmdline fits the zygote's
        own without CAP_SYS_RESOURCE); its pid and address."""
        id = id or f"z-{uuid.uuid4().hex[:12]}"
        bundle = self.tmp / id
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "annotations": {}}))
        argv = [SHIM, "-namespace", "zt", "-address", self.address, "-publish-binary", "/bin/true", "-id", id]
        done = subprocess.run(
            [*argv, "start"],
            cwd=bundle,
            env={**self.env, **env},
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        pid = int((bundle / "shim.pid").read_text())
        self.pids.append(pid)
        return pid, done.stdout.decode()

    def zygote(self) -> int:
        """The running zygote's pid (0 while there is none)."""
        lock = self.zygotes / f"{key()}.lock"
        with contextlib.suppress(OSError, ValueError):
            pid = int(lock.read_text().strip() or 0)
            if pid and b"zygote" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        return 0

    def socket(self) -> Path:
        return self.zygotes / f"{key()}.sock"

    def cleanup(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        end_zygotes(self.zygotes)
        for path in self.cleanup_paths:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def starts(tmp_path: Path) -> Iterator[Starts]:
    s = Starts(tmp_path)
    try:
        yield s
    finally:
        s.cleanup()


async def shutdown(address: str) -> None:
    async with ttrpc.open_ttrpc_client(socket_path(address)) as client:
        stub = ttrpc.ServiceStub(client, TASK_SERVICE, timeout=10)
        await stub.Shutdown(task_pb2.ShutdownRequest(id="x"))


def gone(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return process_start_time(pid) is None


@ROOT_ONLY
def test_the_first_start_leaves_a_zygote_that_forks_the_next_shims(starts: Starts) -> None:
    first, _ = starts.start()
    assert b"KATA_SHIM_FORKED_BY" not in Path(f"/proc/{first}/environ").read_bytes()  # exec'd
    zygote = eventually(starts.zygote)
    assert zygote, "no zygote after the first start"
    assert proc_strings(zygote, "cmdline") == [
        b"containerd-shim-kata-v2",
        b"zygote",
        str(starts.zygotes).encode(),
    ]
    assert os.stat(starts.zygotes).st_mode & 0o777 == 0o700
    assert os.stat(starts.socket()).st_mode & 0o777 == 0o600
    assert zygote not in (first, os.getppid())
    assert os.getsid(zygote) not in (os.getsid(first), os.getsid(0))  # a session of its own

    id = f"z-{uuid.uuid4().hex[:12]}"
    pid, address = starts.start(id, KATA_SHIM_RUNTIME_CONFIG_PATH_UNUSED="1")
    bundle = starts.tmp / id
    environ = proc_strings(pid, "environ")
    # Forked by the zygote, and it looks and behaves as an exec'd shim would.
    assert f"KATA_SHIM_FORKED_BY={zygote}".encode() in environ
    assert b"KATA_SHIM_RUNTIME_CONFIG_PATH_UNUSED=1" in environ
    assert not any(e.startswith(b"KATA_SHIM_ZYGOTE_ROOM=") for e in environ)
    cmdline = proc_strings(pid, "cmdline")
    flags = ["-namespace", "zt", "-id", id, "-address", starts.address, "-publish-binary", "/bin/true"]
    assert cmdline[1:] == [SHIM.encode(), *(f.encode() for f in flags)]
    assert os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/cwd") == str(bundle)
    parent = int(Path("/proc/self/oom_score_adj").read_text())
    assert int(Path(f"/proc/{pid}/oom_score_adj").read_text()) == min(parent + 1, 1000)
    trio.run(shutdown, address)
    assert eventually(lambda: gone(pid), 20)
    assert not os.path.exists(socket_path(address))
    assert starts.zygote() == zygote  # it goes on for the next start


@ROOT_ONLY
def test_a_zygote_whose_code_changed_refuses_and_the_next_one_replaces_it(starts: Starts) -> None:
    site = starts.tmp / "site"
    site.mkdir()
    extra = site / "kata_zygote_probe.py"
    extra.write_text("VALUE = 1\n")
    (site / "sitecustomize.py").write_text("import kata_zygote_probe\n")
    starts.env["PYTHONPATH"] = str(site)
    starts.start()
    old = eventually(starts.zygote)
    assert old and eventually(starts.socket().exists)  # bound once it has looked at its files
    extra.write_text("VALUE = 22\n")  # an upgrade of a module the zygote has loaded
    pid, _ = starts.start()
    assert b"KATA_SHIM_FORKED_BY" not in Path(f"/proc/{pid}/environ").read_bytes()  # exec'd, not forked
    assert eventually(lambda: gone(old))
    new = eventually(lambda: starts.zygote() not in (0, old) and starts.zygote())
    assert new, "the exec'd shim did not leave a new zygote"
    pid, _ = starts.start()
    assert f"KATA_SHIM_FORKED_BY={new}".encode() in Path(f"/proc/{pid}/environ").read_bytes()


@ROOT_ONLY
def test_an_idle_zygote_exits_and_removes_its_socket(starts: Starts) -> None:
    starts.env["KATA_SHIM_ZYGOTE_IDLE"] = "1"
    starts.start()
    zygote = eventually(starts.zygote)
    assert zygote
    assert eventually(lambda: gone(zygote))
    assert not starts.socket().exists()
    pid, _ = starts.start()  # and the next start execs again
    assert b"KATA_SHIM_FORKED_BY" not in Path(f"/proc/{pid}/environ").read_bytes()


def _send(path: Path, payload: bytes, fds: list[int]) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(path))
        socket.send_fds(s, [len(payload).to_bytes(4, "big") + payload], fds)
        reply = b""
        with contextlib.suppress(ConnectionResetError):  # closed with the request unread: no answer
            while chunk := s.recv(512):
                reply += chunk
        return reply


@ROOT_ONLY
def test_the_zygote_answers_a_malformed_request_with_an_error_and_serves_on(starts: Starts) -> None:
    starts.start()
    zygote = eventually(starts.zygote)
    assert zygote and eventually(starts.socket().exists)
    r, w = os.pipe()
    try:
        assert _send(starts.socket(), b"garbage", [r, w]).startswith(b"error: not a zygote request")
        shim = Request([sys.executable, SHIM, "-id", "x"], 2, {}, "/", 0o22).encode()
        assert _send(starts.socket(), shim, [r]) == b"error: run takes 2 fds, not 1\n"
        delete = Request([sys.executable, SHIM, "-id", "x", "delete"], 2, {}, "/", 0o22).encode()
        assert _send(starts.socket(), delete, [r, w]) == b"error: delete takes 3 fds, not 2\n"
        start = Request([sys.executable, SHIM, "-id", "x", "start"], 2, {}, "/", 0o22).encode()
        assert (
            _send(starts.socket(), start, [r, w])
            == b"error: the zygote forks for run and delete, not start\n"
        )
        assert _send(starts.socket(), b"\xff" * 8, [r, w]).startswith(b"error:")
    finally:
        os.close(r)
        os.close(w)
    pid, _ = starts.start()
    assert f"KATA_SHIM_FORKED_BY={zygote}".encode() in Path(f"/proc/{pid}/environ").read_bytes()


@ROOT_ONLY
def test_the_zygote_answers_nobody_but_its_own_uid(starts: Starts) -> None:
    # a zygote directory that uid 65534 can reach (pytest's tmp_path is below 0700 directories)
    reachable = Path(tempfile.mkdtemp(prefix="kzu-", dir="/tmp"))
    os.chmod(reachable, 0o711)
    starts.zygotes = reachable / "z"
    starts.env["KATA_SHIM_ZYGOTE_DIR"] = str(starts.zygotes)
    starts.cleanup_paths.append(reachable)
    starts.start()
    zygote = eventually(starts.zygote)
    assert zygote and eventually(starts.socket().exists)
    os.chmod(starts.zygotes, 0o711)  # let uid 65534 reach the socket
    os.chmod(starts.socket(), 0o666)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        status = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            payload = Request([sys.executable], 1, {}, "/", 0o22).encode()
            status = 0 if _send(starts.socket(), payload, [r, w]) == b"" else 2
        except BaseException as err:
            os.write(2, f"uid 65534: {err!r}\n".encode())
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    os.close(r)
    os.close(w)
    assert os.waitstatus_to_exitcode(status) == 0, "the zygote answered another uid"
    assert starts.zygote() == zygote


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"pid 4242\n", 4242),
        (b"stale: /x.py changed\n", None),
        (b"error: bad request\n", None),
        (b"", None),  # it went away before forking
        (None, ZygoteError),  # it holds the fds and says nothing: may yet fork
    ],
)
def test_start_execs_only_when_the_zygote_says_it_did_not_fork(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: bytes | None, expected: object
) -> None:
    directory = tmp_path / "z"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("KATA_SHIM_ZYGOTE_DIR", str(directory))
    got: list[tuple[bytes, int]] = []

    def zygote(server: socket.socket) -> None:
        conn, _ = server.accept()
        with conn:
            data, fds, _, _ = socket.recv_fds(conn, 65536, 2)
            got.append((data, len(fds)))
            for fd in fds:
                os.close(fd)
            if answer is None:
                conn.recv(1)  # holds the connection until the client gives up
            else:
                conn.sendall(answer)

    request = Request([sys.executable, "x", "-id", "a"], 2, {"A": "1"}, "/", 0o22)
    r, w = os.pipe()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(directory / f"{key()}.sock"))
        server.listen(1)
        thread = threading.Thread(target=zygote, args=(server,))
        thread.start()
        try:
            if expected is ZygoteError:
                with pytest.raises(ZygoteError, match=r"did not answer within 0\.5 s"):
                    fork_via_zygote(request, (r, w), answer_within=0.5)
            else:
                assert fork_via_zygote(request, (r, w), answer_within=5) == expected
        finally:
            thread.join(10)
            os.close(r)
            os.close(w)
    data, nfds = got[0]
    assert nfds == 2 and int.from_bytes(data[:4], "big") == len(data) - 4
    assert Request.decode(data[4:]) == request


def test_no_zygote_is_asked_in_a_directory_others_can_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "z"
    directory.mkdir(mode=0o700)
    os.chmod(directory, 0o770)
    monkeypatch.setenv("KATA_SHIM_ZYGOTE_DIR", str(directory))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(directory / f"{key()}.sock"))
        server.listen(1)
        server.setblocking(False)
        r, w = os.pipe()
        try:
            assert fork_via_zygote(Request(["p"], 1, {}, "/", 0o22), (r, w)) is None
            with pytest.raises(BlockingIOError):
                server.accept()  # never even connected
        finally:
            os.close(r)
            os.close(w)


DELETE_PROBE = textwrap.dedent(
    """
    import sys
    from kata_shim.shim._zygote import delete_via_zygote
    status = delete_via_zygote(sys.argv[1:])
    print(f"status={status}", file=sys.stderr)
    """
)


@ROOT_ONLY
def test_delete_runs_in_a_fork_of_the_zygote_on_the_clients_stdio(starts: Starts) -> None:
    starts.start()
    assert eventually(starts.zygote) and eventually(starts.socket().exists)
    id = f"z-{uuid.uuid4().hex[:12]}"
    bundle = starts.tmp / id
    bundle.mkdir()
    state_root = Path(starts.env["KATA_SHIM_STATE_ROOT"])
    leftover = subprocess.Popen(["sleep", "60"])
    shared = sandbox_dir(id, state_root) / "shared"
    try:
        start = process_start_time(leftover.pid)
        assert start is not None
        StateStore(state_root).save(SandboxState(id, shim_pid=leftover.pid, shim_start_time=start))
        shared.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(shared)], check=True)
        flags = ["-namespace", "zt", "-address", starts.address, "-publish-binary", "/bin/true", "-id", id]
        done = subprocess.run(
            [sys.executable, "-c", DELETE_PROBE, *flags, "-bundle", str(bundle), "delete"],
            cwd=bundle,
            env=starts.env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert "status=0" in done.stderr.decode(), done.stderr.decode()  # the zygote's fork did it
        assert task_pb2.DeleteResponse.FromString(done.stdout).exit_status == 137
        assert leftover.wait(timeout=5) == -signal.SIGKILL
        assert not sandbox_dir(id, state_root).exists()
        assert str(shared) not in Path("/proc/self/mounts").read_text()
    finally:
        leftover.kill()
        subprocess.run(["umount", "-l", str(shared)], check=False, capture_output=True)


def test_no_zygote_no_delete_in_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KATA_SHIM_ZYGOTE_DIR", str(tmp_path / "none"))
    assert delete_via_zygote(["-id", "x", "delete"]) is None
