"""virtio-fs (virtio 1.2 §5.11): FUSE requests from the guest served by an inline passthrough server.

The event thread pops chains and serves most requests at once; requests that may block on the host
disk (READ, WRITE, FSYNC, FSYNCDIR, FALLOCATE, LSEEK, READDIR, READDIRPLUS) go to a small pool of
worker threads so a slow fsync never stalls vsock or the other devices. Workers only run
`FuseServer.handle`; they hand the reply back through a queue and an eventfd (`watched`/`handle_event`,
the `EventSource` contract), and the event thread writes it to guest memory and the used ring: the
rings have one writer.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import select
import struct
import threading
from dataclasses import dataclass
from typing import Any

from kata_sys_util import set_thread_name
from kata_virtio._device import DeviceError, VirtioDevice
from kata_virtio._memory import VirtioError
from kata_virtio._queue import DescriptorChain
from kata_virtio._spec import VIRTIO_ID_FS
from kata_virtio.fs.server import MAX_WRITE, UNLOCKED_OPCODES, FsPolicy, FuseServer

_log = logging.getLogger("kata_virtio.fs")

#: §5.11.4: the tag is a 36-byte, NUL-padded UTF-8 string.
TAG_SIZE = 36
QUEUE_SIZE = 1024
MAX_REQUEST = MAX_WRITE + 4096
#: Most descriptors one request's chain (or indirect table) may have. Linux needs max_pages (32) plus
#: a few headers; a longer chain is a driver error (NEEDS_RESET) and never walked to its end.
MAX_CHAIN_DESCRIPTORS = 1024
#: Chains served per queue per event-loop round; the rest wait for the next round (the eventfd), so
#: one busy queue cannot hold the event thread for more than this many requests.
CHAINS_PER_ROUND = 64
#: Worker threads for blocking host calls (named kata-fs-N, started at the first such request).
WORKERS = 2
#: Requests handed to the workers and not yet answered; past it the queue waits (bounds memory:
#: each holds at most MAX_REQUEST bytes of request and MAX_WRITE of reply, so about 8 MiB in all).
MAX_IN_FLIGHT = 32
_OPCODE = struct.Struct("<I")


@dataclass(slots=True)
class _Job:
    generation: int
    index: int
    chain: DescriptorChain
    request: bytes
    space: int
    reply: bytes | None = None


class VirtioFs(VirtioDevice):
    """A virtio-fs device sharing ``shared_dir`` under ``tag``: queue 0 is hiprio, then request queues.

    ``policy`` says what the guest may do to host objects (default: the safe `FsPolicy()`). It is an
    `EventSource`: the VMM polls `watched()` (one eventfd) and calls `handle_event` on the event thread.
    """

    device_type = VIRTIO_ID_FS

    def __init__(
        self,
        tag: str,
        shared_dir: str | os.PathLike[str],
        *,
        num_request_queues: int = 1,
        queue_size: int = QUEUE_SIZE,
        policy: FsPolicy | None = None,
    ) -> None:
        super().__init__()
        raw = tag.encode()
        if not raw or len(raw) > TAG_SIZE:
            raise DeviceError(f"virtio-fs tag must be 1..{TAG_SIZE} bytes of UTF-8")
        if num_request_queues < 1:
            raise DeviceError("virtio-fs needs at least one request queue")
        self.tag = tag
        self.num_request_queues = num_request_queues
        self.queue_max_sizes = (queue_size,) * (1 + num_request_queues)
        self.server = FuseServer(shared_dir, policy=policy)
        # Lock order: transport lock -> _done_lock (reset) ; _done_lock is a leaf, as is the server's.
        self._done_lock = threading.Lock()
        self._done: collections.deque[_Job] = collections.deque()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._in_flight = 0  # event thread only
        self._generation = 0  # bumped by a reset: answers from before it are dropped
        self._more: set[int] = set()  # queues left with chains after a round (event thread only)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = False

    def close(self) -> None:
        """Stop the workers and close the server's fds."""
        for _ in self._workers:
            self._jobs.put(None)
        for worker in self._workers:
            worker.join(10)
            if worker.is_alive():
                _log.warning("virtio-fs: %s is stuck in a host call; leaving it", worker.name)
        self._workers.clear()
        with self._done_lock:
            if not self._closed:
                self._closed = True
                os.close(self._efd)
        self.server.close()

    @property
    def avail_features(self) -> int:
        """No device-specific features (VIRTIO_FS_F_NOTIFICATION is not offered) (§5.11.3)."""
        return 0

    def config_bytes(self) -> bytes:
        """struct virtio_fs_config: tag[36], num_request_queues (§5.11.4)."""
        return struct.pack("<36sI", self.tag.encode(), self.num_request_queues)

    def save_state(self) -> dict[str, Any]:
        """The tag, and whether the guest started a FUSE session (mounted the share)."""
        return {"tag": self.tag, "fuse_session": self.server.initialized}

    def restore_state(self, state: dict[str, Any]) -> None:
        """A device whose guest never mounted it restores; a live FUSE session (node ids, open files the
        guest holds) lives in the saved process only and cannot be carried: `DeviceError`."""
        if state.get("fuse_session"):
            raise DeviceError(
                f"virtio-fs {self.tag!r}: the guest had mounted the share; its FUSE session (inodes, "
                "open files) cannot be carried into a restored VM"
            )
        if state.get("tag") != self.tag:
            raise DeviceError(f"virtio-fs tag {self.tag!r} is not the saved {state.get('tag')!r}")

    def on_activate(self) -> None:
        """Bound the chains the driver may hand us."""
        self._more = set()
        for q in self.queues:
            q.max_chain = MAX_CHAIN_DESCRIPTORS

    @property
    def busy(self) -> bool:
        """Whether requests wait for a worker's answer or for the next round (tests, statistics)."""
        return self._in_flight > 0 or bool(self._more)

    # -- event thread ------------------------------------------------------------------------------

    def queue_notify(self, index: int) -> None:
        """Serve up to CHAINS_PER_ROUND requests of queue ``index``; readable part is the request,
        writable part the reply. Leftovers are served from `handle_event` on the next round."""
        mem, q = self.memory, self.queues[index]
        assert mem is not None
        self._more.discard(index)
        served = 0
        used = False
        while True:
            q.disable_notification(mem)
            while True:
                if served >= CHAINS_PER_ROUND or self._in_flight >= MAX_IN_FLIGHT:
                    # Notifications stay off: we come back by ourselves, on the next round (the
                    # eventfd) or when a worker answers.
                    self._more.add(index)
                    if served >= CHAINS_PER_ROUND:
                        os.eventfd_write(self._efd, 1)
                    break
                chain = q.pop(mem)
                if chain is None:
                    break
                served += 1
                length = self._serve(index, chain)
                if length is not None:
                    q.add_used(mem, chain.head_index, length)
                    used = True
            if index in self._more or not q.enable_notification(mem):
                break
        if used:
            self.signal_used(index)

    def _serve(self, index: int, chain: DescriptorChain) -> int | None:
        mem = self.memory
        assert mem is not None
        reader = chain.reader(mem)
        # A request never exceeds max_write plus its headers; a longer chain only gets its header
        # read (the length check in the server then answers EINVAL) so the guest cannot make us
        # copy gigabytes.
        request = reader.read(MAX_REQUEST) if reader.remaining <= MAX_REQUEST else reader.read(40)
        space = chain.writable_len
        if len(request) >= 8 and _OPCODE.unpack_from(request, 4)[0] in UNLOCKED_OPCODES:
            self._start_workers()
            self._in_flight += 1
            self._jobs.put(_Job(self._generation, index, chain, request, space))
            return None
        reply = self.server.handle(request, space)
        return 0 if reply is None else chain.writer(mem).write(reply)

    def watched(self) -> dict[int, int]:
        """The eventfd that says workers answered or a queue has chains left."""
        return {} if self._closed else {self._efd: select.POLLIN}

    def handle_event(self, fd: int, events: int) -> None:
        """Put the workers' answers in the used rings and go on with queues left over; never raises."""
        with contextlib.suppress(OSError):  # EAGAIN: nothing new since the last read
            os.eventfd_read(self._efd)
        used: set[int] = set()
        while True:
            with self._done_lock:
                if not self._done:
                    break
                job = self._done.popleft()
            self._in_flight -= 1  # every answer is taken off, even when the device broke meanwhile
            try:
                if self._complete(job):
                    used.add(job.index)
            except VirtioError as err:
                self.fail(f"completing a request: {err}")
            except Exception as err:  # a bug must not kill the VMM event thread
                _log.exception("virtio-fs: completing a request failed")
                self.fail(f"completing a request: internal error {err!r}")
        try:
            if self.active:
                for index in sorted(used):
                    self.signal_used(index)
        except Exception:  # a reset from a vCPU thread raced us: there is nobody left to interrupt
            _log.debug("virtio-fs: device reset while signalling", exc_info=True)
        for index in sorted(self._more):
            self.notify(index)

    def _complete(self, job: _Job) -> bool:
        mem, queues = self.memory, self.queues
        if job.generation != self._generation or mem is None or not self.active:
            return False  # answered after a reset (or the device broke): its ring is gone
        length = 0 if job.reply is None else job.chain.writer(mem).write(job.reply)
        queues[job.index].add_used(mem, job.chain.head_index, length)
        return True

    # -- workers -----------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        while len(self._workers) < WORKERS:
            worker = threading.Thread(target=self._work, name=f"kata-fs-{len(self._workers)}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def _work(self) -> None:
        # The OS thread name too, so /proc/<pid>/task (and the shim's thread budget) shows who it is.
        set_thread_name(threading.current_thread().name)
        while (job := self._jobs.get()) is not None:
            job.reply = self.server.handle(job.request, job.space)  # never raises
            with self._done_lock:
                if self._closed:
                    return
                self._done.append(job)
                os.eventfd_write(self._efd, 1)

    def on_reset(self) -> None:
        """A reset drops every inode and handle the guest held (as FUSE_DESTROY), and the answers
        still to come for requests of the old rings.

        It runs on the thread that wrote the status register (a vCPU); the server's lock
        serialises it with requests on the event thread and the workers.
        """
        with self._done_lock:
            self._generation += 1
        self._more = set()  # rebound, not cleared: the event thread may be iterating the old one
        self.server.reset()
