"""The sans-I/O client core: handshakes, one request in flight, and garbage that breaks the connection."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kata_upcall import (
    AddCpu,
    AddMmio,
    Connect,
    CpuReply,
    DelMmio,
    Handshake,
    MmioReply,
    MsgType,
    ReplyReceived,
    ServiceConnected,
    UpcallBusy,
    UpcallClientCore,
    UpcallNotConnected,
    UpcallProtocolError,
    UpcallState,
)


def state(core: UpcallClientCore) -> UpcallState:
    return core.state  # read through a call: mypy would narrow the property across mutations


MMIO = AddMmio(0xD000_0000, 0x1000, 5)
MMIO_OK = MmioReply(MsgType.ADD_MMIO, 0).encode()


def connected(handshake: Handshake = Handshake.HYBRID_VSOCK) -> UpcallClientCore:
    core = UpcallClientCore(handshake)
    core.connect()
    if handshake is not Handshake.NONE:
        core.receive_data(b"OK 1073741824\n")
    core.receive_data(Connect().encode())
    assert state(core) is UpcallState.SERVICE_CONNECTED
    return core


def test_hybrid_vsock_handshake_sends_connect_then_the_service_byte() -> None:
    core = UpcallClientCore()
    assert core.connect() == b"CONNECT 219\n"
    assert state(core) is UpcallState.WAITING_SERVER
    assert core.receive_data(b"OK 10") == (b"", [])
    assert core.receive_data(b"24\n") == (b"d", [])
    assert state(core) is UpcallState.WAITING_SERVICE
    assert core.receive_data(Connect().encode()) == (b"", [ServiceConnected()])
    assert state(core) is UpcallState.SERVICE_CONNECTED


def test_in_process_connector_only_reads_the_accept_line() -> None:
    core = UpcallClientCore(Handshake.ACCEPT_LINE)
    assert core.connect() == b""
    assert core.receive_data(b"OK 1073741825\n") == (b"d", [])


def test_plain_vsock_sends_the_service_byte_first() -> None:
    core = UpcallClientCore(Handshake.NONE)
    assert core.connect() == b"d"
    assert state(core) is UpcallState.WAITING_SERVICE


def test_request_and_reply_byte_at_a_time() -> None:
    core = connected()
    wire = core.send_request(MMIO)
    assert wire == MMIO.encode()
    assert state(core) is UpcallState.SERVICE_BUSY
    events = []
    for byte in MMIO_OK:
        events += core.receive_data(bytes([byte]))[1]
    assert events == [ReplyReceived(MMIO, MmioReply(MsgType.ADD_MMIO, 0))]
    assert state(core) is UpcallState.SERVICE_CONNECTED
    assert core.pending is None


def test_second_request_while_busy_is_refused_as_upstream() -> None:
    core = connected()
    core.send_request(MMIO)
    with pytest.raises(UpcallBusy):
        core.send_request(AddCpu((1,)))
    assert core.pending == MMIO


@pytest.mark.parametrize("step", ["fresh", "connecting", "waiting service"])
def test_request_before_the_service_connected_is_refused(step: str) -> None:
    core = UpcallClientCore()
    if step != "fresh":
        core.connect()
    if step == "waiting service":
        core.receive_data(b"OK 1\n")
    with pytest.raises(UpcallNotConnected):
        core.send_request(MMIO)


GARBAGE = {
    "not OK": (UpcallState.WAITING_SERVER, b"NO\n"),
    "endless line": (UpcallState.WAITING_SERVER, b"O" * 100),
    "bytes before the service byte": (UpcallState.WAITING_SERVER, b"OK 1\n\0"),
    "reply instead of Connect": (UpcallState.WAITING_SERVICE, MMIO_OK),
    "unsolicited frame": (UpcallState.SERVICE_CONNECTED, MMIO_OK),
    "one stray byte": (UpcallState.SERVICE_CONNECTED, b"x"),
    "wrong reply type": (UpcallState.SERVICE_BUSY, CpuReply(MsgType.ADD_CPU, 0, 1).encode()),
    "add reply to a del": (UpcallState.SERVICE_BUSY, MmioReply(MsgType.DEL_MMIO, 0).encode()),
    "reply plus extra": (UpcallState.SERVICE_BUSY, MMIO_OK + b"\0"),
    "bad magic": (UpcallState.SERVICE_BUSY, b"\0" * 1024),
}


def _core_in(state: UpcallState) -> UpcallClientCore:
    core = UpcallClientCore()
    core.connect()
    if state is UpcallState.WAITING_SERVER:
        return core
    core.receive_data(b"OK 1\n")
    if state is UpcallState.WAITING_SERVICE:
        return core
    core.receive_data(Connect().encode())
    if state is UpcallState.SERVICE_BUSY:
        core.send_request(MMIO)
    return core


@pytest.mark.parametrize(("at", "data"), GARBAGE.values(), ids=GARBAGE.keys())
def test_garbage_breaks_the_connection_and_fails_the_pending_request(at: UpcallState, data: bytes) -> None:
    core = _core_in(at)
    with pytest.raises(UpcallProtocolError):
        core.receive_data(data)
    assert state(core) is UpcallState.BROKEN
    with pytest.raises(UpcallProtocolError):
        core.receive_data(b"")
    with pytest.raises(UpcallNotConnected):
        core.send_request(MMIO)
    pending = core.connection_lost()
    assert pending == (MMIO if at is UpcallState.SERVICE_BUSY else None)
    assert state(core) is UpcallState.WAITING_SERVER
    assert core.connect() == b"CONNECT 219\n"  # and the next connection starts clean


def test_data_without_a_connection_is_refused() -> None:
    with pytest.raises(UpcallProtocolError):
        UpcallClientCore().receive_data(b"OK 1\n")


def test_connect_twice_without_losing_the_first_is_a_bug() -> None:
    core = UpcallClientCore()
    core.connect()
    with pytest.raises(UpcallProtocolError):
        core.connect()


# -- property: any interleaving of host calls and guest bytes keeps at most one request in flight -----------

guest_chunks = st.one_of(
    st.just(b"OK 1073741824\n"),
    st.just(Connect().encode()),
    st.just(MMIO_OK),
    st.just(MmioReply(MsgType.DEL_MMIO, -19).encode()),
    st.just(CpuReply(MsgType.ADD_CPU, 0, 1).encode()),
    st.binary(max_size=64),
    st.integers(1, 1023).map(lambda n: MMIO_OK[:n]),
)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("data"), guest_chunks),
        st.tuples(st.just("send"), st.sampled_from([MMIO, DelMmio(1, 2, 3), AddCpu((1, 2))])),
        st.tuples(st.just("lost"), st.none()),
        st.tuples(st.just("connect"), st.none()),
    ),
    max_size=40,
)


@given(ops, st.sampled_from(list(Handshake)))
def test_any_interleaving_keeps_one_request_in_flight(
    script: list[tuple[str, object]], hs: Handshake
) -> None:
    core = UpcallClientCore(hs)
    live = False
    in_flight = 0
    for op, arg in script:
        if op == "connect" and not live:
            core.connect()
            live = True
        elif op == "lost":
            pending = core.connection_lost()
            assert (pending is not None) == (in_flight == 1)
            live, in_flight = False, 0
        elif op == "send":
            before = state(core)
            try:
                core.send_request(arg)  # type: ignore[arg-type]
            except (UpcallBusy, UpcallNotConnected):
                assert before is not UpcallState.SERVICE_CONNECTED
            else:
                assert before is UpcallState.SERVICE_CONNECTED and in_flight == 0
                in_flight = 1
        elif op == "data":
            try:
                _, events = core.receive_data(arg)  # type: ignore[arg-type]
            except UpcallProtocolError:
                assert state(core) is UpcallState.BROKEN or not live
                continue
            for event in events:
                if isinstance(event, ReplyReceived):
                    assert in_flight == 1
                    in_flight = 0
        if state(core) is UpcallState.SERVICE_BUSY:
            assert in_flight == 1
        if in_flight:  # garbage breaks the connection; its request stays pending until connection_lost
            assert state(core) in (UpcallState.SERVICE_BUSY, UpcallState.BROKEN)
        assert (core.pending is not None) == (in_flight == 1)
