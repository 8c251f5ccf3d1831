"""The client against in-process ttrpc servers: addresses, hybrid vsock, retry, timeouts, health, logs."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
import trio
from client_harness import one_connection  # type: ignore[import-not-found]
from google.protobuf import empty_pb2

from kata_agent_client import (
    AgentAddress,
    AgentCallError,
    AgentConnectionLost,
    AgentDisconnected,
    AgentTimeout,
    AgentUnimplemented,
    BadAddress,
    BadSpec,
    HandshakeFailed,
    HealthChecker,
    forward_line,
    forward_logs,
    guest_timed,
    open_agent_client,
)
from kata_proto import ttrpc
from kata_proto.agent import AGENT_SERVICE, HEALTH_SERVICE, agent_pb2, health_pb2


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="kac-", dir="/tmp")
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


class FakeHealth:
    def __init__(self) -> None:
        self.serving = True

    async def Check(self, req: Any, ctx: ttrpc.CallContext) -> health_pb2.HealthCheckResponse:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return health_pb2.HealthCheckResponse(status=status)

    async def Version(self, req: Any, ctx: ttrpc.CallContext) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(grpc_version="ttrpc", agent_version="9.9")


class FakeAgent:
    """Records the deadline each call arrived with."""

    def __init__(self) -> None:
        self.remaining: dict[str, float | None] = {}
        self.requests: list[Any] = []

    def _note(self, name: str, ctx: ttrpc.CallContext) -> None:
        left = None if ctx.deadline is None else ctx.time_remaining()
        self.remaining[name] = None if left is None or math.isinf(left) else left

    async def StartContainer(self, req: Any, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        self._note("StartContainer", ctx)
        return empty_pb2.Empty()

    async def WaitProcess(self, req: Any, ctx: ttrpc.CallContext) -> agent_pb2.WaitProcessResponse:
        self._note("WaitProcess", ctx)
        return agent_pb2.WaitProcessResponse(status=42)

    async def CreateContainer(self, req: Any, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        self._note("CreateContainer", ctx)
        self.requests.append(req)
        return empty_pb2.Empty()

    async def ReadStdout(self, req: Any, ctx: ttrpc.CallContext) -> agent_pb2.ReadStreamResponse:
        self._note("ReadStdout", ctx)
        return agent_pb2.ReadStreamResponse(data=b"")


def _server(health: FakeHealth | None = None, agent: FakeAgent | None = None) -> ttrpc.TtrpcServer:
    server = ttrpc.TtrpcServer()
    server.register(HEALTH_SERVICE, health or FakeHealth())
    server.register(AGENT_SERVICE, agent or FakeAgent())
    return server


async def _fake_muxer(path: str, server: ttrpc.TtrpcServer, *, guest_open: bool = True) -> None:
    """A hybrid vsock muxer: `CONNECT 1024` then the ttrpc server on the same stream."""

    async def handle(stream: trio.SocketStream) -> None:
        line = b""
        while not line.endswith(b"\n"):
            line += await stream.receive_some(1)
        if not guest_open or line.strip().upper() != b"CONNECT 1024":
            await stream.aclose()
            return
        await stream.send_all(b"OK 1073741824\n")
        await server.serve_stream(stream)

    listeners = await trio.open_unix_listeners(path) if hasattr(trio, "open_unix_listeners") else None
    if listeners is None:
        sock = trio.socket.socket(trio.socket.AF_UNIX)
        await sock.bind(path)
        sock.listen(8)
        listeners = [trio.SocketListener(sock)]
    await trio.serve_listeners(handle, listeners)


def test_address_forms() -> None:
    assert AgentAddress.parse("unix:/run/a.sock") == AgentAddress("unix", path="/run/a.sock")
    assert AgentAddress.parse("hvsock:/run/kata.hvsock:1024") == AgentAddress(
        "hvsock", path="/run/kata.hvsock", port=1024
    )
    assert AgentAddress.parse("hvsock:///run/kata.hvsock") == AgentAddress(
        "hvsock", path="/run/kata.hvsock", port=1024
    )
    assert AgentAddress.parse("vsock://3:1024") == AgentAddress("vsock", cid=3, port=1024)
    assert AgentAddress.parse("hvsock:/x:1024").with_port(1025).port == 1025
    for bad in ("tcp://1.2.3.4:5", "vsock://x:y", "/plain/path"):
        with pytest.raises(BadAddress):
            AgentAddress.parse(bad)


def test_hybrid_vsock_handshake_then_typed_calls(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "kata.hvsock")
        async with trio.open_nursery() as n:
            n.start_soon(_fake_muxer, path, _server())
            async with open_agent_client(f"hvsock:{path}:1024", ready_timeout=5) as client:
                assert await client.check()
                assert (await client.version()).agent_version == "9.9"
                assert await client.wait_process("c") == 42
            n.cancel_scope.cancel()

    trio.run(main)


def test_connect_retries_until_the_agent_listens(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "agent.sock")
        server = _server()
        async with trio.open_nursery() as n:

            async def late() -> None:
                await trio.sleep(0.3)
                await server.serve_unix(path)

            n.start_soon(late)
            t0 = trio.current_time()
            async with open_agent_client(f"unix:{path}", ready_timeout=5) as client:
                assert trio.current_time() - t0 >= 0.3
                assert await client.check()
            n.cancel_scope.cancel()

    trio.run(main)


def test_connect_gives_up_with_agent_timeout(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "kata.hvsock")
        async with trio.open_nursery() as n:
            # the VMM is there but nothing listens on the guest port: it closes every connection
            n.start_soon(partial(_fake_muxer, path, _server(), guest_open=False))
            await trio.sleep(0.05)
            with pytest.raises(AgentTimeout, match=r"HandshakeFailed|closed"):
                async with open_agent_client(f"hvsock:{path}", ready_timeout=0.5):
                    pass
            n.cancel_scope.cancel()
        with pytest.raises(AgentTimeout):
            async with open_agent_client(f"unix:{os.path.join(sockdir, 'none.sock')}", ready_timeout=0.3):
                pass

    trio.run(main)


def test_not_serving_is_retried_too(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "agent.sock")
        health = FakeHealth()
        health.serving = False
        async with trio.open_nursery() as n:
            await n.start(_server(health).serve_unix, path)
            with pytest.raises(AgentTimeout):
                async with open_agent_client(f"unix:{path}", ready_timeout=0.3):
                    pass
            n.cancel_scope.cancel()

    trio.run(main)


def test_upstream_timeouts_are_sent(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "agent.sock")
        agent = FakeAgent()
        async with trio.open_nursery() as n:
            await n.start(_server(agent=agent).serve_unix, path)
            async with open_agent_client(f"unix:{path}") as client:
                await client.start_container("c")
                await client.wait_process("c")
                await client.read_stdout("c")
            n.cancel_scope.cancel()
        start = agent.remaining["StartContainer"]
        assert start is not None and 29 < start <= 30
        assert agent.remaining["WaitProcess"] is None
        assert agent.remaining["ReadStdout"] is None

    trio.run(main)


class SlowAgent(FakeAgent):
    """StartContainer answers after `delay` seconds of wall time."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def StartContainer(self, req: Any, ctx: ttrpc.CallContext) -> empty_pb2.Empty:
        self._note("StartContainer", ctx)
        await trio.sleep(self.delay)
        return empty_pb2.Empty()


