"""`containerd-shim-kata-v2 start` and `delete` as containerd runs them (real processes)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from google.protobuf import any_pb2

from kata_proto import ttrpc
from kata_proto.containerd import SANDBOX_SERVICE, TASK_SERVICE, runtimeoptions_pb2, sandbox_pb2, task_pb2
from kata_shim.persist import SandboxState, StateStore, process_start_time, sandbox_dir
from kata_shim.shim import socket_address
from kata_shim.shim._address import socket_path
from kata_shim.shim._delete import SHUTDOWN_STUCK, SHUTTING_DOWN
from kata_shim.shim._wire import encode_delete_response

F = TypeVar("F", bound=Callable[..., Any])
SHIM = str(Path(sys.executable).parent / "containerd-shim-kata-v2")


def root_only(test: F) -> F:
    """The shim socket lives under /run/containerd/s: root only."""
    skip = pytest.mark.skipif(
        os.geteuid() != 0, reason="the shim socket lives under /run/containerd/s (root)"
    )
    return pytest.mark.root(skip(test))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("pid", "status", "ns"),
    [(0, 137, 1_700_000_000_123_456_789), (42, 0, 1_000_000_000), (2**32 - 1, 255, 5), (1, 1, 0)],
)
def test_delete_response_bytes_are_protobufs(pid: int, status: int, ns: int) -> None:
    data = encode_delete_response(pid, status, ns)
    expected = task_pb2.DeleteResponse(pid=pid, exit_status=status)
    expected.exited_at.FromNanoseconds(ns)
    assert task_pb2.DeleteResponse.FromString(data) == expected
    assert data == expected.SerializeToString()


class Shims:
    """Runs the console script like containerd does and kills what a test leaves."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.address = str(tmp / "containerd.sock")
        self.namespace = "kata-shim-test"
        self.state_root = tmp / "run-kata"
        self.env = {**os.environ, "KATA_SHIM_STATE_ROOT": str(self.state_root), "TTRPC_ADDRESS": ""}
        self.ids: list[str] = []

    def bundle(self, name: str, annotations: dict[str, str] | None = None) -> Path:
        bundle = self.tmp / name
        bundle.mkdir()
        (bundle / "config.json").write_text(
            json.dumps({"ociVersion": "1.0.2", "annotations": annotations or {}})
        )
        return bundle

    def new_id(self) -> str:
        id = f"t-{uuid.uuid4().hex[:12]}"
        self.ids.append(id)
        return id

    def run(
        self, id: str, action: str, bundle: Path, *extra: str, stdin: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the shim; stdin gets `stdin` and is closed, as containerd does."""
        argv = [SHIM, "-namespace", self.namespace, "-address", self.address, "-publish-binary", "/bin/true"]
        argv += ["-id", id, *extra, action]
        return subprocess.run(
            argv, cwd=bundle, env=self.env, capture_output=True, timeout=60, check=False, input=stdin
        )

    def shim_pids(self, id: str) -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                    if id.encode() in argv and any(b"containerd-shim-kata-v2" in a for a in argv):
                        pids.append(int(entry.name))
        return pids

    def cleanup(self) -> None:
        for id in self.ids:
            for pid in self.shim_pids(id):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket_path(socket_address(self.address, self.namespace, id)))


@pytest.fixture
def shims(tmp_path: Path) -> Iterator[Shims]:
    s = Shims(tmp_path)
    try:
        yield s
    finally:
        s.cleanup()


def wait_gone(pid: int, timeout: float = 10) -> bool:
    """True once ``pid`` has exited. The orphaned shim is re-parented to the nearest child subreaper, which
    is this pytest process when an earlier test ran the agent in-process: reap it then
    (as a subreaper must)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if process_start_time(pid) is None:
            return True
        time.sleep(0.05)
    return False


async def shutdown(address: str) -> None:
    async with ttrpc.open_ttrpc_client(socket_path(address)) as client:
        stub = ttrpc.ServiceStub(client, TASK_SERVICE, timeout=5)
        await stub.Shutdown(task_pb2.ShutdownRequest(id="x"))


@root_only
def test_start_twice_gives_the_same_address_and_one_shim(shims: Shims) -> None:
    id = shims.new_id()
    bundle = shims.bundle("b1")
    t0 = time.monotonic()
    first = shims.run(id, "start", bundle)
    elapsed = time.monotonic() - t0
    assert first.returncode == 0, first.stderr.decode()
    address = first.stdout.decode()
    assert address == socket_address(shims.address, shims.namespace, id)
    assert stat.S_ISSOCK(os.stat(socket_path(address)).st_mode)
    assert (bundle / "address").read_text() == address
    pid = int((bundle / "shim.pid").read_text())
    assert shims.shim_pids(id) == [pid]
    # A new session, cwd the bundle.
    assert os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/cwd") == str(bundle)
    # containerd's score + 1 (here the test process stands in for containerd).
    parent = int(Path("/proc/self/oom_score_adj").read_text())
    assert int(Path(f"/proc/{pid}/oom_score_adj").read_text()) == min(parent + 1, 1000)
    second = shims.run(id, "start", bundle)
    assert (second.returncode, second.stdout.decode()) == (0, address)
    assert shims.shim_pids(id) == [pid]
    print(f"start launched and confirmed a shim in {elapsed:.2f} s")
    trio.run(shutdown, address)
    assert wait_gone(pid)
    assert not os.path.exists(socket_path(address))


@root_only
def test_run_mode_serves_the_sandbox_api_and_shutdown_sandbox_ends_the_shim(shims: Shims) -> None:
    # containerd 2.x's shim sandboxer: the sandbox bundle has no config.json, the runtime options (with
    # their config_path) come on stdin only
    id = shims.new_id()
    bundle = shims.tmp / "sandbox"
    bundle.mkdir()
    options = runtimeoptions_pb2.Options(config_path="/etc/kata-containers/runtime-rs/pod.toml")
    opts = any_pb2.Any(type_url="runtimeoptions.v1.Options", value=options.SerializeToString())
    started = shims.run(id, "start", bundle, stdin=opts.SerializeToString())
    assert started.returncode == 0, started.stderr.decode()
    address = started.stdout.decode()
    pid = int((bundle / "shim.pid").read_text())
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"KATA_SHIM_RUNTIME_CONFIG_PATH=/etc/kata-containers/runtime-rs/pod.toml" in environ

    async def calls() -> None:
        async with ttrpc.open_ttrpc_client(socket_path(address)) as client:
            stub = ttrpc.ServiceStub(client, SANDBOX_SERVICE, timeout=10)
            await stub.PingSandbox(sandbox_pb2.PingRequest(sandbox_id=id))
            with pytest.raises(ttrpc.NotFound):
                await stub.SandboxStatus(sandbox_pb2.SandboxStatusRequest(sandbox_id=id))
            await stub.ShutdownSandbox(sandbox_pb2.ShutdownSandboxRequest(sandbox_id=id))

    trio.run(calls)
    assert wait_gone(pid)
    assert not os.path.exists(socket_path(address))


@root_only
def test_pod_container_start_prints_the_sandbox_address(shims: Shims) -> None:
    id = shims.new_id()
    bundle = shims.bundle(
        "c1", {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "pod-x"}
    )
    result = shims.run(id, "start", bundle)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == socket_address(shims.address, shims.namespace, "pod-x")
    assert shims.shim_pids(id) == []
    assert not (bundle / "shim.pid").exists()


@root_only
def test_run_mode_logs_to_the_bundle_log_fifo(shims: Shims) -> None:
    id = shims.new_id()
    bundle = shims.bundle("b1")
    os.mkfifo(bundle / "log")
    reader = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)
    try:
        result = shims.run(id, "start", bundle, "-debug")
        assert result.returncode == 0, result.stderr.decode()
        trio.run(shutdown, result.stdout.decode())
        assert wait_gone(int((bundle / "shim.pid").read_text()))
        text = os.read(reader, 65536).decode()
    finally:
        os.close(reader)
    assert (bundle / SHUTTING_DOWN).read_text() == (bundle / "shim.pid").read_text()  # its orderly shutdown
    assert f"shim {id} serving unix:///run/containerd/s/" in text
    # -debug: how long the new shim took to serve, since its exec and since `start`'s
    assert re.search(rf"shim {id}: serving \d+\.\d\d s after its exec, \d+\.\d\d s after `start`", text)
    assert "shutting down" in text


