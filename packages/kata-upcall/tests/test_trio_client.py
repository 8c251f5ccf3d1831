"""The trio driver against a scripted guest: replies, drops, garbage, slow and missing answers, reconnects.

Time is trio's MockClock (autojump): budgets of minutes pass instantly and nothing depends on the machine's
speed; `trio.fail_after` on virtual time proves nothing hangs."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kata_upcall import (
    AddCpu,
    AddMmio,
    CpuReply,
    DelCpu,
    DelMmio,
    Handshake,
    MmioReply,
    MsgType,
    Request,
    UpcallClient,
    UpcallConnectionLost,
    UpcallError,
    UpcallRequestFailed,
    UpcallState,
    UpcallTimeout,
    open_upcall_client,
    socket_connector,
)
from kata_upcall.testing import CONNECTION_BEHAVIOURS, REQUEST_BEHAVIOURS, FakeGuest

MMIO = AddMmio(0xD000_0000, 0x1000, 5)
NEVER = 100_000  # virtual seconds: far past every budget


def run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


async def with_client(
    guest: FakeGuest, body: Callable[[UpcallClient], Awaitable[None]], **options: Any
) -> None:
    with trio.fail_after(NEVER):
        async with trio.open_nursery() as nursery:
            guest.nursery = nursery
            async with open_upcall_client(guest.connect, handshake=guest.handshake, **options) as client:
                await body(client)
            nursery.cancel_scope.cancel()


def test_request_gets_its_reply() -> None:
    guest = FakeGuest()

    async def body(client: UpcallClient) -> None:
        assert await client.request(MMIO) == MmioReply(MsgType.ADD_MMIO, 0)
        assert await client.request(AddCpu((1, 2))) == CpuReply(MsgType.ADD_CPU, 0, 2)
        stats = client.statistics()
        assert stats.state is UpcallState.SERVICE_CONNECTED
        assert (stats.requests_sent, stats.services_connected) == (2, 1)
        assert client.is_ready()

    run(lambda: with_client(guest, body))
    assert guest.requests == [MMIO, AddCpu((1, 2))]


def test_concurrent_requests_queue_in_order_and_never_overlap() -> None:
    guest = FakeGuest()
    requests = [AddMmio(0xD000_0000 + i * 0x1000, 0x1000, 5 + i) for i in range(6)]
    results: list[object] = []

    async def body(client: UpcallClient) -> None:
        async with trio.open_nursery() as callers:
            for request in requests:
                callers.start_soon(_record, client, request, results)
                await trio.lowlevel.checkpoint()  # start in order: the lock is FIFO

    run(lambda: with_client(guest, body))
    assert guest.requests == requests
    assert guest.max_in_flight == 1
    assert results == [MmioReply(MsgType.ADD_MMIO, 0)] * 6


async def _record(client: UpcallClient, request: Request, results: list[object]) -> None:
    try:
        results.append(await client.request(request))
    except UpcallError as err:
        results.append(err)


def test_guest_refusal_raises_request_failed_with_the_reply() -> None:
    guest = FakeGuest(request_script=["fail"])

    async def body(client: UpcallClient) -> None:
        with pytest.raises(UpcallRequestFailed, match="EINVAL") as caught:
            await client.request(DelCpu((3,)))
        assert caught.value.reply == CpuReply(MsgType.DEL_CPU, -22, None)
        assert await client.request(DelCpu((3,))) == CpuReply(MsgType.DEL_CPU, 0, 1)

    run(lambda: with_client(guest, body))
    assert guest.connections == 1  # a refusal is an answer, not a broken connection


@pytest.mark.parametrize("behaviour", ["drop", "garbage", "wrong", "short"])
def test_broken_answer_fails_the_request_and_the_client_reconnects(behaviour: str) -> None:
    guest = FakeGuest(request_script=[behaviour])

    async def body(client: UpcallClient) -> None:
        with pytest.raises(UpcallConnectionLost):
            await client.request(MMIO)
        assert await client.request(DelMmio(0xD000_0000, 0x1000, 5)) == MmioReply(MsgType.DEL_MMIO, 0)

    run(lambda: with_client(guest, body))
    assert guest.connections == 2


def test_frame_with_nothing_in_flight_resets_the_connection() -> None:
    # The guest answers once more after its reply: with no request in flight that frame is garbage.
    guest = FakeGuest(request_script=["extra"])

    async def body(client: UpcallClient) -> None:
        with contextlib.suppress(UpcallConnectionLost):  # reply and extra frame in one read: all or nothing
            await client.request(MMIO)
        await trio.sleep(1)
        assert await client.request(MMIO) == MmioReply(MsgType.ADD_MMIO, 0)

    run(lambda: with_client(guest, body))
    assert guest.connections == 2


def test_frame_before_any_request_resets_the_connection() -> None:
    guest = FakeGuest(connection_script=["unsolicited"])

    async def body(client: UpcallClient) -> None:
        await trio.sleep(1)
        assert await client.request(MMIO) == MmioReply(MsgType.ADD_MMIO, 0)
        assert client.statistics().services_connected == 2

    run(lambda: with_client(guest, body))
    assert guest.connections == 2


@pytest.mark.parametrize("behaviour", ["slow", "silent"])
def test_unanswered_request_times_out_and_resets_the_connection(behaviour: str) -> None:
    guest = FakeGuest(request_script=[behaviour])

    async def body(client: UpcallClient) -> None:
        with pytest.raises(UpcallTimeout, match="waiting for the guest's answer"):
            await client.request(MMIO)
        assert await client.request(MMIO) == MmioReply(MsgType.ADD_MMIO, 0)

    run(lambda: with_client(guest, body, request_timeout=30))
    assert guest.connections == 2


def test_cancelled_request_resets_the_connection() -> None:
    guest = FakeGuest(request_script=["silent"])

    async def body(client: UpcallClient) -> None:
        with trio.move_on_after(5):
            await client.request(MMIO)
        assert await client.request(MMIO) == MmioReply(MsgType.ADD_MMIO, 0)
        assert "abandoned" in (client.statistics().last_error or "")

    run(lambda: with_client(guest, body))
    assert guest.connections == 2


@pytest.mark.parametrize("behaviour", ["refuse", "hang", "close", "bad-ok", "no-service"])
def test_failed_connections_are_retried_until_the_service_answers(behaviour: str) -> None:
    guest = FakeGuest(connection_script=[behaviour] * 3)

    async def body(client: UpcallClient) -> None:
        assert await client.request(MMIO) == MmioReply(MsgType.ADD_MMIO, 0)
        assert client.statistics().connect_attempts >= 4
        assert client.statistics().last_error

    run(lambda: with_client(guest, body, handshake_timeout=10, request_timeout=300))


@pytest.mark.parametrize("behaviour", ["close", "bad-ok", "unsolicited"])
def test_a_guest_that_churns_connections_gets_at_most_one_attempt_a_second(behaviour: str) -> None:
    guest = FakeGuest(connection_script=[behaviour] * 10_000)

    async def body(client: UpcallClient) -> None:
        await trio.sleep(60)
        assert 10 < client.statistics().connect_attempts < 70

    run(lambda: with_client(guest, body))


def test_request_waits_for_a_slow_service_within_its_budget() -> None:
    guest = FakeGuest(connection_script=["slow-service"])

    async def body(client: UpcallClient) -> None:
        assert client.state is not UpcallState.SERVICE_CONNECTED
        assert await client.request(MMIO) == MmioReply(MsgType.ADD_MMIO, 0)

    run(lambda: with_client(guest, body))
    assert guest.connections == 1


def test_guest_without_an_upcall_server_fails_requests_within_budget() -> None:
    guest = FakeGuest(connection_script=["refuse"] * 10_000)

    async def body(client: UpcallClient) -> None:
        with pytest.raises(UpcallTimeout, match="waiting for the upcall service to connect"):
            await client.request(MMIO)
        # backoff: 10 ms doubling to 1 s, so about one attempt a second, not a busy loop
        assert client.statistics().connect_attempts < 70

    run(lambda: with_client(guest, body, request_timeout=60))


def test_queued_request_times_out_behind_an_unanswered_one() -> None:
    guest = FakeGuest(request_script=["silent"])
    results: list[object] = []

    async def body(client: UpcallClient) -> None:
        async with trio.open_nursery() as callers:
            callers.start_soon(_record, client, MMIO, results)
            await trio.sleep(1)
            callers.start_soon(_record, client, AddCpu((1,)), results)
            await trio.sleep(1)
            assert client.statistics().requests_waiting == 1

    run(lambda: with_client(guest, body, request_timeout=20))
    assert isinstance(results[0], UpcallTimeout)
    assert results[1] == CpuReply(MsgType.ADD_CPU, 0, 1)  # served on the next connection, within its budget
    assert guest.max_in_flight == 1


def test_requests_after_close_are_refused() -> None:
    guest = FakeGuest()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            guest.nursery = nursery
            async with open_upcall_client(guest.connect) as client:
                pass
            with pytest.raises(trio.ClosedResourceError):
                await client.request(MMIO)
            nursery.cancel_scope.cancel()

    run(main)


def test_socketpair_transport_with_the_in_process_accept_line() -> None:
    # kata-virtio's connect_local hands back a socket that reads "OK <port>\n" first: Handshake.ACCEPT_LINE.
    guest = FakeGuest(handshake=Handshake.ACCEPT_LINE)

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:

                def connect_local() -> (
                    socket.socket
                ):  # as kata-virtio's: a blocking socket, guest on the far end
                    ours, theirs = socket.socketpair()
                    nursery.start_soon(guest.serve, trio.SocketStream(trio.socket.from_stdlib_socket(theirs)))
                    return ours

                connect = socket_connector(connect_local)
                async with open_upcall_client(connect, handshake=Handshake.ACCEPT_LINE) as client:
                    assert await client.request(AddCpu((2, 3), apic_ver=0x14)) == CpuReply(
                        MsgType.ADD_CPU, 0, 2
                    )
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert guest.requests == [AddCpu((2, 3), apic_ver=0x14)]


def test_plain_vsock_handshake_sends_the_service_byte_first() -> None:
    guest = FakeGuest(handshake=Handshake.NONE)

    async def body(client: UpcallClient) -> None:
        assert await client.request(MMIO) == MmioReply(MsgType.ADD_MMIO, 0)

    run(lambda: with_client(guest, body))


# -- property: whatever the guest does, every request ends (reply or a typed error), one at a time ----------

requests = st.sampled_from([MMIO, DelMmio(0xD000_0000, 0x1000, 5), AddCpu((1, 2)), DelCpu((2,))])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(CONNECTION_BEHAVIOURS), max_size=6),
    st.lists(st.sampled_from(REQUEST_BEHAVIOURS), max_size=10),
    st.lists(st.tuples(requests, st.floats(0, 50)), min_size=1, max_size=8),
)
def test_scripted_guest_never_hangs_the_client_nor_sees_two_requests(
    connections: list[str], behaviours: list[str], calls: list[tuple[Request, float]]
) -> None:
    guest = FakeGuest(connection_script=connections, request_script=behaviours, slow_seconds=40)
    outcomes: list[object] = []

    async def body(client: UpcallClient) -> None:
        async with trio.open_nursery() as callers:
            for request, delay in calls:
                callers.start_soon(_call_after, client, request, delay, outcomes)

    run(lambda: with_client(guest, body, request_timeout=30, handshake_timeout=5))
    assert len(outcomes) == len(calls)
    for outcome in outcomes:
        # the driver queues: UpcallBusy / UpcallNotConnected never reach a caller
        assert isinstance(
            outcome, (MmioReply, CpuReply, UpcallRequestFailed, UpcallConnectionLost, UpcallTimeout)
        )
    assert guest.max_in_flight <= 1


async def _call_after(client: UpcallClient, request: Request, delay: float, outcomes: list[object]) -> None:
    await trio.sleep(delay)
    await _record(client, request, outcomes)
