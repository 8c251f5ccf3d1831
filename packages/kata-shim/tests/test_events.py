"""EventPublisher: order, namespace, reconnection and retries against a ttrpc Events server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from google.protobuf import empty_pb2

from kata_proto import ttrpc
from kata_proto.containerd import EVENTS_SERVICE, events_pb2, unpack_event
from kata_shim.service import EventPublisher


class Sink:
    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[Any] = []
        self.namespaces: list[str | None] = []
        self.fail_first = fail_first

    async def Forward(self, req: Any, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        if self.fail_first:
            self.fail_first -= 1
            raise ttrpc.Unavailable("not now")
        self.received.append(req.envelope)
        self.namespaces.append(ctx.namespace)
        return empty_pb2.Empty()


async def serve_sink(nursery: trio.Nursery, sink: Sink, path: str) -> str:
    """containerd's Events service, forwarding to `sink`, on a unix socket at `path` (returned)."""
    server = ttrpc.TtrpcServer()
    server.register(EVENTS_SERVICE, sink)
    return str(await nursery.start(server.serve_unix, path))


def _pid(envelope: Any) -> int:
    event: Any = unpack_event(envelope.event)
    return int(event.pid)


def exit_event(n: int) -> events_pb2.TaskExit:
    return events_pb2.TaskExit(container_id=f"c{n}", id=f"c{n}", pid=n, exit_status=n)


def test_events_arrive_in_order_with_namespace_and_bare_type_url(tmp_path: Path) -> None:
    sink = Sink()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            path = await serve_sink(nursery, sink, str(tmp_path / "ev.sock"))
            publisher = EventPublisher(f"unix://{path}", "ns1")
            await nursery.start(publisher.run)
            for n in range(50):
                await publisher.publish("/tasks/exit", exit_event(n))
            with trio.fail_after(5):
                await publisher.wait_idle()
            assert publisher.statistics().forwarded == 50
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert [_pid(e) for e in sink.received] == list(range(50))
    assert {e.namespace for e in sink.received} == {"ns1"}
    assert set(sink.namespaces) == {"ns1"}
    assert {e.event.type_url for e in sink.received} == {"containerd.events.TaskExit"}
    assert all(e.timestamp.seconds > 0 for e in sink.received)


def test_publisher_retries_until_containerd_listens(tmp_path: Path) -> None:
    sink = Sink(fail_first=2)

    async def main() -> None:
        path = str(tmp_path / "late.sock")
        publisher = EventPublisher(path, "ns", backoff=0.05, attempts=10)
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            publisher.publish_nowait("/tasks/exit", exit_event(1))
            publisher.publish_nowait("/tasks/exit", exit_event(2))
            await trio.sleep(0.2)  # nobody listens yet: connection refused, retried
            await serve_sink(nursery, sink, path)
            with trio.fail_after(5):
                await publisher.wait_idle()
            nursery.cancel_scope.cancel()
        stats = publisher.statistics()
        assert (stats.queued, stats.forwarded, stats.dropped) == (2, 2, 0)

    trio.run(main)
    assert [_pid(e) for e in sink.received] == [1, 2]


def test_publisher_drops_after_its_attempts_and_goes_on(tmp_path: Path) -> None:
    async def main() -> None:
        publisher = EventPublisher(str(tmp_path / "nobody.sock"), "ns", backoff=0.01, attempts=3)
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            await publisher.publish("/tasks/exit", exit_event(1))
            with trio.fail_after(5):
                await publisher.wait_idle()
            stats = publisher.statistics()
            assert (stats.queued, stats.forwarded, stats.dropped) == (1, 0, 1)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_publisher_without_address_drops_quietly() -> None:
    async def main() -> None:
        publisher = EventPublisher("", "ns")
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            await publisher.publish("/tasks/oom", events_pb2.TaskOOM(container_id="c"))
            with trio.fail_after(2):
                await publisher.wait_idle()
            assert publisher.statistics().dropped == 1
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_an_oom_flood_never_crowds_out_exits_and_is_coalesced_per_container(tmp_path: Path) -> None:
    """Finding 7 of the VM-boundary issue: a guest answering GetOOMEvent in a loop filled the bounded queue
    and later TaskExit events were dropped. Lifecycle events go first; OOM events keep one pending per
    container and one per `oom_interval` for the same container."""
    sink = Sink()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            path = await serve_sink(nursery, sink, str(tmp_path / "ev.sock"))
            publisher = EventPublisher(path, "ns", max_queued=64, oom_interval=3600)
            for _ in range(10_000):  # the guest floods before the forwarder even runs
                publisher.publish_nowait("/tasks/oom", events_pb2.TaskOOM(container_id="c1"))
                publisher.publish_nowait("/tasks/oom", events_pb2.TaskOOM(container_id="c2"))
            for n in range(3):
                publisher.publish_nowait("/tasks/exit", exit_event(n))
            await nursery.start(publisher.run)
            with trio.fail_after(10):
                await publisher.wait_idle()
            for _ in range(100):  # within oom_interval of the one just sent: folded
                publisher.publish_nowait("/tasks/oom", events_pb2.TaskOOM(container_id="c1"))
            publisher.publish_nowait("/tasks/exit", exit_event(3))
            with trio.fail_after(10):
                await publisher.wait_idle()
            stats = publisher.statistics()
            assert stats.dropped == 0 and stats.forwarded == 6
            assert stats.coalesced == 2 * 10_000 - 2 + 100
            nursery.cancel_scope.cancel()

    trio.run(main)
    topics = [e.topic for e in sink.received]
    assert topics == ["/tasks/exit"] * 3 + ["/tasks/oom"] * 2 + ["/tasks/exit"]
    ooms: list[Any] = [unpack_event(e.event) for e in sink.received if e.topic == "/tasks/oom"]
    assert [o.container_id for o in ooms] == ["c1", "c2"]