def _clock_at(rate: float) -> Any:
    """A guest clock that advances `rate` seconds per wall second (0.1: the VM gets a tenth of a CPU)."""
    t0 = time.monotonic()
    return lambda: t0 + rate * (time.monotonic() - t0)


@pytest.mark.parametrize(
    ("rate", "delay", "outcome"),
    [(0.1, 1.0, "answered"), (1.0, 1.0, "guest"), (0.0, 3.0, "wall")],
    ids=["starved-vm-is-slow-not-failed", "running-vm-spends-its-budget", "vm-without-cpu-hits-the-wall-cap"],
)
def test_with_a_guest_clock_a_call_timeout_is_guest_time_within_a_wall_cap(
    sockdir: str, rate: float, delay: float, outcome: str
) -> None:
    """Ten VMs on one host CPU answer each call ten times later in wall time: a call's budget is counted on
    the guest's clock, so the starved VM's call (0.1 s of guest time in 1 s) is not failed at 0.3 s; a VM
    that had the CPU does spend its budget; a VM that never gets one is stopped at 10 budgets of wall time.
    The agent is sent the wall cap as the deadline (its own clock is wall time)."""

    async def main() -> None:
        path = os.path.join(sockdir, "agent.sock")
        agent = SlowAgent(delay)
        async with trio.open_nursery() as n:
            await n.start(_server(agent=agent).serve_unix, path)
            async with open_agent_client(f"unix:{path}", call_timeout=0.2, clock=_clock_at(rate)) as client:
                t0 = time.monotonic()
                if outcome == "answered":
                    await client.start_container("c")
                else:
                    with pytest.raises(AgentCallError) as info:
                        await client.start_container("c")
                    assert info.value.code == ttrpc.Code.DEADLINE_EXCEEDED
                    if outcome == "guest":
                        assert "no response within 0.2 s of guest time (" in str(info.value), info.value
                        assert time.monotonic() - t0 < 1.0
                    else:
                        assert "no response within the wall-time cap of 2 s" in str(info.value), info.value
                        assert time.monotonic() - t0 >= 2.0 * 0.9  # 10 budgets of 0.2 s
            n.cancel_scope.cancel()
        sent = agent.remaining["StartContainer"]
        assert sent is not None and 1.5 < sent <= 2.0  # the wall cap, not the guest budget

    trio.run(main)


