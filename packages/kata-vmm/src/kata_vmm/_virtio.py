"""kata-virtio devices on virtio-mmio slots: device specs, ioeventfd doorbells, event-thread polling.

Each device gets one 4 KiB window on the MMIO bus and one GSI (an irqfd); the DSDT describes both as an
``LNRO0005`` device. Guest writes of QueueNotify (offset 0x50) hit an ioeventfd per queue, so a kick
costs no userspace exit on the vCPU; the event thread reads the eventfd and runs the device. Host fds
of a device (vsock's sockets, the tap) are polled on the same thread, with the interest set re-read
from `watched()` after every round, as kata-virtio's contract asks.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kata_virtio import (
    VIRTIO_MMIO_QUEUE_NOTIFY,
    EventSource,
    FsPolicy,
    GuestMemory,
    MmioTransport,
    Ticking,
    VirtioBlock,
    VirtioDevice,
    VirtioError,
    VirtioFs,
    VirtioNet,
    VirtioRng,
    VirtioVsock,
)
from kata_vmm._errors import ConfigError
from kata_vmm._event_loop import EventLoop
from kata_vmm._eventfd import IoEventFd, IrqFd
from kata_vmm._kvm import Vm

#: virtio 1.2 §4.2.2: QueueNotify register offset in the window.
TICK_SECONDS = 1.0

_log = logging.getLogger(__name__)


# --- device specs (what `VmConfig.devices` and the CLI name) -------------------------------------------
@dataclass(frozen=True)
class VsockSpec:
    """Hybrid vsock: host clients connect to ``uds``; guest connections to port P go to ``<uds>_P``.

    ``connect_timeout``: seconds a host connection may wait for the guest to accept it (then it is closed).
    """

    uds: Path
    guest_cid: int = 3
    connect_timeout: float = 10.0

    def build(self) -> VirtioDevice:
        """Open the device (binds ``uds``)."""
        return VirtioVsock(self.uds, self.guest_cid, connect_timeout=self.connect_timeout)


@dataclass(frozen=True)
class BlockSpec:
    """A raw image file as virtio-blk."""

    path: Path
    read_only: bool = False

    def build(self) -> VirtioDevice:
        """Open the image."""
        return VirtioBlock(self.path, read_only=self.read_only)


@dataclass(frozen=True)
class NetSpec:
    """virtio-net on tap ``tap`` (created if absent), optionally with a fixed MAC.

    With ``fd`` the tap is already open (e.g. opened inside another network namespace) and ``tap`` only
    names it; the device built takes the fd over (closing the device closes it)."""

    tap: str
    mac: str | None = None
    fd: int | None = None

    def build(self) -> VirtioDevice:
        """Open the tap (or wrap the open ``fd``)."""
        if self.fd is not None:
            return VirtioNet(self.fd, self.mac)
        return VirtioNet.with_tap(self.tap, self.mac)


@dataclass(frozen=True)
class FsSpec:
    """Inline virtio-fs sharing ``shared_dir`` under ``tag``; ``policy`` limits what the guest may create
    there (default: no device nodes, no setuid/setgid, no privileged xattrs, no chown)."""

    tag: str
    shared_dir: Path
    policy: FsPolicy = field(default_factory=FsPolicy)

    def build(self) -> VirtioDevice:
        """Open the shared directory."""
        if not self.shared_dir.is_dir():
            raise ConfigError(f"virtio-fs: {self.shared_dir} is not a directory")
        return VirtioFs(self.tag, self.shared_dir, policy=self.policy)


@dataclass(frozen=True)
class RngSpec:
    """virtio-rng fed from the host's getrandom()."""

    def build(self) -> VirtioDevice:
        """Create the device."""
        return VirtioRng()


DeviceSpec = VsockSpec | BlockSpec | NetSpec | FsSpec | RngSpec


def parse_block(text: str) -> BlockSpec:
    """``PATH[,ro]`` -> `BlockSpec`."""
    path, _, opts = text.partition(",")
    if not path:
        raise ConfigError(f"--block {text!r}: expected PATH[,ro]")
    read_only = False
    for opt in filter(None, opts.split(",")):
        if opt in ("ro", "readonly"):
            read_only = True
        elif opt != "rw":
            raise ConfigError(f"--block {text!r}: unknown option {opt!r} (expected ro)")
    return BlockSpec(Path(path), read_only)


