"""virtio-balloon (virtio 1.2 §5.5): the host asks for guest pages back; the guest can report free ones.

The host sets a target (`VirtioBalloon.set_target`, in 4 KiB pages) and the driver inflates towards it:
it takes pages from its allocator and sends their page frame numbers (le32, 4 KiB units) on the inflate
queue; the device gives the memory behind them back to the host (`GuestMemory.discard`). Deflating
sends PFNs on the deflate queue; nothing is done for them (without VIRTIO_BALLOON_F_MUST_TELL_HOST the
guest may reuse the page at once, and a discarded page simply reads as zeros). The driver reports the
balloon's size in the config field ``actual`` (`actual_pages`).

Optional, chosen when the device is made:

- statistics (VIRTIO_BALLOON_F_STATS_VQ, §5.5.6.3): the driver keeps one buffer of (le16 tag, le64 value)
  pairs on the stats queue; the device holds it, and every ``stats_interval`` seconds (`tick`) hands it
  back so the driver refills it. `stats()` returns the last values received.
- free page reporting (VIRTIO_BALLOON_F_PAGE_REPORTING, §5.5.6.6): each buffer on the reporting queue
  describes a range of free guest memory (its address and length: the buffer itself is the range); the
  device discards it and returns the buffer.

The optional queues exist only when their feature was negotiated, in the order stats, reporting (Linux's
driver numbers the queues it uses one after another: §5.5.2 and virtio_balloon.c's init_vqs).

A hostile driver gets nothing beyond its own RAM: a PFN or range outside guest RAM, unaligned, or crossing
the end of a region is skipped and counted (`rejected`); at most `MAX_PFNS_PER_BUFFER` PFNs are read from
one buffer and one ring's worth of buffers is served per kick (`drain_queue`'s budget).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from typing import Any

from kata_virtio._device import DeviceError, VirtioDevice
from kata_virtio._memory import DISCARD_ALIGN, GuestAddressError
from kata_virtio._queue import DescriptorChain
from kata_virtio._spec import VIRTIO_ID_BALLOON

_log = logging.getLogger("kata_virtio")

# virtio 1.2 §5.5.3: feature bits
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_PAGE_REPORTING = 5

#: §5.5.6: PFNs are always in 4 KiB units, whatever the guest's page size.
VIRTIO_BALLOON_PFN_SHIFT = 12
BALLOON_PAGE_SIZE = 1 << VIRTIO_BALLOON_PFN_SHIFT

#: §5.5.6.3: statistic tags (le16) and the names `stats()` uses for them.
BALLOON_STAT_NAMES = {
    0: "swap_in",
    1: "swap_out",
    2: "major_faults",
    3: "minor_faults",
    4: "free_memory",
    5: "total_memory",
    6: "available_memory",
    7: "disk_caches",
    8: "hugetlb_allocations",
    9: "hugetlb_failures",
    10: "oom_kills",
    11: "alloc_stalls",
    12: "async_scans",
    13: "direct_scans",
    14: "async_reclaims",
    15: "direct_reclaims",
}
_STAT = struct.Struct("<HQ")

#: Linux sends at most 256 PFNs per buffer (VIRTIO_BALLOON_ARRAY_PFNS_MAX); a longer one is read this far.
MAX_PFNS_PER_BUFFER = 1024
#: Statistics entries read from one stats buffer (the spec defines 16 tags; a hostile buffer may be huge).
MAX_STATS_ENTRIES = 64
#: Ranges (descriptors) taken from one reporting buffer (Linux: at most 32, PAGE_REPORTING_CAPACITY).
MAX_REPORT_RANGES = 256

QUEUE_SIZE = 256


class VirtioBalloon(VirtioDevice):
    """A memory balloon with optional statistics and free page reporting.

    ``stats_interval``: seconds between statistics refreshes (0: no statistics queue offered).
    ``free_page_reporting``: offer VIRTIO_BALLOON_F_PAGE_REPORTING. ``deflate_on_oom``: let the guest
    deflate under memory pressure (VIRTIO_BALLOON_F_DEFLATE_ON_OOM). ``initial_pages``: the target at
    start. The host API (`set_target`, `actual_pages`, `stats`, `target_pages`) is safe from any thread.
    """

    device_type = VIRTIO_ID_BALLOON

    def __init__(
        self,
        *,
        stats_interval: float = 0.0,
        free_page_reporting: bool = False,
        deflate_on_oom: bool = False,
        initial_pages: int = 0,
    ) -> None:
        super().__init__()
        if stats_interval < 0:
            raise DeviceError("stats_interval must not be negative")
        self.stats_interval = stats_interval
        self._offered = 0
        if stats_interval:
            self._offered |= 1 << VIRTIO_BALLOON_F_STATS_VQ
        if free_page_reporting:
            self._offered |= 1 << VIRTIO_BALLOON_F_PAGE_REPORTING
        if deflate_on_oom:
            self._offered |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        extra = bool(stats_interval) + free_page_reporting
        self.queue_max_sizes = (QUEUE_SIZE,) * (2 + extra)
        self._lock = threading.Lock()
        self._num_pages = self._check_pages(initial_pages)
        self._actual = 0
        self._stats: dict[str, int] = {}
        self._stats_head: int | None = None  # the stats buffer the device holds
        self._stats_due = 0.0
        self._stats_q: int | None = None
        self._report_q: int | None = None
        self.inflated = 0
        """Pages discarded through the inflate queue (since the device was made)."""
        self.reported = 0
        """Bytes discarded through free page reporting."""
        self.rejected = 0
        """PFNs and ranges refused: outside RAM, unaligned, past a buffer's cap."""

    # -- host API -----------------------------------------------------------------------------------

    @staticmethod
    def _check_pages(pages: int) -> int:
        if not 0 <= pages < 1 << 32:
            raise DeviceError(f"a balloon target is 0..2^32-1 pages of 4 KiB, not {pages}")
        return pages

    def set_target(self, pages: int) -> None:
        """Ask the driver to hold ``pages`` 4 KiB pages (config ``num_pages``, a config-change interrupt)."""
        with self._lock:
            self._num_pages = self._check_pages(pages)
            interrupt = self.interrupt if self.memory is not None else None
        if interrupt is not None:
            interrupt.signal_config_change()

    @property
    def target_pages(self) -> int:
        """The target the host set (config ``num_pages``)."""
        return self._num_pages

    @property
    def actual_pages(self) -> int:
        """The balloon's size as the driver reports it (config ``actual``); the guest's word, not a fact."""
        return self._actual

    def stats(self) -> dict[str, int]:
        """The last statistics the driver sent, by name (`BALLOON_STAT_NAMES`; unknown tags as ``tag_N``)."""
        with self._lock:
            return dict(self._stats)

    # -- transport side -------------------------------------------------------------------------------

    @property
    def avail_features(self) -> int:
        """The optional features chosen at construction (§5.5.3)."""
        return self._offered

    def queue_count(self) -> int:
        """inflateq, deflateq, then statsq and reporting_vq when negotiated (§5.5.2)."""
        return (
            2
            + self.has_feature(VIRTIO_BALLOON_F_STATS_VQ)
            + self.has_feature(VIRTIO_BALLOON_F_PAGE_REPORTING)
        )

    def config_bytes(self) -> bytes:
        """``num_pages``, ``actual`` (§5.5.4); the hint and poison fields are not offered."""
        return struct.pack("<II", self._num_pages, self._actual)

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver may write ``actual`` (§5.5.4.1); anything else is ignored."""
        if offset == 4 and len(data) == 4:
            self._actual = int.from_bytes(data, "little")
        else:
            _log.debug("virtio-balloon: ignored config write at %#x+%d", offset, len(data))

    def on_activate(self) -> None:
        """Number the optional queues from the negotiated features."""
        index = 2
        self._stats_q = self._report_q = None
        if self.has_feature(VIRTIO_BALLOON_F_STATS_VQ):
            self._stats_q, index = index, index + 1
        if self.has_feature(VIRTIO_BALLOON_F_PAGE_REPORTING):
            self._report_q = index
        self._stats_head = None

    def on_driver_ok(self) -> None:
        """Take the stats buffer Linux's driver queued and kicked in probe, before DRIVER_OK (the kick found
        the device inactive): without it no statistics ever arrive, the driver waits for that one back."""
        if self._stats_q is not None:
            self._take_stats()

    def on_reset(self) -> None:
        """The driver's buffers are gone; the host's target stays."""
        self._stats_head = None
        self._stats_q = self._report_q = None
        self._actual = 0

    def queue_notify(self, index: int) -> None:
        """Serve the queue the driver kicked."""
        if index == 0:
            self.drain_queue(0, self._inflate)
        elif index == 1:
            self.drain_queue(1, self._deflate)
        elif index == self._stats_q:
            self._take_stats()
        elif index == self._report_q:
            self.drain_queue(index, self._report)

    def tick(self) -> None:
        """About once a second (the VMM's event loop): hand the stats buffer back when a refresh is due."""
        if self._stats_q is None or self._stats_head is None or not self.active:
            return
        now = time.monotonic()
        if now < self._stats_due:
            return
        self._stats_due = now + self.stats_interval
        self.request_stats()

    def request_stats(self) -> None:
        """Return the held stats buffer so the driver refills it now (on the device's owner thread)."""
        if self._stats_q is None or self._stats_head is None or not self.active:
            return
        assert self.memory is not None
        head, self._stats_head = self._stats_head, None
        self.queues[self._stats_q].add_used(self.memory, head, 0)
        self.signal_used(self._stats_q)

    # -- queues ---------------------------------------------------------------------------------------

    def _inflate(self, chain: DescriptorChain) -> int:
        assert self.memory is not None
        if chain.writable:
            self.rejected += 1  # §5.5.6: PFN arrays are device-readable; a writable buffer is not a request
            return 0
        raw = chain.reader(self.memory).read(4 * MAX_PFNS_PER_BUFFER)
        if chain.readable_len > len(raw):
            self.rejected += (chain.readable_len - len(raw)) // 4
        pfns = sorted(set(struct.unpack(f"<{len(raw) // 4}I", raw[: len(raw) // 4 * 4])))
        # Coalesce consecutive PFNs: one madvise per run instead of one per page.
        start = prev = -2
        for pfn in [*pfns, -1]:
            if pfn == prev + 1:
                prev = pfn
                continue
            if start >= 0:
                self._discard_pages(start, prev - start + 1)
            start = prev = pfn
        return 0

    def _discard_pages(self, pfn: int, count: int) -> None:
        assert self.memory is not None
        try:
            self.memory.discard(pfn << VIRTIO_BALLOON_PFN_SHIFT, count << VIRTIO_BALLOON_PFN_SHIFT)
        except GuestAddressError:
            # A run reaching outside RAM: give back the pages that are RAM, one by one.
            for p in range(pfn, pfn + count):
                try:
                    self.memory.discard(p << VIRTIO_BALLOON_PFN_SHIFT, BALLOON_PAGE_SIZE)
                except GuestAddressError:
                    self.rejected += 1
                else:
                    self.inflated += 1
        else:
            self.inflated += count

    def _deflate(self, chain: DescriptorChain) -> int:
        # Without MUST_TELL_HOST the guest reuses deflated pages at once; a discarded page reads as zeros.
        return 0

    def _take_stats(self) -> None:
        assert self.memory is not None and self._stats_q is not None
        q = self.queues[self._stats_q]
        budget = q.size
        while budget and (chain := q.pop(self.memory)) is not None:
            budget -= 1
            if self._stats_head is not None:
                # §5.5.6.3: one buffer in flight; a second one returns the first (a confused driver).
                q.add_used(self.memory, self._stats_head, 0)
                self.signal_used(self._stats_q)
            self._stats_head = chain.head_index
            raw = chain.reader(self.memory).read(_STAT.size * MAX_STATS_ENTRIES)
            values = {}
            for off in range(0, len(raw) - _STAT.size + 1, _STAT.size):
                tag, value = _STAT.unpack_from(raw, off)
                values[BALLOON_STAT_NAMES.get(tag, f"tag_{tag}")] = value
            with self._lock:
                self._stats = values
            if not self._stats_due:
                self._stats_due = time.monotonic() + self.stats_interval

    def _report(self, chain: DescriptorChain) -> int:
        # §5.5.6.6: each descriptor is a free range; Linux adds them device-writable, accept either.
        ranges = (chain.readable + chain.writable)[:MAX_REPORT_RANGES]
        self.rejected += len(chain.readable) + len(chain.writable) - len(ranges)
        assert self.memory is not None
        for addr, length in ranges:
            if addr % DISCARD_ALIGN or length % DISCARD_ALIGN or not length:
                self.rejected += 1
                continue
            try:
                self.memory.discard(addr, length)
            except GuestAddressError:
                self.rejected += 1
            else:
                self.reported += length
        return 0

    # -- snapshot -------------------------------------------------------------------------------------

    def save_state(self) -> dict[str, Any]:
        """The target and the driver's ``actual`` (a held stats buffer is not carried: statistics stop
        refreshing in a restored VM until its driver resets the device)."""
        return {"num_pages": self._num_pages, "actual": self._actual}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Take back `save_state`'s values."""
        try:
            self._num_pages = self._check_pages(int(state.get("num_pages", 0)))
            actual = int(state.get("actual", 0))
        except (TypeError, ValueError) as err:
            raise DeviceError(f"bad saved balloon state: {err}") from err
        self._actual = actual & 0xFFFFFFFF