def test_without_a_clock_a_budget_is_wall_time_and_says_so() -> None:
    """No guest clock (a client without a VM to count on): the budget is wall time, and the error does not
    claim guest time."""

    async def main() -> None:
        async def quick() -> str:
            await trio.sleep(0.01)
            return "done"

        async def slow() -> None:
            await trio.sleep(30)

        assert await guest_timed(None, 1.0, quick) == "done"
        t0 = time.monotonic()
        with pytest.raises(trio.TooSlowError) as info:
            await guest_timed(None, 0.2, slow)
        assert str(info.value) == "within 0.2 s", info.value
        assert 0.15 < time.monotonic() - t0 < 5

    trio.run(main)


def test_health_checker_reports_once_per_failure_streak(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "agent.sock")
        health = FakeHealth()
        calls: list[BaseException | None] = []

        async def unhealthy(err: BaseException | None) -> None:
            calls.append(err)

        async with trio.open_nursery() as n:
            await n.start(_server(health).serve_unix, path)
            async with open_agent_client(f"unix:{path}") as client:
                checker = HealthChecker(client, unhealthy, interval=0.01)
                assert await checker.check_once()
                health.serving = False
                assert not await checker.check_once()
                assert not await checker.check_once()
                assert calls == [None]
                health.serving = True
                assert await checker.check_once()
                assert checker.healthy and checker.failures == 2
            n.cancel_scope.cancel()

    trio.run(main)


class SlowHealth(FakeHealth):
    """Health.Check answers after `delay` seconds of wall time."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def Check(self, req: Any, ctx: ttrpc.CallContext) -> health_pb2.HealthCheckResponse:
        await trio.sleep(self.delay)
        return await super().Check(req, ctx)


@pytest.mark.parametrize(("rate", "healthy"), [(0.1, True), (1.0, False)], ids=["starved-vm", "running-vm"])
def test_health_check_timeout_is_guest_time(sockdir: str, rate: float, healthy: bool) -> None:
    """A check answered after 1 s of wall time within a 0.3 s timeout: healthy for a VM that had a tenth of
    a CPU (0.1 s of its time), a failure for one that had the CPU."""

    async def main() -> None:
        path = os.path.join(sockdir, "agent.sock")
        health = SlowHealth(0.0)
        failures: list[BaseException | None] = []

        async def unhealthy(err: BaseException | None) -> None:
            failures.append(err)

        async with trio.open_nursery() as n:
            await n.start(_server(health).serve_unix, path)
            async with open_agent_client(f"unix:{path}", clock=_clock_at(rate)) as client:
                health.delay = 1.0
                checker = HealthChecker(client, unhealthy, timeout=0.3)
                assert await checker.check_once() is healthy
                if not healthy:
                    assert isinstance(failures[0], trio.TooSlowError), failures
                    assert "within 0.3 s of guest time" in str(failures[0])
            n.cancel_scope.cancel()

    trio.run(main)


def test_forward_line_maps_levels_and_fields(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.agent")
    with caplog.at_level(logging.DEBUG, logger="test.agent"):
        forward_line(json.dumps({"level": "error", "msg": "boom", "container": "c1"}).encode(), logger)
        forward_line(b'{"msg":"upstream","level":"WARN","ts":"x"}', logger)
        forward_line(b"plain text\n", logger)
        forward_line(b"", logger)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "boom"),
        (logging.WARNING, "upstream"),
        (logging.INFO, "plain text"),
    ]
    assert caplog.records[0].agent["container"] == "c1"  # type: ignore[attr-defined]


@pytest.mark.parametrize("depth", [100_000, 400_000])
def test_a_deeply_nested_agent_log_line_is_logged_as_text(
    caplog: pytest.LogCaptureFixture, depth: int
) -> None:
    """The guest writes the log port: JSON nested past the recursion limit makes json.loads raise
    RecursionError, which must not escape (it would end the shim's log task, and with it the shim)."""
    logger = logging.getLogger("test.agent")
    line = b"[" * depth + b"]" * depth
    with caplog.at_level(logging.DEBUG, logger="test.agent"):
        forward_line(line, logger)
        forward_line(b'{"msg":"after","level":"info"}', logger)
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.INFO]
    assert caplog.records[0].getMessage() == line.decode()
    assert caplog.records[1].getMessage() == "after"


