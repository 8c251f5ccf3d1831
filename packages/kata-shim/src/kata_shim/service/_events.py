"""Events to containerd: Events/Forward calls on its ttrpc socket (the TTRPC_ADDRESS the shim was given).

`publish` only queues (it never blocks on containerd and never raises); one task forwards the queue in
order over one connection, reconnecting and retrying a few times before it drops an event. containerd
1.6 sends shims no namespace metadata, so the namespace is the shim's -namespace flag.

OOM events come from the guest, so a hostile guest must not be able to crowd out the lifecycle events
(create, start, exit...) that containerd waits for: lifecycle events go first, in order; OOM events wait
in a side queue with at most one pending per container, and one for a container whose last OOM event was
taken less than `oom_interval` seconds ago is coalesced into it (counted, not sent).
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import trio
from google.protobuf import empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from kata_proto import ttrpc
from kata_proto.containerd import EVENTS_SERVICE, event_pb2, events_pb2, pack_event, ttrpc_events_pb2

log = logging.getLogger("kata_shim.events")

_SEND_ERRORS = (ttrpc.TtrpcError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _unwrap(exc: BaseException) -> BaseException:
    # The client's nursery wraps what escapes it in a group (trio's strict groups).
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


Connector = Callable[[str], AbstractAsyncContextManager[ttrpc.TtrpcClient]]


@dataclass(frozen=True)
class PublisherStatistics:
    """Counts since the publisher was made."""

    queued: int
    forwarded: int
    dropped: int
    coalesced: int = 0
    """OOM events folded into one already pending or just sent for the same container."""


class EventPublisher:
    """Queues events and forwards them to containerd in order; run `run` in a nursery."""

    def __init__(
        self,
        ttrpc_address: str,
        namespace: str,
        *,
        attempts: int = 5,
        call_timeout: float = 5.0,
        backoff: float = 0.1,
        max_queued: int = 4096,
        oom_interval: float = 1.0,
        connect: Connector = ttrpc.open_ttrpc_client,
    ) -> None:
        self.address = ttrpc_address.removeprefix("unix://")
        self.namespace = namespace
        self._attempts = attempts
        self._call_timeout = call_timeout
        self._backoff = backoff
        self._connect = connect
        self._max_queued = max_queued
        self._oom_interval = oom_interval
        self._lifecycle: collections.deque[event_pb2.Envelope] = collections.deque()
        self._oom: dict[str, event_pb2.Envelope] = {}
        """container id -> its pending OOM event (insertion order is arrival order)."""
        self._oom_taken: dict[str, float] = {}
        self._ready = trio.Event()
        self._closed = False
        self._queued = self._forwarded = self._dropped = self._rejected = self._coalesced = 0
        self._idle = trio.Event()
        self._idle.set()

    def statistics(self) -> PublisherStatistics:
        """Events queued, forwarded and dropped so far."""
        return PublisherStatistics(
            self._queued, self._forwarded, self._dropped + self._rejected, self._coalesced
        )

    def envelope(self, topic: str, event: Message) -> event_pb2.Envelope:
        """The Envelope containerd expects: now, our namespace, the topic, the event as a bare-named Any."""
        stamp = timestamp_pb2.Timestamp()
        stamp.GetCurrentTime()
        return event_pb2.Envelope(
            timestamp=stamp, namespace=self.namespace, topic=topic, event=pack_event(event)
        )

    async def publish(self, topic: str, event: Message) -> None:
        """Queue `event` under `topic` (a `runtime.Publisher`: never raises, never waits on containerd)."""
        self.publish_nowait(topic, event)

    def publish_nowait(self, topic: str, event: Message) -> None:
        """`publish` for synchronous callers."""
        if isinstance(event, events_pb2.TaskOOM):
            cid = event.container_id
            last = self._oom_taken.get(cid)
            if cid in self._oom or (last is not None and trio.current_time() - last < self._oom_interval):
                self._coalesced += 1
                return
            if len(self._oom) >= self._max_queued:
                self._rejected += 1
                log.error("OOM event for %.64r dropped: %d containers have one pending", cid, len(self._oom))
                return
            self._oom[cid] = self.envelope(topic, event)
        elif self._closed or len(self._lifecycle) >= self._max_queued:
            self._rejected += 1
            log.error("event %s dropped: the queue is full or closed", topic)
            return
        else:
            self._lifecycle.append(self.envelope(topic, event))
        self._ready.set()
        self._queued += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle

    async def wait_idle(self) -> None:
        """Return once every queued event was forwarded or dropped."""
        while self._queued != self._forwarded + self._dropped:
            await self._idle.wait()

    async def _take(self) -> event_pb2.Envelope:
        """The next event to forward: lifecycle events first, then the oldest pending OOM event."""
        while not self._lifecycle and not self._oom:
            self._ready = trio.Event()
            await self._ready.wait()
        if self._lifecycle:
            return self._lifecycle.popleft()
        cid = next(iter(self._oom))
        self._oom_taken[cid] = trio.current_time()
        return self._oom.pop(cid)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward queued events until cancelled."""
        task_status.started()
        pending: event_pb2.Envelope | None = None
        attempts = 0
        while True:
            if pending is None:
                pending, attempts = await self._take(), 0
            if not self.address:
                log.debug("no TTRPC_ADDRESS: event %s not sent", pending.topic)
                self._done(ok=False)
                pending = None
                continue
            try:
                async with self._connect(self.address) as client:
                    while True:
                        if pending is None:
                            pending, attempts = await self._take(), 0
                        await self._forward(client, pending)
                        self._done(ok=True)
                        pending = None
            except Exception as exc:
                err = _unwrap(exc)
                if not isinstance(err, _SEND_ERRORS):
                    raise
                if pending is None:  # the idle connection broke: reconnect for the next event
                    continue
                attempts += 1
                if attempts >= self._attempts:
                    log.error("event %s dropped after %d attempts: %s", pending.topic, attempts, err)
                    self._done(ok=False)
                    pending = None
                else:
                    log.warning("event %s: attempt %d failed: %s", pending.topic, attempts, err)
                    await trio.sleep(self._backoff * attempts)

    async def _forward(self, client: ttrpc.TtrpcClient, envelope: event_pb2.Envelope) -> None:
        timeout = self._call_timeout if self._call_timeout > 0 else math.inf
        await client.call(
            EVENTS_SERVICE.full_name,
            "Forward",
            ttrpc_events_pb2.ForwardRequest(envelope=envelope),
            empty_pb2.Empty,
            timeout=None if timeout == math.inf else timeout,
            metadata={ttrpc.NAMESPACE_METADATA_KEY: self.namespace},
        )

    def _done(self, *, ok: bool) -> None:
        if ok:
            self._forwarded += 1
        else:
            self._dropped += 1
        if self._queued == self._forwarded + self._dropped:
            self._idle.set()
