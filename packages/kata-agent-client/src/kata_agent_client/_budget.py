"""Budgets in guest time: a wait on a VM counted on a clock that stands still while the VM has no host CPU.

A VM that shares a host CPU with nine others answers ten times later in wall time; a budget taken on the
guest's clock (kata-sys-util's `GuestClock.now`: wall time less the vCPU thread's run-queue wait) is a
budget on the VM's chance to answer, so a busy host slows a start down instead of failing it. A wall-time
cap of `GUEST_WALL_CAP` budgets still ends the wait for a VM that never gets a CPU.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

#: A guest-time budget's wall-time cap, in budgets.
GUEST_WALL_CAP = 10.0
#: How often a wait on a guest-time budget reads the clock.
GUEST_POLL_S = 1.0

T = TypeVar("T")


async def guest_timed(
    clock: Callable[[], float] | None,
    budget: float,
    call: Callable[[], Awaitable[T]],
    *,
    wall_cap: float = GUEST_WALL_CAP,
) -> T:
    """`await call()` with `budget` seconds of `clock` (read every GUEST_POLL_S) and at most `wall_cap`
    budgets of wall time (the call's effective deadline, so a ttrpc call sends it as its timeout);
    `trio.TooSlowError` ("within ...", saying which ran out) when one does. What the call raises comes
    out bare. Without a clock (no VM to count on) `budget` is wall time."""
    if clock is None:
        with trio.move_on_after(budget):
            return await call()
        raise trio.TooSlowError(f"within {budget:g} s")
    start = clock()
    wall0 = trio.current_time()
    spent = False

    async def watch(scope: trio.CancelScope) -> None:
        nonlocal spent
        while (left := budget - (clock() - start)) > 0:  # noqa: ASYNC110 - a clock read from /proc
            await trio.sleep(min(left, GUEST_POLL_S))
        spent = True
        scope.cancel()

    result: list[T] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.cancel_scope.deadline = wall0 + budget * wall_cap
            nursery.start_soon(watch, nursery.cancel_scope)
            result.append(await call())
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # the nursery wraps what the call raised: hand it back bare
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from None
        raise
    if result:
        return result[0]
    wall = trio.current_time() - wall0
    if spent:
        raise trio.TooSlowError(f"within {budget:g} s of guest time ({wall:.0f} s wall)")
    raise trio.TooSlowError(
        f"within the wall-time cap of {budget * wall_cap:g} s ({clock() - start:.1f} s of its {budget:g} s"
        " of guest time spent)"
    )