def test_log_forwarder_reads_lines_until_eof(sockdir: str, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "agent.sock.log")

        async def lines(conn: trio.socket.SocketType) -> None:
            await conn.send(b'{"level":"info","msg":"one"}\n{"level":"warn","ms')
            await trio.sleep(0.05)
            await conn.send(b'g":"two"}\ntail-without-newline')

        async with one_connection(path, lines):
            await forward_logs(f"unix:{path}", logging.getLogger("test.fwd"))

    with caplog.at_level(logging.INFO, logger="test.fwd"):
        trio.run(main)
    assert [r.getMessage() for r in caplog.records] == ["one", "two", "tail-without-newline"]
    assert caplog.records[1].levelno == logging.WARNING


def test_handshake_failure_is_typed(sockdir: str) -> None:
    async def main() -> None:
        from kata_agent_client import connect

        path = os.path.join(sockdir, "kata.hvsock")

        async def refuse(conn: trio.socket.SocketType) -> None:
            await conn.recv(64)
            await conn.send(b"ERR no\n")

        async with one_connection(path, refuse):
            with pytest.raises(HandshakeFailed):
                await connect(AgentAddress("hvsock", path=path))

    trio.run(main)


def test_errors_from_the_callers_block_come_out_bare(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "agent.sock")
        async with trio.open_nursery() as n:
            await n.start(_server().serve_unix, path)
            with pytest.raises(AgentUnimplemented):
                async with open_agent_client(f"unix:{path}") as client:
                    await client.remove_container("c")  # FakeAgent lacks it
            with pytest.raises(KeyError):
                async with open_agent_client(f"unix:{path}"):
                    raise KeyError("mine")
            n.cancel_scope.cancel()

    trio.run(main)


async def _serve_for_a_while(path: str, server: ttrpc.TtrpcServer, stop: trio.Event) -> None:
    """Serve `path` until `stop`: the connections the server held are cut when it returns."""
    async with trio.open_nursery() as n:
        await n.start(server.serve_unix, path)
        await stop.wait()
        n.cancel_scope.cancel()


def test_a_lost_connection_without_reconnect_makes_the_client_lost(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "agent.sock")
        stop = trio.Event()
        async with trio.open_nursery() as n:
            n.start_soon(_serve_for_a_while, path, _server(), stop)
            async with open_agent_client(f"unix:{path}", ready_timeout=5) as client:
                assert await client.check() and client.generation == 1 and client.lost is None
                stop.set()
                with trio.fail_after(10):
                    reason = await client.wait_lost()
                assert reason and client.lost == reason
                assert not await client.wait_reconnected(1)
                with pytest.raises(AgentConnectionLost, match="lost"):
                    await client.check()

    trio.run(main)


