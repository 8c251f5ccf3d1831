"""A device reset never runs beside the event thread (issue 11, finding 6, the vsock half).

The guest's vCPU thread writes status 0 whenever it likes. The reset used to run right there, on the vCPU
thread, dropping vsock connections from the dicts the event thread was iterating ("dictionary changed size
during iteration"), and closing sockets under it. Now the transport hands the reset to the device's owner
thread (kata-vmm's event loop, `run_on_loop`) and the vCPU waits for it.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kata_virtio import MmioTransport, VirtioRng, VirtioVsock
from kata_virtio._spec import VIRTIO_F_VERSION_1
from kata_virtio.testing import FakeGuestMemory, FakeInterrupt, mmio_bring_up
from kata_vmm._event_loop import EventLoop
from kata_vmm._virtio import DevicePoller, run_on_loop

STATUS = 0x070


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    ev = EventLoop(tick=0.01)
    ev.start()
    yield ev
    ev.stop()


def _wait(cond: object, what: str) -> None:
    done = threading.Event()
    for _ in range(3000):  # generous: up to a minute on a loaded machine
        if cond():  # type: ignore[operator]
            return
        done.wait(0.02)
    raise AssertionError(f"never: {what}")


def test_vcpu_reset_waits_for_the_event_thread_that_is_iterating_connections(
    loop: EventLoop, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dev = VirtioVsock(tmp_path / "kata.hvsock")
    mem = FakeGuestMemory(4 << 20)
    transport = MmioTransport(dev, mem, FakeInterrupt(), run_on_owner=lambda fn: run_on_loop(loop, fn))
    # Bring up on the loop thread, as the driver's writes would be served in the VMM.
    run_on_loop(loop, lambda: mmio_bring_up(transport, [64, 64, 16], features=1 << VIRTIO_F_VERSION_1))
    assert transport.activated
    DevicePoller(loop, [dev])
    clients = []
    for _ in range(8):  # connections waiting for the guest: they sit in the dicts watched() walks
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(dev.uds_path)
        c.sendall(b"CONNECT 1024\n")
        clients.append(c)
    _wait(lambda: dev.connection_count == 8, "8 connections")

    # Freeze the event thread inside watched(), mid-iteration, while a vCPU writes status 0.
    vcpu_done = threading.Event()
    in_watched = threading.Event()
    conn = next(iter(dev._conns.values()))
    real = conn.sock

    class Hook:
        def fileno(self) -> int:
            if not in_watched.is_set() and threading.current_thread() is loop.thread:
                in_watched.set()
                vcpu = threading.Thread(target=lambda: (transport.write_u32(STATUS, 0), vcpu_done.set()))
                vcpu.start()
                # Before the fix the reset ran on the vCPU at once and emptied the dict under us.
                vcpu_done.wait(2.0)
            return real.fileno()

        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

    conn.sock = Hook()  # type: ignore[assignment]
    try:
        with caplog.at_level(logging.ERROR):
            _wait(vcpu_done.is_set, "the vCPU's status write returned")
        # no "dictionary changed size during iteration" (or any other error) on the event thread
        assert (
            loop.errors == [] and [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        )
        assert transport.read_u32(STATUS) == 0 and not transport.activated
        assert dev.connection_count == 0 and dev.memory is None
    finally:
        conn.sock = real
        for c in clients:
            c.close()
        loop.stop()
        dev.close()


def test_run_on_loop_runs_in_place_once_the_loop_is_gone(tmp_path: Path) -> None:
    ev = EventLoop(tick=0.01)
    ran: list[str] = []
    run_on_loop(ev, lambda: ran.append(threading.current_thread().name))  # never started: in place
    ev.start()
    run_on_loop(ev, lambda: ran.append(threading.current_thread().name))
    ev.stop()
    run_on_loop(ev, lambda: ran.append(threading.current_thread().name))  # stopped: in place
    me = threading.current_thread().name
    assert ran == [me, ev.thread.name, me]


def test_a_device_whose_reset_fails_still_reads_back_status_0(loop: EventLoop) -> None:
    class Broken(VirtioRng):
        def on_reset(self) -> None:
            raise RuntimeError("bug")

    dev = Broken()
    transport = MmioTransport(
        dev, FakeGuestMemory(1 << 20), FakeInterrupt(), run_on_owner=lambda fn: run_on_loop(loop, fn)
    )
    run_on_loop(loop, lambda: mmio_bring_up(transport, [16], features=1 << VIRTIO_F_VERSION_1))
    assert transport.activated
    transport.write_u32(STATUS, 0)
    assert transport.read_u32(STATUS) == 0 and not transport.activated
