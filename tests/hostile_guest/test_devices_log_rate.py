"""The guest cannot flood the shim's log (issue 11, finding 10): console and agent log lines are rate limited.

A token bucket lets a burst through, then a steady rate; dropped lines are counted and the shim log says
so once. The console tail kept for crash messages still has the latest lines.
"""

from __future__ import annotations

import logging

import pytest

from kata_shim._ratelimit import LineRateLimit
from kata_shim.hypervisor._dragonball import ConsoleSink
from kata_shim.virt_container._sandbox import agent_log


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_console_flood_is_rate_limited_counted_and_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logger = logging.getLogger("test.console")
    sink = ConsoleSink(logger, rate_limit=LineRateLimit("guest console", rate=10, burst=50, clock=clock))
    with caplog.at_level(logging.INFO):
        sink(b"".join(b"line %d\n" % i for i in range(10_000)))  # main: all 10,000 logged
        logged = [r for r in caplog.records if r.name == "test.console"]
        assert len(logged) == 50 and sink.rate_limit.dropped == 10_000 - 50
        clock.now += 1.0  # a second later: 10 more lines may pass
        sink(b"".join(b"more %d\n" % i for i in range(100)))
    logged = [r for r in caplog.records if r.name == "test.console"]
    assert len(logged) == 60
    notices = [r for r in caplog.records if r.name == "kata_shim.ratelimit"]
    assert len(notices) == 1 and "guest console" in notices[0].getMessage()
    assert sink.tail().splitlines()[-1] == "more 99"  # the crash tail is not rate limited


def test_agent_log_lines_pass_a_rate_limit() -> None:
    limits = [f for f in agent_log.filters if isinstance(f, LineRateLimit)]
    assert len(limits) == 1 and limits[0].what == "agent log"


def test_rate_limit_refills_only_up_to_its_burst() -> None:
    clock = Clock()
    bucket = LineRateLimit("x", rate=5, burst=3, clock=clock)
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    clock.now += 100.0
    assert [bucket.allow() for _ in range(4)] == [True, True, True, False]
    assert bucket.dropped == 2