@root_only
def test_delete_cleans_up_after_a_dead_shim_and_prints_a_delete_response(shims: Shims) -> None:
    id = shims.new_id()
    bundle = shims.bundle("b1")
    leftover = subprocess.Popen(["sleep", "60"])
    try:
        store = StateStore(shims.state_root)
        start = process_start_time(leftover.pid)
        assert start is not None
        store.save(SandboxState(id, shim_pid=leftover.pid, shim_start_time=start))
        shared = sandbox_dir(id, shims.state_root) / "shared"
        shared.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(shared)], check=True)
        before = time.time()
        result = shims.run(id, "delete", bundle, "-bundle", str(bundle))
        assert result.returncode == 0, result.stderr.decode()
        response = task_pb2.DeleteResponse.FromString(result.stdout)
        assert response.exit_status == 137
        assert before - 1 <= response.exited_at.ToNanoseconds() / 1e9 <= time.time() + 1
        assert leftover.wait(timeout=5) == -signal.SIGKILL
        assert not sandbox_dir(id, shims.state_root).exists()
        assert str(shared) not in Path("/proc/self/mounts").read_text()
    finally:
        leftover.kill()
        subprocess.run(["umount", "-l", str(shared)], check=False, capture_output=True)


def _fake_shim(id: str, seconds: float) -> subprocess.Popen[bytes]:
    """A process `delete` takes for this container's shim (``kata_shim`` and the id in its argv)."""
    code = f"import time; time.sleep({seconds})"
    return subprocess.Popen([sys.executable, "-c", code, "kata_shim", "-id", id])


