"""GuestClock: the agent budget's clock, wall time less the boot vCPU thread's wait for a host CPU."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from kata_sys_util import GuestClock


def _schedstat(proc: Path, tid: int, run_ns: int, wait_ns: int) -> None:
    (proc / str(tid)).mkdir(parents=True, exist_ok=True)
    (proc / str(tid) / "schedstat").write_text(f"{run_ns} {wait_ns} 7\n")


def test_time_the_vcpu_waited_for_a_cpu_is_not_guest_time(tmp_path: Path) -> None:
    _schedstat(tmp_path, 42, 0, 5_000_000_000)  # waits before the start do not count
    clock = GuestClock(42, now=100.0, proc=tmp_path)
    _schedstat(tmp_path, 42, 1_000_000_000, 5_000_000_000 + 27_000_000_000)
    assert clock.waited() == pytest.approx(27.0)
    assert clock.elapsed(now=130.0) == pytest.approx(3.0)  # 30 s wall, 27 of them starved


def test_an_exited_thread_keeps_its_last_wait_and_no_thread_is_the_wall_clock(tmp_path: Path) -> None:
    _schedstat(tmp_path, 7, 0, 0)
    clock = GuestClock(7, now=0.0, proc=tmp_path)
    _schedstat(tmp_path, 7, 0, 4_000_000_000)
    assert clock.elapsed(now=10.0) == pytest.approx(6.0)
    (tmp_path / "7" / "schedstat").unlink()  # the VM stopped: its vCPU thread is gone
    assert clock.waited() == pytest.approx(4.0) and clock.elapsed(now=20.0) == pytest.approx(16.0)
    assert GuestClock(None, now=0.0, proc=tmp_path).elapsed(now=12.5) == 12.5
    (tmp_path / "9").mkdir()
    (tmp_path / "9" / "schedstat").write_text("garbage\n")
    assert GuestClock(9, now=0.0, proc=tmp_path).elapsed(now=3.0) == 3.0


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/schedstat").exists(), reason="kernel without SCHED_INFO")
def test_a_thread_sharing_its_cpu_with_a_busy_process_is_seen_waiting() -> None:
    # the kernel's accounting GuestClock stands on: a thread and a busy process on one CPU take turns,
    # so about half the thread's wall time is run-queue wait
    cpu = min(os.sched_getaffinity(0))
    tids: list[int] = []
    clock_box: list[GuestClock] = []
    stop = threading.Event()
    started = threading.Event()

    def spin() -> None:
        os.sched_setaffinity(0, {cpu})  # this thread only
        tids.append(threading.get_native_id())
        started.set()
        while not stop.is_set():
            pass

    hog = os.fork()
    if hog == 0:  # pragma: no cover - the child spins on the same CPU until killed
        os.sched_setaffinity(0, {cpu})
        while True:
            pass
    try:
        thread = threading.Thread(target=spin)
        thread.start()
        started.wait(10)
        clock_box.append(GuestClock(tids[0]))
        time.sleep(2.0)
        waited = clock_box[0].waited()
        elapsed = clock_box[0].elapsed()
    finally:
        stop.set()
        os.kill(hog, 9)
        os.waitpid(hog, 0)
        thread.join()
    assert waited > 0.2, waited  # CFS gives each ~1 s of the 2; 0.2 leaves room for a busy host
    assert elapsed < 2.0 - 0.2 + 0.5, elapsed


def test_now_is_monotonic_time_that_stands_still_while_the_vcpu_waits(tmp_path: Path) -> None:
    _schedstat(tmp_path, 5, 0, 0)
    clock = GuestClock(5, proc=tmp_path)
    first = clock.now()
    assert abs(first - time.monotonic()) < 0.5  # it starts as time.monotonic
    _schedstat(tmp_path, 5, 0, 3600 * 1_000_000_000)  # an hour of waiting since
    assert clock.now() < first  # max(0, ...) keeps elapsed at 0: the clock stands at its start
    assert clock.now() >= clock.started
