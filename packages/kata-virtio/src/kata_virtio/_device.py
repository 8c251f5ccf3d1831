"""The transport-agnostic device interface: what a transport (virtio-mmio, vhost-user) calls."""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from kata_virtio._memory import GuestMemory, VirtioError
from kata_virtio._queue import DescriptorChain, Queue
from kata_virtio._spec import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC

_log = logging.getLogger("kata_virtio")


class DeviceError(VirtioError):
    """Raised when a device cannot be configured or activated (bad back-end, bad queue set)."""


class DeviceInterrupt(Protocol):
    """What a device may ask of its transport: interrupts and the NEEDS_RESET state."""

    def signal_used_queue(self, index: int) -> None:
        """Tell the driver that queue ``index`` has new used buffers (virtio 1.2 §2.7.7)."""
        ...

    def signal_config_change(self) -> None:
        """Tell the driver that the device configuration space changed (virtio 1.2 §2.5.1)."""
        ...

    def set_needs_reset(self, reason: str) -> None:
        """Enter the DEVICE_NEEDS_RESET state (virtio 1.2 §2.1.1) after an unrecoverable driver error."""
        ...


@runtime_checkable
class EventSource(Protocol):
    """A device back-end with host fds the VMM event loop watches (vsock, net).

    `watched()` is re-read after every `handle_event`; events are ``select.POLLIN``/``POLLOUT`` masks.
    ``select.POLLNVAL`` in `handle_event` means the loop cannot poll that fd (closed, a regular file, an
    O_PATH fd): the source drops whatever owns it and stops listing it; the other fds are unaffected.
    """

    def watched(self) -> dict[int, int]:
        """The fds to poll and the events of interest for each."""
        ...

    def handle_event(self, fd: int, events: int) -> None:
        """Serve readiness ``events`` on ``fd`` (``POLLNVAL``: drop it); never raises."""
        ...


@runtime_checkable
class Ticking(Protocol):
    """A device back-end with timeouts: the event loop calls `tick` about once a second."""

    def tick(self) -> None:
        """Expire what is overdue; never raises."""
        ...