@root_only
@pytest.mark.parametrize("case", ["exits", "still-shutting-down", "wedged"])
def test_delete_waits_for_a_shim_in_its_orderly_shutdown_and_kills_a_wedged_one(
    shims: Shims, case: str
) -> None:
    """containerd runs `delete` as soon as the connection drops, which an orderly Shutdown does too: a shim
    that said it is shutting down is undoing what it made and is not killed (on a loaded host, killing it
    mid-unmount left the pod's mounts behind when containerd then killed `delete` at its 5 s). `delete`
    cleans up after it once it exited, leaves everything to it while it still runs, and kills one that has
    been shutting down for longer than SHUTDOWN_STUCK as before."""
    id = shims.new_id()
    bundle = shims.bundle("b1")
    shim = _fake_shim(id, {"exits": 1.0, "still-shutting-down": 60, "wedged": 60}[case])
    shared = sandbox_dir(id, shims.state_root) / "shared"
    try:
        (bundle / "shim.pid").write_text(str(shim.pid))
        (bundle / SHUTTING_DOWN).write_text(str(shim.pid))
        if case == "wedged":
            old = time.time() - SHUTDOWN_STUCK - 10
            os.utime(bundle / SHUTTING_DOWN, (old, old))
        StateStore(shims.state_root).save(SandboxState(id))
        shared.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(shared)], check=True)
        result = shims.run(id, "delete", bundle, "-bundle", str(bundle))
        assert result.returncode == 0, result.stderr.decode()
        assert task_pb2.DeleteResponse.FromString(result.stdout).exit_status == 137
        mounted = str(shared) in Path("/proc/self/mounts").read_text()
        if case == "exits":  # waited for, not killed; then what it left is cleaned up
            assert shim.wait(timeout=5) == 0
            assert not mounted and not sandbox_dir(id, shims.state_root).exists()
        elif case == "still-shutting-down":  # left to finish: alive, and its mounts are its own to undo
            assert shim.poll() is None
            assert mounted
        else:
            assert shim.wait(timeout=5) == -signal.SIGKILL
            assert not mounted
    finally:
        shim.kill()
        shim.wait()
        subprocess.run(["umount", "-l", str(shared)], check=False, capture_output=True)


GATED_DELETE = """
import os, sys, time
from pathlib import Path
import kata_shim.persist, kata_shim.shim._delete
from kata_shim._cli import main

started, gate, answer_within = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
real = kata_shim.persist.cleanup_sandbox

def gated(*args, **kwargs):
    started.write_text("finisher")
    while not gate.exists():
        time.sleep(0.02)
    return real(*args, **kwargs)

kata_shim.persist.cleanup_sandbox = gated
kata_shim.shim._delete.ANSWER_WITHIN = answer_within
os.environ["KATA_SHIM_ZYGOTE_DIR"] = "off"  # here, where cleanup_sandbox is gated, not in a zygote's fork
sys.exit(main(sys.argv[4:]))
"""