def parse_net(text: str) -> NetSpec:
    """``TAP[,mac=aa:bb:cc:dd:ee:ff]`` -> `NetSpec`."""
    tap, _, opts = text.partition(",")
    if not tap:
        raise ConfigError(f"--net {text!r}: expected TAP[,mac=..]")
    mac = None
    for opt in filter(None, opts.split(",")):
        key, _, value = opt.partition("=")
        if key != "mac" or not value:
            raise ConfigError(f"--net {text!r}: unknown option {opt!r} (expected mac=..)")
        parts = value.split(":")
        if len(parts) != 6 or not all(len(p) == 2 for p in parts):
            raise ConfigError(f"--net {text!r}: bad MAC {value!r}")
        try:
            bytes.fromhex("".join(parts))
        except ValueError:
            raise ConfigError(f"--net {text!r}: bad MAC {value!r}") from None
        mac = value
    return NetSpec(tap, mac)


def parse_fs(text: str) -> FsSpec:
    """``TAG=DIR`` -> `FsSpec`."""
    tag, sep, directory = text.partition("=")
    if not sep or not tag or not directory:
        raise ConfigError(f"--fs {text!r}: expected TAG=DIR")
    return FsSpec(tag, Path(directory))


def parse_vsock(text: str) -> VsockSpec:
    """``UDS`` -> `VsockSpec`."""
    if not text:
        raise ConfigError("--vsock needs a unix socket path")
    return VsockSpec(Path(text))


def build_device(spec: DeviceSpec) -> VirtioDevice:
    """Open a spec's host resources; kata-virtio errors become `ConfigError`."""
    try:
        return spec.build()
    except VirtioError as err:
        raise ConfigError(str(err)) from err
    except OSError as err:
        raise ConfigError(f"{type(spec).__name__}: {err}") from err


# --- one device on the bus -------------------------------------------------------------------------------
class VirtioMmioDevice:
    """A `VirtioDevice` behind `MmioTransport` at ``base``, with one ioeventfd per queue (a `BusDevice`)."""

    def __init__(self, vm: Vm, device: VirtioDevice, memory: GuestMemory, irq: IrqFd, base: int) -> None:
        self.device = device
        self.base = base
        self._loop: EventLoop | None = None
        self.transport = MmioTransport(
            device,
            memory,
            irq,
            on_queue_notify=self._forward_notify,
            run_on_owner=self._run_on_owner,
        )
        self.doorbells: list[IoEventFd] = []
        try:
            for index in range(len(device.queue_max_sizes)):
                self.doorbells.append(IoEventFd(vm, base + VIRTIO_MMIO_QUEUE_NOTIFY, 4, datamatch=index))
        except BaseException:
            self.close_doorbells()
            raise

    def read(self, offset: int, size: int) -> bytes:
        """A vCPU's read of the window."""
        return self.transport.read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        """A vCPU's write of the window (QueueNotify writes no ioeventfd matched are forwarded)."""
        self.transport.write(offset, data)

    def _forward_notify(self, index: int) -> None:
        # device logic runs on the event thread only; before it exists (no loop) serve in place
        loop = self._loop
        if loop is None:
            self.transport.notify(index)
        else:
            loop.call_soon(lambda: self._serve(index))

    def _serve(self, index: int) -> None:
        # A device that stopped at its per-notification budget is kicked again through its own doorbell,
        # so the event loop serves every other fd before it comes back to this queue.
        if self.transport.notify(index) and index < len(self.doorbells):
            self.doorbells[index].write(1)

    def _run_on_owner(self, fn: Callable[[], None]) -> None:
        # activation and reset run where the device's queues and host fds are served, never beside them
        run_on_loop(self._loop, fn)

    def attach(self, loop: EventLoop) -> None:
        """Serve this device's doorbells on ``loop`` (before the loop starts)."""
        self._loop = loop
        for index, bell in enumerate(self.doorbells):
            loop.add_reader(bell.fd, self._doorbell(bell, index))

    def _doorbell(self, bell: IoEventFd, index: int) -> Callable[[int], None]:
        def ring(_mask: int) -> None:
            if bell.read():
                self._serve(index)

        return ring

    def close_doorbells(self) -> None:
        """Unregister the ioeventfds (before the VM fd closes)."""
        for bell in self.doorbells:
            with contextlib.suppress(OSError):
                bell.close()
        self.doorbells = []

    def close(self) -> None:
        """Release the ioeventfds and the device's host resources."""
        self.close_doorbells()
        self.device.close()


def run_on_loop(loop: EventLoop | None, fn: Callable[[], None]) -> None:
    """Run ``fn`` on ``loop``'s thread and return once it ran (from any thread; exceptions stay there).

    In place when there is no running loop, or when called on the loop's own thread. If the loop stops
    before it ran ``fn`` (the VM is going away), ``fn`` runs here once the loop thread is gone: a vCPU
    waiting on a reset never waits for a dead thread.
    """
    if loop is None or threading.current_thread() is loop.thread or not loop.thread.is_alive():
        fn()
        return
    done = threading.Event()
    claim = threading.Lock()  # whoever takes it runs fn: exactly once

    def job() -> None:
        if claim.acquire(blocking=False):
            try:
                fn()
            finally:
                done.set()

    try:
        loop.call_soon(job)
    except (OSError, ValueError):  # the loop closed its wake-up fd meanwhile: it is gone
        job()
        return
    while not done.wait(0.5):
        if not loop.thread.is_alive():
            job()
            done.wait()
            return


