"""SetGuestDateTime and ReseedRandomDev: what a VM restored from a template is told so it is not its
siblings' twin (issue 16). The host's own clock and pool are never touched: the syscalls are replaced."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from agent_harness import running_agent

from kata_agent import _guest
from kata_agent_client import AgentInvalidArgument


def test_set_realtime_sets_the_exact_nanoseconds(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(time, "clock_settime_ns", lambda clock, ns: calls.append((clock, ns)))
    _guest.set_realtime(1_765_000_000, 999_999)
    assert calls == [(time.CLOCK_REALTIME, 1_765_000_000_999_999_000)]
    for sec, usec in ((1, 1_000_000), (1, -1), (-5, 0)):
        with pytest.raises(Exception, match="SetGuestDateTime"):
            _guest.set_realtime(sec, usec)
    assert len(calls) == 1


def test_reseed_adds_and_credits_the_bytes_then_reseeds_the_crng(tmp_path: Path) -> None:
    device = tmp_path / "random"
    device.write_bytes(b"")
    calls: list[tuple[int, Any]] = []

    def fake_ioctl(fd: int, request: int, arg: bytes | int) -> int:
        assert os.readlink(f"/proc/self/fd/{fd}") == str(device)
        calls.append((request, arg))
        return 0

    seed = bytes(range(1, 34))  # 33 bytes: padded to whole __u32 words
    _guest.reseed_random(seed, str(device), fake_ioctl)
    (add, info), (reseed, zero) = calls
    assert (add, reseed, zero) == (_guest.RNDADDENTROPY, _guest.RNDRESEEDCRNG, 0)
    assert isinstance(info, bytes)
    bits, size = struct.unpack_from("ii", info)
    assert (bits, size) == (33 * 8, 33)
    assert info[8 : 8 + 33] == seed and len(info) == 8 + 36
    # the ioctl numbers of <linux/random.h>
    assert (1 << 30) | (8 << 16) | (ord("R") << 8) | 0x03 == _guest.RNDADDENTROPY
    assert (ord("R") << 8) | 0x07 == _guest.RNDRESEEDCRNG


def test_reseed_refuses_no_bytes_and_too_many(tmp_path: Path) -> None:
    calls: list[object] = []
    for data in (b"", b"x" * (_guest.MAX_SEED_BYTES + 1)):
        with pytest.raises(Exception, match="ReseedRandomDev"):
            _guest.reseed_random(data, str(tmp_path / "none"), lambda *a: calls.append(a))
    assert calls == []


def test_the_agent_serves_both_rpcs_through_the_typed_client(monkeypatch: pytest.MonkeyPatch) -> None:
    clock: list[int] = []
    seeds: list[bytes] = []
    monkeypatch.setattr(time, "clock_settime_ns", lambda _clock, ns: clock.append(ns))
    monkeypatch.setattr(_guest, "RANDOM_DEVICE", "/nonexistent")
    real_reseed = _guest.reseed_random

    def reseed(data: bytes) -> None:
        seeds.append(data)
        real_reseed(data, os.devnull, _no_ioctl)

    monkeypatch.setattr(_guest, "reseed_random", reseed)

    async def main() -> None:
        async with running_agent() as agent:
            await agent.client.set_guest_date_time(1_765_000_000.25)
            fresh = os.urandom(32)
            await agent.client.reseed_random_dev(fresh)
            with pytest.raises(AgentInvalidArgument, match="no data"):
                await agent.client.reseed_random_dev(b"")
            assert seeds == [fresh, b""]

    trio.run(main)
    assert clock == [1_765_000_000_250_000_000]


def _no_ioctl(fd: int, request: int, arg: bytes | int) -> int:
    return 0