@root_only
@pytest.mark.parametrize("case", ["delete-killed", "delete-answers-first"])
def test_delete_cleans_up_to_the_end_when_containerd_stops_waiting(
    shims: Shims, tmp_path: Path, case: str
) -> None:
    """containerd kills `delete` after 5 s and never runs it again (a loaded lab VM: the pod's state and
    mounts left for good). The cleanup runs in a finisher that outlives it: `delete` SIGKILLed while the
    cleanup is held up, containerd's pipes still close at once (the finisher holds none of them) and the
    cleanup ends once it may go on; with the cleanup held past ANSWER_WITHIN, `delete` answers anyway and
    says so on stderr, and the cleanup ends after it."""
    id = shims.new_id()
    bundle = shims.bundle("b1")
    started, gate = tmp_path / "started", tmp_path / "gate"
    StateStore(shims.state_root).save(SandboxState(id))
    shared = sandbox_dir(id, shims.state_root) / "shared"
    shared.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(shared)], check=True)
    argv = ["-namespace", shims.namespace, "-address", shims.address, "-id", id, "-bundle", str(bundle)]
    answer_within = 60.0 if case == "delete-killed" else 1.0
    cmd = [sys.executable, "-c", GATED_DELETE, str(started), str(gate), str(answer_within), *argv, "delete"]
    delete = subprocess.Popen(cmd, cwd=bundle, env=shims.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 30
        while not started.exists():
            assert delete.poll() is None and time.monotonic() < end, delete.communicate()
            time.sleep(0.02)
        if case == "delete-killed":
            delete.kill()
            out, err = delete.communicate(timeout=5)  # EOF: nothing but `delete` held its pipes
            assert delete.returncode == -signal.SIGKILL
        else:
            out, err = delete.communicate(timeout=30)
            assert delete.returncode == 0, err.decode()
            assert task_pb2.DeleteResponse.FromString(out).exit_status == 137
            assert b"cleanup still running 1 s after delete began, goes on" in err, err.decode()
        assert sandbox_dir(id, shims.state_root).exists()  # held up: nothing done yet
        gate.touch()
        end = time.monotonic() + 30
        while sandbox_dir(id, shims.state_root).exists() and time.monotonic() < end:
            time.sleep(0.05)
        assert not sandbox_dir(id, shims.state_root).exists()
        assert str(shared) not in Path("/proc/self/mounts").read_text()
    finally:
        gate.touch()
        delete.kill()
        delete.wait()
        subprocess.run(["umount", "-l", str(shared)], check=False, capture_output=True)


@root_only
def test_delete_of_a_pod_container_leaves_the_sandbox_alone(shims: Shims) -> None:
    id = shims.new_id()
    store = StateStore(shims.state_root)
    store.save(SandboxState(id))
    bundle = shims.bundle(
        "c1", {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": id}
    )
    result = shims.run("other-container", "delete", bundle)
    assert result.returncode == 0
    assert task_pb2.DeleteResponse.FromString(result.stdout).exit_status == 137
    assert store.load(id) is not None


def test_start_fails_with_the_message_the_new_shim_reports() -> None:
    from kata_shim.shim._start import StartError, _wait_ready

    r, w = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.write({w}, b'shim failed: cannot listen\\n')"], pass_fds=(w,)
    )
    os.close(w)
    try:
        with pytest.raises(StartError, match=r"^shim failed: cannot listen$"):
            _wait_ready(child.pid, child, r, timeout=10)
    finally:
        os.close(r)
        child.wait()


def test_start_fails_when_the_new_shim_dies_silently() -> None:
    from kata_shim.shim._start import StartError, _wait_ready

    r, w = os.pipe()
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], pass_fds=(w,))
    os.close(w)
    try:
        with pytest.raises(StartError, match="exited with status 3 before serving"):
            _wait_ready(child.pid, child, r, timeout=10)
    finally:
        os.close(r)


def test_run_mode_command_reuses_the_console_script_or_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    from kata_shim.shim import ShimFlags
    from kata_shim.shim._start import shim_command

    flags = ShimFlags(namespace="n", id="i", address="/a", publish_binary="/p")
    monkeypatch.setattr(sys, "argv", [SHIM, "start"])
    assert shim_command(flags)[:2] == [sys.executable, SHIM]
    monkeypatch.setattr(sys, "argv", ["/somewhere/__main__.py"])
    assert shim_command(flags) == [sys.executable, "-m", "kata_shim", *flags.to_argv()]