# --- host fds of all devices on the event thread ----------------------------------------------------------
class DevicePoller:
    """Keeps the event loop's epoll set equal to the union of every device's `watched()`.

    One map for all devices, so an fd number one device closes and another reuses in the same round
    goes to its new owner. Runs as an event-loop ticker: after each round of events, and at least
    every loop tick; calls `tick()` of devices that have one about once a second.

    Devices are served through kata_virtio's `EventSource` and `Ticking` protocols. Errors stay with
    the fd (or device) they belong to: an fd epoll refuses (closed, a regular file, O_PATH) is logged
    once, handed back to its device as ``POLLNVAL`` (which drops that connection), and every other fd
    of every device is still watched; a device whose `watched()` or `tick()` raises is logged and
    skipped for that round.
    """

    def __init__(self, loop: EventLoop, devices: Sequence[object]) -> None:
        self.loop = loop
        self.sources = [d for d in devices if isinstance(d, EventSource)]
        self.tickers = [d for d in devices if isinstance(d, Ticking)]
        self._owner: dict[int, EventSource] = {}
        self._events: dict[int, int] = {}
        self._unpollable: dict[int, EventSource] = {}  # fds epoll refused, reported once while listed
        self._next_tick = time.monotonic() + TICK_SECONDS
        loop.add_ticker(self.sync)

    def sync(self) -> None:
        """Re-read every device's interest set and update epoll; run the 1 s ticks when due."""
        now = time.monotonic()
        if now >= self._next_tick:
            self._next_tick = now + TICK_SECONDS
            for ticker in self.tickers:
                try:
                    ticker.tick()
                except Exception:
                    _log.exception("%s.tick failed", type(ticker).__name__)
        wanted: dict[int, tuple[EventSource, int]] = {}
        for src in self.sources:
            try:
                interest = src.watched()
            except Exception:
                _log.exception("%s.watched failed; its fds are skipped this round", type(src).__name__)
                continue
            for fd, events in interest.items():
                wanted[fd] = (src, _epoll_mask(events))
        for fd in [fd for fd in self._owner if fd not in wanted]:
            self.loop.remove_reader(fd)
            del self._owner[fd], self._events[fd]
        for fd in [fd for fd in self._unpollable if fd not in wanted]:
            del self._unpollable[fd]  # its device let it go: a later fd with this number is new
        for fd, (src, mask) in wanted.items():
            if self._owner.get(fd) is src and self._events[fd] == mask:
                continue
            try:
                self.loop.watch(fd, self._dispatch(fd), mask)
            except (OSError, ValueError) as err:
                self._refused(fd, src, err)
                continue
            self._owner[fd], self._events[fd] = src, mask
            self._unpollable.pop(fd, None)

    def _refused(self, fd: int, src: EventSource, err: Exception) -> None:
        """epoll will not take ``fd``: forget it, say so once, and let its device drop it."""
        self.loop.remove_reader(fd)
        self._owner.pop(fd, None)
        self._events.pop(fd, None)
        if self._unpollable.get(fd) is not src:
            _log.warning("%s: fd %d cannot be polled (%s); dropping it", type(src).__name__, fd, err)
            self._unpollable[fd] = src
        try:
            src.handle_event(fd, select.POLLNVAL)
        except Exception:
            _log.exception("%s.handle_event(POLLNVAL) failed", type(src).__name__)

    def _dispatch(self, fd: int) -> Callable[[int], None]:
        def ready(mask: int) -> None:
            src = self._owner.get(fd)
            if src is not None:
                src.handle_event(fd, _poll_mask(mask))

        return ready

    def close(self) -> None:
        """Forget every fd (the loop is stopped or the devices are closing)."""
        for fd in list(self._owner):
            self.loop.remove_reader(fd)
        self._owner.clear()
        self._events.clear()
        self._unpollable.clear()


# poll(2) and epoll(7) share the values of IN/OUT/ERR/HUP; map explicitly so that stays checked
_BITS = (
    (select.POLLIN, select.EPOLLIN),
    (select.POLLOUT, select.EPOLLOUT),
    (select.POLLERR, select.EPOLLERR),
    (select.POLLHUP, select.EPOLLHUP),
    (select.POLLPRI, select.EPOLLPRI),
)


def _epoll_mask(poll_events: int) -> int:
    return sum(e for p, e in _BITS if poll_events & p)


def _poll_mask(epoll_events: int) -> int:
    return sum(p for p, e in _BITS if epoll_events & e)


def raise_nofile_limit() -> None:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (virtio-fs holds an fd per guest-known inode)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
