"""The `kata-agent` process and `kata-agent-ctl` end to end; measures start-up and the agent's RSS."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_harness import RUNC

from kata_agent._logs import log_level_from_cmdline

pytestmark = pytest.mark.root

BIN = Path(sys.executable).parent


@pytest.fixture
def agent_process() -> Iterator[tuple[str, subprocess.Popen[bytes], float]]:
    """`kata-agent --listen unix:...` with runc; yields (address, process, seconds to SERVING)."""
    base = tempfile.mkdtemp(prefix="kacli-", dir="/tmp")
    sock = os.path.join(base, "agent.sock")
    argv = [
        str(BIN / "kata-agent"),
        f"--listen=unix:{sock}",
        f"--log-listen=unix:{sock}.log",
        f"--runtime={RUNC}",
        f"--runtime-root={base}/runc",
        f"--run-dir={base}/run",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
    try:
        check = [str(BIN / "kata-agent-ctl"), f"--addr=unix:{sock}", "--ready-timeout=20", "check"]
        out = subprocess.run(check, capture_output=True, text=True, timeout=30, check=False)
        ready = time.monotonic() - t0
        assert out.stdout.strip() == "SERVING", out.stderr
        yield f"unix:{sock}", proc, ready
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        assert proc.returncode == 0, err.decode()
        shutil.rmtree(base, ignore_errors=True)


def _ctl(addr: str, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / "kata-agent-ctl"), f"--addr={addr}", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def test_agent_and_ctl_run_exec_kill_wait(
    busybox_rootfs: Path, agent_process: tuple[str, subprocess.Popen[bytes], float]
) -> None:
    addr, proc, ready = agent_process
    assert _ctl(addr, "version").stdout.startswith(b"agent ")
    run = _ctl(addr, "run", str(busybox_rootfs), "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (run.returncode, run.stdout, run.stderr) == (3, b"out\n", b"err\n")
    piped = _ctl(addr, "run", "-i", str(busybox_rootfs), "--", "tr", "a-z", "A-Z", stdin=b"hello\n")
    assert (piped.returncode, piped.stdout) == (0, b"HELLO\n")
    keep = _ctl(addr, "run", "--id", "bg", "--keep", str(busybox_rootfs), "--", "sleep", "100")
    assert keep.returncode == 0 and keep.stdout.strip() == b"bg", keep.stderr
    ex = _ctl(addr, "exec", "bg", "--", "sh", "-c", "cat /proc/1/cmdline; exit 5")
    assert (ex.returncode, ex.stdout) == (5, b"sleep\x00100\x00")
    rss = _status(proc.pid, "VmRSS")
    threads = _status(proc.pid, "Threads")
    stats = _ctl(addr, "stats", "bg")
    assert stats.returncode == 0 and b"memory_usage=" in stats.stdout and b"pids_current=1" in stats.stdout
    assert _ctl(addr, "pause", "bg").returncode == 0
    assert _ctl(addr, "resume", "bg").returncode == 0
    assert _ctl(addr, "kill", "bg", "KILL").returncode == 0
    assert _ctl(addr, "wait", "bg").stdout.strip() == b"137"
    assert _ctl(addr, "rm", "bg").returncode == 0
    missing = _ctl(addr, "wait", "bg")
    assert missing.returncode == 1 and missing.stderr.startswith(b"kata-agent-ctl: WaitProcess: NOT_FOUND: ")
    zombies = [
        p
        for p in os.listdir("/proc")
        if p.isdigit() and _stat_field(p, 3) == str(proc.pid) and _stat_field(p, 2) == "Z"
    ]
    print(
        f"\nkata-agent: SERVING {ready * 1000:.0f} ms after spawn, RSS {rss // 1024} MiB, "
        f"{threads} threads with one container"
    )
    assert threads <= 8  # trio's thread + a few cached worker threads; not one per container
    assert zombies == []


def _stat_field(pid: str, index: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[index - 2]
    except (OSError, IndexError):
        return ""


def test_ctl_reports_bad_address_and_unreachable_agent() -> None:
    bad = subprocess.run(
        [str(BIN / "kata-agent-ctl"), "--addr=tcp://x", "check"], capture_output=True, check=False
    )
    assert bad.returncode == 1 and bad.stderr.startswith(b"kata-agent-ctl: BadAddress: ")
    gone = subprocess.run(
        [str(BIN / "kata-agent-ctl"), "--addr=unix:/tmp/does-not-exist.sock", "--ready-timeout=0.2", "check"],
        capture_output=True,
        check=False,
    )
    assert gone.returncode == 1 and gone.stderr.startswith(b"kata-agent-ctl: AgentTimeout: ")


def _stderr_of_one_check(level: str, runtime: str = RUNC) -> str:
    """Run the agent with `--log-level=level`, ask it one Health.Check, stop it: what it wrote on stderr."""
    with tempfile.TemporaryDirectory(prefix="kalog-", dir="/tmp") as base:
        sock = os.path.join(base, "agent.sock")
        argv = [str(BIN / "kata-agent"), f"--listen=unix:{sock}", "--log-listen=none"]
        argv += [f"--runtime={runtime}", f"--run-dir={base}/run", f"--log-level={level}"]
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE)
        try:
            check = _ctl(f"unix:{sock}", "--ready-timeout=20", "check")
            assert check.stdout.strip() == b"SERVING", check.stderr
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=20)
    return err.decode()


@pytest.mark.parametrize(("level", "debug_lines"), [("debug", True), ("trace", True), ("info", False)])
def test_agent_log_level_reaches_its_ttrpc_server(level: str, debug_lines: bool) -> None:
    # `--log-level` stands in for `agent.log=` on the guest's kernel command line (the same code path)
    err = _stderr_of_one_check(level)
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    served = [e for e in lines if e["msg"].startswith("ttrpc: grpc.Health/Check answered OK in ")]
    assert bool(served) == debug_lines, lines
    if served:
        assert served[0]["level"] == "DEBG" and served[0]["subsystem"] == "kata_proto.ttrpc"
    assert any(e["msg"] == "agent ready" for e in lines)


def test_agent_log_level_from_kernel_cmdline() -> None:
    assert log_level_from_cmdline("quiet agent.log=debug console=ttyS0") == "debug"
    assert log_level_from_cmdline("agent.log=info agent.log=warn") == "warn"
    assert log_level_from_cmdline("agent.logx=debug") == "info"
    assert log_level_from_cmdline("") == "info"


def test_agent_refuses_an_unknown_log_level_by_falling_back_to_info() -> None:
    text = _stderr_of_one_check("chatty")
    assert "kata-agent: unknown log level 'chatty', using info" in text
    assert '"agent ready"' in text and "answered OK" not in text


def test_agent_preloads_its_runtime_and_serves_without_one() -> None:
    assert f"runtime {RUNC} preloaded in " in _stderr_of_one_check("debug")
    text = _stderr_of_one_check("info", runtime="/nonexistent/crun")
    assert "runtime /nonexistent/crun did not run (--version)" in text and '"agent ready"' in text