class VirtioDevice(abc.ABC):
    """A virtio device as the transport sees it: identity, features, config space and queues."""

    #: virtio 1.2 §5 device id.
    device_type: int = 0
    #: Maximum size of each queue; its length is the number of queues.
    queue_max_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.acked_features = 0
        self.memory: GuestMemory | None = None
        self.queues: list[Queue] = []
        self.interrupt: DeviceInterrupt | None = None
        self.broken = False
        self._more: set[int] = set()  # queues drain_queue left with chains at its budget

    @property
    @abc.abstractmethod
    def avail_features(self) -> int:
        """Feature bits the device offers (virtio 1.2 §2.2)."""

    def ack_features(self, features: int) -> None:
        """Record the features the driver accepted (a subset of `avail_features`)."""
        self.acked_features = features

    def queue_count(self) -> int:
        """How many queues the driver sets up with the features it accepted (virtio-balloon: the
        optional queues exist only with their feature, §5.5.2); default: all of `queue_max_sizes`."""
        return len(self.queue_max_sizes)

    def has_feature(self, n: int) -> bool:
        """Whether feature bit ``n`` was negotiated."""
        return bool(self.acked_features >> n & 1)

    @abc.abstractmethod
    def config_bytes(self) -> bytes:
        """The device-specific configuration space (virtio 1.2 §2.5)."""

    def read_config(self, offset: int, size: int) -> bytes:
        """Read ``size`` bytes of the config space; bytes past its end read as zero."""
        config = self.config_bytes()
        data = config[offset : offset + size] if 0 <= offset < len(config) else b""
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """Write the config space; read-only by default (writes ignored)."""
        _log.debug("%s: ignored config write at %#x", type(self).__name__, offset)

    def activate(self, memory: GuestMemory, queues: Sequence[Queue], interrupt: DeviceInterrupt) -> None:
        """Start serving the driver after DRIVER_OK (virtio 1.2 §3.1.1)."""
        if len(queues) != self.queue_count():
            raise DeviceError(f"{type(self).__name__} needs {self.queue_count()} queues")
        self.memory = memory
        self.queues = list(queues)
        self.interrupt = interrupt
        self.broken = False
        for q in self.queues:
            q.event_idx = self.has_feature(VIRTIO_F_EVENT_IDX)
            q.indirect = self.has_feature(VIRTIO_F_INDIRECT_DESC)
        self.on_activate()

    def on_activate(self) -> None:  # noqa: B027 - optional hook
        """Hook run at the end of `activate`."""

    def on_driver_ok(self) -> None:  # noqa: B027 - optional hook
        """Hook run after `activate` when the driver sets DRIVER_OK (not when a snapshot is restored): a
        driver may make buffers available and kick before DRIVER_OK (Linux's virtio_balloon primes its
        stats queue in probe), and the transport drops a kick of an inactive device."""

    @property
    def active(self) -> bool:
        """Whether the device is activated and not broken."""
        return self.memory is not None and not self.broken

    def notify(self, index: int) -> bool:
        """Transport entry point for a queue notification: never raises, breaks the device instead.

        Returns True when `drain_queue` stopped at its budget with chains left: the caller must notify
        again soon (after serving other work), as if the driver had kicked once more.
        """
        if not self.active or not 0 <= index < len(self.queues):
            return False
        self._more.discard(index)
        try:
            self.queue_notify(index)
        except VirtioError as err:
            self.fail(f"queue {index}: {err}")
        except Exception as err:  # a bug must not kill the VMM event thread
            _log.exception("%s: queue %d handler failed", type(self).__name__, index)
            self.fail(f"queue {index}: internal error {err!r}")
        return index in self._more and self.active

    @abc.abstractmethod
    def queue_notify(self, index: int) -> None:
        """Process queue ``index`` after the driver kicked it; may raise `VirtioError` for a broken queue."""

    def fail(self, reason: str) -> None:
        """Stop processing and ask the transport to set DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2)."""
        if self.broken:
            return
        self.broken = True
        _log.warning("%s: needs reset: %s", type(self).__name__, reason)
        if self.interrupt is not None:
            self.interrupt.set_needs_reset(reason)

    def drain_queue(self, index: int, serve: Callable[[DescriptorChain], int], budget: int = 0) -> None:
        """Hand available chains of queue ``index`` to ``serve``, which returns the used length.

        Notifications stay suppressed while draining and the ring is checked once more after
        re-enabling them, so a buffer the driver adds in between is not missed (§2.7.10); the
        driver is interrupted once at the end if anything was used.

        At most ``budget`` chains per call (default: the queue size, one ring's worth): a driver that
        keeps refilling the ring cannot hold the event thread. Chains left over are recorded and
        `notify` returns True, so the transport notifies again after other work.
        """
        mem, q = self.memory, self.queues[index]
        assert mem is not None
        budget = budget or q.size
        used = 0
        while True:
            q.disable_notification(mem)
            while used < budget and (chain := q.pop(mem)) is not None:
                q.add_used(mem, chain.head_index, serve(chain))
                used += 1
            if used >= budget and q.pending(mem):
                self._more.add(index)  # notifications stay off: we come back without a kick
                break
            if not q.enable_notification(mem):
                break
        if used:
            self.signal_used(index)

    def signal_used(self, index: int) -> None:
        """Interrupt the driver for queue ``index`` unless it suppressed notifications (§2.7.7.2)."""
        assert self.memory is not None and self.interrupt is not None
        if self.queues[index].needs_notification(self.memory):
            self.interrupt.signal_used_queue(index)

    def reset(self) -> None:
        """Return to the initial state (virtio 1.2 §2.4); drop queues and memory."""
        self.memory = None
        self.queues = []
        self.interrupt = None
        self.acked_features = 0
        self.broken = False
        self._more.clear()
        self.on_reset()

    def on_reset(self) -> None:  # noqa: B027 - optional hook
        """Hook run by `reset` for back-end state."""

    # -- snapshot ----------------------------------------------------------------------------------

    def save_state(self) -> dict[str, Any]:
        """Device-specific state for a snapshot, as JSON-able values (the transport saves the rest:
        features, queues, activation). Default: nothing beyond the transport's."""
        return {}

    def restore_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Take back `save_state`'s values after the transport re-activated the device in a restored VM
        (with the snapshot's features and queues); raises `DeviceError` when this device cannot be the
        one that was saved (another disk size, a live FUSE session). Host connections are not carried:
        a device that had some tells the driver they are gone."""

    def close(self) -> None:  # noqa: B027 - devices with host resources override it
        """Release host resources (files, sockets, fds); the device is unusable afterwards."""