def test_the_client_reconnects_within_its_budget_and_calls_go_to_the_new_connection(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "agent.sock")
        first, second = trio.Event(), trio.Event()
        agent = FakeAgent()
        async with trio.open_nursery() as n:
            n.start_soon(_serve_for_a_while, path, _server(), first)
            async with open_agent_client(
                f"unix:{path}", ready_timeout=5, reconnect_timeout=10, retry_interval=0.01
            ) as client:
                assert client.generation == 1
                first.set()  # the agent goes away ...
                await trio.sleep(0.2)
                assert client.lost is None  # ... the client keeps dialling within its budget
                n.start_soon(_serve_for_a_while, path, _server(agent=agent), second)  # ... and comes back
                with trio.fail_after(10):
                    assert await client.wait_reconnected(1)
                assert client.generation == 2 and client.lost is None
                assert await client.wait_process("c") == 42
                assert "WaitProcess" in agent.remaining
                second.set()
            n.cancel_scope.cancel()

    trio.run(main)


def test_a_reconnect_that_runs_out_of_budget_makes_the_client_lost(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "agent.sock")
        stop = trio.Event()
        async with trio.open_nursery() as n:
            n.start_soon(_serve_for_a_while, path, _server(), stop)
            async with open_agent_client(
                f"unix:{path}", ready_timeout=5, reconnect_timeout=0.3, retry_interval=0.01
            ) as client:
                stop.set()
                with trio.fail_after(10):
                    reason = await client.wait_lost()
                assert "reconnect failed" in reason and "not ready within 0.3 s" in reason
                assert client.generation == 1

    trio.run(main)


def test_health_checker_with_a_budget_returns_after_that_many_failures_in_a_row(sockdir: str) -> None:
    async def main() -> None:
        path = os.path.join(sockdir, "agent.sock")
        health = FakeHealth()
        reported: list[BaseException | None] = []

        async def unhealthy(err: BaseException | None) -> None:
            reported.append(err)
            if len(reported) == 1:
                health.serving = True  # one recovery in between: the streak starts over

        async with trio.open_nursery() as n:
            await n.start(_server(health).serve_unix, path)
            async with open_agent_client(f"unix:{path}") as client:
                checker = HealthChecker(client, unhealthy, interval=0.001, max_failures=3)
                health.serving = False
                assert not await checker.check_once()
                assert checker.streak == 1
                assert await checker.check_once()
                assert checker.streak == 0
                health.serving = False
                with trio.fail_after(10):
                    await checker.run()
                assert checker.streak == 3 and checker.failures == 4 and len(reported) == 2
            n.cancel_scope.cancel()

    trio.run(main)


def test_calls_raise_the_clients_typed_errors_and_take_oci_json(sockdir: str) -> None:
    """Issue 13: the client raises its own errors (code and method kept), never ttrpc's; a whole config.json
    goes in as it is, a value that does not fit oci.proto is BadSpec before anything is sent."""

    async def main() -> None:
        path = os.path.join(sockdir, "agent.sock")
        agent = FakeAgent()
        async with trio.open_nursery() as n:
            await n.start(_server(agent=agent).serve_unix, path)
            async with open_agent_client(f"unix:{path}") as client:
                with pytest.raises(AgentUnimplemented) as info:
                    await client.pause_container("c")
                assert isinstance(info.value, AgentCallError) and not isinstance(info.value, ttrpc.TtrpcError)
                assert (info.value.method, info.value.code) == ("PauseContainer", ttrpc.Code.UNIMPLEMENTED)
                spec = {"process": {"args": ["sh"], "user": {"uid": 7}}, "linux": {"cgroupsPath": "/x"}}
                await client.create_container("c", spec)
                (sent,) = agent.requests
                assert list(sent.OCI.Process.Args) == ["sh"] and sent.OCI.Process.User.UID == 7
                assert sent.OCI.Linux.CgroupsPath == "/x"
                with pytest.raises(BadSpec, match=r"process\.user\.uid"):
                    await client.create_container("c", {"process": {"args": ["sh"], "user": {"uid": "root"}}})
                with pytest.raises(BadSpec, match="no args"):
                    await client.exec_process("c", "e", {"args": []})
                assert len(agent.requests) == 1
            n.cancel_scope.cancel()
        with pytest.raises(AgentDisconnected):
            await client.check()  # closed with its block

    trio.run(main)
