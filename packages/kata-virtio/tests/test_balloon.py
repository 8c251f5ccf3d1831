"""virtio-balloon: inflate discards guest pages, deflate is free, stats, free page reporting, hostile PFNs."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kata_virtio import MmioTransport, VirtioBalloon
from kata_virtio._balloon import (
    VIRTIO_BALLOON_F_PAGE_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
)
from kata_virtio._spec import VIRTIO_F_VERSION_1
from kata_virtio.testing import FakeGuestMemory, FakeInterrupt, activate, mmio_bring_up

PAGE = 4096
MEM_BASE, MEM_SIZE = 0x100000, 0x200000  # RAM: PFNs 0x100..0x2ff


def _pfns(*pfns: int) -> bytes:
    return struct.pack(f"<{len(pfns)}I", *pfns)


def _balloon(**kw: object) -> tuple[VirtioBalloon, FakeGuestMemory, list, object]:  # type: ignore[type-arg]
    dev = VirtioBalloon(**kw)  # type: ignore[arg-type]
    mem = FakeGuestMemory(MEM_SIZE, base=MEM_BASE)
    dqs, irq = activate(dev, mem)
    return dev, mem, dqs, irq


def test_set_target_changes_config_and_interrupts() -> None:
    dev, _mem, _dqs, irq = _balloon()
    dev.set_target(32768)
    assert dev.read_config(0, 4) == struct.pack("<I", 32768)
    assert dev.target_pages == 32768
    assert irq.config_changes == 1  # type: ignore[attr-defined]


def test_driver_reports_actual_through_config() -> None:
    dev, _mem, _dqs, _irq = _balloon()
    dev.write_config(4, struct.pack("<I", 77))
    dev.write_config(0, struct.pack("<I", 1))  # num_pages is the host's: ignored
    assert dev.actual_pages == 77
    assert dev.read_config(0, 8) == struct.pack("<II", 0, 77)


def test_inflate_discards_the_pages_named_and_coalesces_runs() -> None:
    dev, mem, (infl, _defl), irq = _balloon()
    page = 0x1F0
    mem.write(page * PAGE, b"\xaa" * PAGE * 3)
    head = infl.add_chain([(_pfns(page, page + 1, page + 2, 0x250), False)])
    dev.notify(0)
    assert infl.get_used() == [(head, 0)]
    assert mem.discarded == [(page * PAGE, 3 * PAGE), (0x250 * PAGE, PAGE)]
    assert mem.read(page * PAGE, 3 * PAGE) == bytes(3 * PAGE)
    assert dev.inflated == 4 and dev.rejected == 0
    assert irq.used == [0]  # type: ignore[attr-defined]


def test_deflate_completes_without_touching_memory() -> None:
    dev, mem, (_infl, defl), _irq = _balloon()
    head = defl.add_chain([(_pfns(0x200, 0x201), False)])
    dev.notify(1)
    assert defl.get_used() == [(head, 0)]
    assert mem.discarded == []


def test_inflate_pfns_outside_ram_are_skipped_not_fatal() -> None:
    dev, mem, (infl, _defl), irq = _balloon()
    # below RAM, the last RAM page, one past RAM, far away, a duplicate
    head = infl.add_chain([(_pfns(0x10, 0x2FF, 0x300, 0xFFFFFFFF, 0x2FF), False)])
    dev.notify(0)
    assert infl.get_used() == [(head, 0)]
    assert mem.discarded == [(0x2FF * PAGE, PAGE)]
    assert dev.rejected == 3
    assert not dev.broken and irq.needs_reset == []  # type: ignore[attr-defined]


def test_inflate_buffer_that_is_device_writable_is_refused() -> None:
    dev, mem, (infl, _defl), _irq = _balloon()
    head = infl.add_chain([(64, True)])
    dev.notify(0)
    assert infl.get_used() == [(head, 0)]
    assert mem.discarded == [] and dev.rejected == 1


def test_huge_inflate_buffer_is_read_only_up_to_its_cap() -> None:
    dev, mem, (infl, _defl), _irq = _balloon()
    pfns = list(range(0x100, 0x300)) * 4  # 2048 PFNs, past the 1024 cap
    head = infl.add_chain([(_pfns(*pfns), False)])
    dev.notify(0)
    assert infl.get_used() == [(head, 0)]
    assert sum(n for _a, n in mem.discarded) <= 1024 * PAGE
    assert dev.rejected == 1024


def test_stats_buffer_is_held_then_returned_for_a_refresh() -> None:
    dev, _mem, (_i, _d, stats), irq = _balloon(stats_interval=5.0)
    assert dev.queue_count() == 3
    head = stats.add_chain([(struct.pack("<HQ", 4, 1 << 20) + struct.pack("<HQ", 5, 4 << 20), False)])
    dev.notify(2)
    assert stats.get_used() == []  # held: the device returns it when it wants fresh numbers
    assert dev.stats() == {"free_memory": 1 << 20, "total_memory": 4 << 20}
    dev.request_stats()
    assert stats.get_used() == [(head, 0)]
    assert irq.used == [2]  # type: ignore[attr-defined]
    dev.request_stats()  # nothing held: nothing to return
    assert stats.get_used() == []


def test_stats_unknown_tags_and_a_huge_buffer_are_bounded() -> None:
    dev, _mem, (_i, _d, stats), _irq = _balloon(stats_interval=1.0)
    blob = b"".join(struct.pack("<HQ", 1000 + i, i) for i in range(500))
    stats.add_chain([(blob, False)])
    dev.notify(2)
    assert len(dev.stats()) == 64
    assert dev.stats()["tag_1000"] == 0


def test_a_second_stats_buffer_returns_the_first() -> None:
    dev, _mem, (_i, _d, stats), _irq = _balloon(stats_interval=1.0)
    first = stats.add_chain([(struct.pack("<HQ", 4, 1), False)])
    dev.notify(2)
    stats.add_chain([(struct.pack("<HQ", 4, 2), False)])
    dev.notify(2)
    assert stats.get_used() == [(first, 0)]
    assert dev.stats() == {"free_memory": 2}


def test_free_page_reporting_discards_each_reported_range() -> None:
    dev, mem, dqs, _irq = _balloon(free_page_reporting=True)
    report = dqs[2]  # no stats queue: reporting is the third queue
    assert dev.queue_count() == 3
    start = report.alloc(0x40000, align=0x40000)
    mem.write(start, b"\x55" * 0x40000)
    report.write_desc(10, start, 0x40000, 2)  # device-writable, as Linux adds them
    report.publish(10)
    dev.notify(2)
    assert report.get_used() == [(10, 0)]
    assert mem.discarded == [(start, 0x40000)]
    assert mem.read(start, 16) == bytes(16)
    assert dev.reported == 0x40000


def test_reporting_range_crossing_the_end_of_ram_discards_nothing() -> None:
    dev, mem, dqs, irq = _balloon(free_page_reporting=True)
    report = dqs[2]
    end = MEM_BASE + MEM_SIZE
    for i, (addr, length) in enumerate(
        [(end - PAGE, 2 * PAGE), (0, PAGE), (MEM_BASE + 0x10001, PAGE), (end - PAGE, 0), (1 << 50, 1 << 31)]
    ):
        report.write_desc(20 + i, addr, length, 2)
        report.publish(20 + i)
    dev.notify(2)
    assert len(report.get_used()) == 5
    assert mem.discarded == []
    assert dev.rejected == 5
    assert not dev.broken and irq.needs_reset == []  # type: ignore[attr-defined]


def test_reporting_with_stats_is_the_fourth_queue() -> None:
    dev, _mem, dqs, _irq = _balloon(free_page_reporting=True, stats_interval=1.0)
    assert len(dqs) == 4 and dev.queue_count() == 4
    features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_PAGE_REPORTING
    dev2 = VirtioBalloon(free_page_reporting=True, stats_interval=1.0)
    dqs2, _ = activate(dev2, FakeGuestMemory(MEM_SIZE, base=MEM_BASE), features=features)
    assert len(dqs2) == 3  # the driver took reporting without stats


def test_mmio_driver_without_optional_features_sets_up_two_queues() -> None:
    dev = VirtioBalloon(stats_interval=1.0, free_page_reporting=True)
    mem = FakeGuestMemory(MEM_SIZE, base=MEM_BASE)
    transport = MmioTransport(dev, mem, FakeInterrupt())
    mmio_bring_up(transport, [64, 64], features=1 << VIRTIO_F_VERSION_1)
    assert transport.activated and dev.active
    assert not dev.has_feature(VIRTIO_BALLOON_F_STATS_VQ)


def test_stats_buffer_queued_and_kicked_before_driver_ok_is_taken_at_driver_ok() -> None:
    """Linux's virtio_balloon primes the stats queue with one buffer and kicks it in probe, before
    DRIVER_OK; the kick finds the device inactive. The device takes that buffer at DRIVER_OK, or no
    statistics would ever arrive (the driver refills only a buffer it got back). Found in the lab."""
    dev = VirtioBalloon(stats_interval=1.0)
    mem = FakeGuestMemory(MEM_SIZE, base=MEM_BASE)
    transport = MmioTransport(dev, mem, FakeInterrupt())
    heads: list[int] = []

    def probe(dqs: list) -> None:  # type: ignore[type-arg]
        heads.append(dqs[2].add_chain([(struct.pack("<HQ", 4, 3 << 20), False)]))
        transport.write_u32(0x050, 2)  # QueueNotify before DRIVER_OK

    features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_STATS_VQ
    dqs = mmio_bring_up(transport, [64, 64, 64], features=features, before_driver_ok=probe)
    assert dev.stats() == {"free_memory": 3 << 20}
    dev.request_stats()  # held since DRIVER_OK: given back for a refresh
    assert dqs[2].get_used() == [(heads[0], 0)]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    pfns=st.lists(st.integers(0, 0xFFFFFFFF) | st.integers(0xF0, 0x310), max_size=300),
    ranges=st.lists(
        st.tuples(
            st.integers(0, 1 << 40) | st.integers(MEM_BASE - 0x10000, MEM_BASE + MEM_SIZE + 0x1000),
            st.integers(0, 1 << 32 - 1) | st.sampled_from([0, PAGE, 2 * PAGE, 0x200000]),
            st.booleans(),
        ),
        max_size=8,
    ),
)
def test_hostile_pfns_and_ranges_never_discard_outside_ram(pfns: list[int], ranges: list) -> None:  # type: ignore[type-arg]
    dev, mem, dqs, irq = _balloon(free_page_reporting=True)
    infl, report = dqs[0], dqs[2]
    infl.add_chain([(_pfns(*pfns) or b"\0", False)])
    dev.notify(0)
    total = 0
    for i, (addr, length, writable) in enumerate(ranges):
        total += length
        if total > 0xFFFFFFFF:
            break
        report.write_desc(i, addr, length, 2 if writable else 0)
        report.publish(i)
    dev.notify(2)
    for addr, length in mem.discarded:
        assert addr >= MEM_BASE and addr + length <= MEM_BASE + MEM_SIZE
        assert addr % PAGE == 0 and length % PAGE == 0
    assert len(mem.data) == MEM_SIZE
    if irq.needs_reset:  # type: ignore[attr-defined]
        assert dev.broken
