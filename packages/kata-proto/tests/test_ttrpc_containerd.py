"""Interop with a ttrpc peer nobody here wrote: containerd 1.6's own ttrpc server.

Our client forwards events to `containerd.services.events.ttrpc.v1.Events/Forward` on
containerd's ttrpc socket, as a shim does, and `ctr events` must print them.
"""

from __future__ import annotations

import contextlib
import pathlib
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import trio
from containerd_fixture import PrivateContainerd, skip_reason
from google.protobuf import empty_pb2, timestamp_pb2

from kata_proto import containerd as containerd_proto
from kata_proto import ttrpc
from kata_proto._gen.containerd.events import task_pb2
from kata_proto._gen.containerd.services.ttrpc.events.v1 import events_pb2
from kata_proto._gen.containerd.types import event_pb2

pytestmark = [
    pytest.mark.containerd,
    pytest.mark.root,
    pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
]

EVENTS = events_pb2.DESCRIPTOR.services_by_name["Events"]
NAMESPACE = "kata-ttrpc-test"


def _envelope(topic: str, event: task_pb2.TaskExit, namespace: str = NAMESPACE) -> event_pb2.Envelope:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return event_pb2.Envelope(
        timestamp=stamp, namespace=namespace, topic=topic, event=containerd_proto.pack_event(event)
    )


class _Lines:
    """Lines a subprocess prints, readable with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._queue: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._queue.put(line)

    def wait_for(self, needle: str, timeout: float) -> str | None:
        """The first new line containing `needle`, or None after `timeout` seconds."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                return None
            self.seen.append(line)
            if needle in line:
                return line
        return None


@pytest.fixture
def ctr_events(containerd: PrivateContainerd) -> Iterator[_Lines]:
    proc = subprocess.Popen(
        [*containerd.ctr(), "events"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield _Lines(proc)
    finally:
        proc.kill()
        proc.wait()


async def _forward(client: ttrpc.TtrpcClient, envelope: event_pb2.Envelope) -> None:
    stub = ttrpc.ServiceStub(client, EVENTS, timeout=10, metadata={ttrpc.NAMESPACE_METADATA_KEY: NAMESPACE})
    resp = await stub.Forward(events_pb2.ForwardRequest(envelope=envelope))
    assert isinstance(resp, empty_pb2.Empty)


def test_task_exit_forwarded_through_our_client_shows_in_ctr_events(
    containerd: PrivateContainerd, ctr_events: _Lines
) -> None:
    async def main() -> None:
        async with ttrpc.open_ttrpc_client(containerd.ttrpc_address) as client:
            # `ctr events` subscribes some time after it starts: probe until it prints.
            for i in range(100):
                probe = task_pb2.TaskExit(container_id=f"probe-{i}", id=f"probe-{i}")
                await _forward(client, _envelope("/tasks/exit", probe))
                if await trio.to_thread.run_sync(ctr_events.wait_for, f"probe-{i}", 0.2):
                    break
            else:
                pytest.fail(f"ctr events printed nothing: {ctr_events.seen}\n{containerd.log()}")
            exit_event = task_pb2.TaskExit(
                container_id="kata-interop", id="kata-interop-exec", pid=4242, exit_status=7
            )
            await _forward(client, _envelope("/tasks/exit", exit_event))

    trio.run(main)
    line = ctr_events.wait_for('"container_id":"kata-interop"', 10)
    assert line is not None, ctr_events.seen
    # ctr prints: timestamp, namespace, topic, the event as JSON.
    assert f" {NAMESPACE} /tasks/exit " in line
    assert '"container_id":"kata-interop"' in line
    assert '"id":"kata-interop-exec"' in line
    assert '"pid":4242' in line and '"exit_status":7' in line


def test_containerd_errors_come_back_typed_and_concurrent_calls_all_land(
    containerd: PrivateContainerd,
) -> None:
    async def main() -> None:
        async with ttrpc.open_ttrpc_client(containerd.ttrpc_address) as client:
            with pytest.raises(ttrpc.InvalidArgument, match="namespace"):
                await _forward(client, _envelope("/tasks/exit", task_pb2.TaskExit(), namespace="Not Valid!"))
            with pytest.raises(ttrpc.InvalidArgument, match="must start with"):
                await _forward(client, _envelope("tasks-exit", task_pb2.TaskExit()))
            with pytest.raises(ttrpc.Unimplemented):
                await client.call(EVENTS.full_name, "Publish", empty_pb2.Empty(), empty_pb2.Empty, timeout=5)
            with pytest.raises(ttrpc.Unimplemented):
                await client.call("containerd.nope.v1.Nope", "Forward", empty_pb2.Empty(), empty_pb2.Empty)
            # Many calls in flight on one connection: containerd answers in whatever order.
            done = 0

            async def one(i: int) -> None:
                nonlocal done
                await _forward(client, _envelope("/tasks/exit", task_pb2.TaskExit(container_id=f"c{i}")))
                done += 1

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(one, i)
            assert done == 100

    trio.run(main)


FAKE_SHIM = pathlib.Path(__file__).resolve().parent / "fake_shim.py"


def test_containerd_drives_our_server_as_a_shim(containerd: PrivateContainerd) -> None:
    # containerd's Go ttrpc client calls the Task service our TtrpcServer serves.
    log = containerd.base / "shim-calls.log"
    shim = containerd.base / "fake-shim"
    shim.write_text(f'#!/bin/sh\nFAKE_SHIM_LOG={log} exec {sys.executable} {FAKE_SHIM} "$@"\n')
    shim.chmod(0o755)
    rootfs = containerd.base / "rootfs"
    rootfs.mkdir()
    argv = [*containerd.ctr(), "run", "--rm", "--rootfs", "--runtime", str(shim), str(rootfs), "fake1", "x"]
    run = subprocess.run(
        argv,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 7, f"{run.stderr}\n{containerd.log()}"  # the fake task's exit status
    calls = [line.split() for line in log.read_text().splitlines()]
    methods = [c[0] for c in calls]
    # Only the order containerd guarantees: Create comes first, Delete after the task was started and
    # waited for, Shutdown after Delete. Wait and Start race (`ctr run` issues Wait before Start, from
    # another goroutine), and Connect may come anywhere after Create.
    first = {m: methods.index(m) for m in ("Create", "Start", "Wait", "Delete", "Shutdown")}
    assert methods[0] == "Create", methods
    assert first["Start"] < first["Delete"] and first["Wait"] < first["Delete"], methods
    assert first["Delete"] < first["Shutdown"], methods
    assert all(c[1] == "fake1" for c in calls)
    # containerd sends its call timeouts as timeout_nano (State: 2 s, Shutdown: 3 s in 1.6).
    deadlines = {c[0]: c[2] for c in calls}
    assert deadlines["Create"] == "-"
    assert 0 < float(deadlines["Shutdown"]) <= 3
    # The daemon left by `start` answered Shutdown and exited, removing its socket.
    end = time.monotonic() + 10
    while any(str(FAKE_SHIM) in p for p in _cmdlines()) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(str(FAKE_SHIM) in p for p in _cmdlines())


def _cmdlines() -> list[str]:
    out = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return out
