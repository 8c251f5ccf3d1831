"""Passfd stdio: streams keyed by peer port, and container stdio pumped through them (socketpairs)."""

from __future__ import annotations

import gc
import os
import socket
import warnings
from pathlib import Path

import pytest
import trio
from agent_harness import AgentUnderTest, running_agent

from kata_agent._guest import kernel_param
from kata_agent._passfd import PassfdStreams, passfd_port_from_cmdline
from kata_agent_client import AgentFailedPrecondition, ContainerSpec, Process, StdioPorts
from kata_proto import ttrpc


def test_port_from_kernel_cmdline() -> None:
    assert passfd_port_from_cmdline("quiet agent.passfd_listener_port=1027 console=ttyS0") == 1027
    assert passfd_port_from_cmdline("quiet") == 0
    assert passfd_port_from_cmdline("agent.passfd_listener_port=0") == 0
    assert passfd_port_from_cmdline("agent.passfd_listener_port=x") == 0
    assert passfd_port_from_cmdline("agent.passfd_listener_port=99999999999") == 0


def test_take_waits_for_the_stream_then_fails_clearly() -> None:
    async def main() -> None:
        streams = PassfdStreams(wait=0.3)
        a, b = socket.socketpair()
        with b:

            async def late() -> None:
                await trio.sleep(0.05)
                streams.add(5000, trio.SocketStream(trio.socket.from_stdlib_socket(a)))

            async with trio.open_nursery() as n:
                n.start_soon(late)
                got = await streams.take(5000)
            got.socket.close()
            with pytest.raises(ttrpc.FailedPrecondition, match="port 5001"):
                await streams.take(5001)
        assert len(streams) == 0

    trio.run(main)


def test_streams_nobody_took_are_closed_by_a_later_arrival() -> None:
    async def main() -> None:
        streams = PassfdStreams(stale=0.05)
        ends = []
        for port in (1, 2):
            a, b = socket.socketpair()
            ends.append(b)
            streams.add(port, trio.SocketStream(trio.socket.from_stdlib_socket(a)))
            await trio.sleep(0.1)
        assert len(streams) == 1 and ends[0].recv(1) == b""  # port 1's stream was closed
        streams.close()
        assert ends[1].recv(1) == b""
        for b in ends:
            b.close()

    trio.run(main)


def test_serve_keys_streams_by_peer_port() -> None:
    # A TCP listener on loopback stands in for AF_VSOCK: both report the connecting port.
    async def main() -> None:
        streams = PassfdStreams(wait=2)
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as n:
            await n.start(streams.serve, listeners[0])
            client = await trio.open_tcp_stream("127.0.0.1", port)
            peer = client.socket.getsockname()[1]
            got = await streams.take(peer)
            await client.send_all(b"hi")
            assert await got.receive_some(10) == b"hi"
            await got.aclose()
            await client.aclose()
            n.cancel_scope.cancel()
        await listeners[0].aclose()

    trio.run(main)


# -- through the in-process agent with runc ----------------------------------------------------------
def _spec(rootfs: Path, *args: str, terminal: bool = False) -> ContainerSpec:
    return ContainerSpec(root=str(rootfs), process=Process(list(args), terminal=terminal))


def _feed(agent: AgentUnderTest, port: int) -> trio.SocketStream:
    """Give the agent a passfd stream for `port`; returns the host's end."""
    ours, theirs = socket.socketpair()
    agent.service.passfd.add(port, trio.SocketStream(trio.socket.from_stdlib_socket(theirs)))
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours))


async def _read_all(stream: trio.SocketStream) -> bytes:
    chunks = []
    while data := await stream.receive_some(65536):
        chunks.append(data)
    return b"".join(chunks)


@pytest.mark.root
def test_out_err_split_and_exit_after_output(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            out, err = _feed(agent, 7001), _feed(agent, 7002)
            # Late, large output: WaitProcess must not answer before it was all copied.
            script = "sleep 0.3; head -c 300000 /dev/zero | tr '\\0' o; echo err >&2; exit 4"
            spec = _spec(busybox_rootfs, "sh", "-c", script)
            await agent.client.create_container("p1", spec, stdio_ports=StdioPorts(0, 7001, 7002))
            await agent.client.start_container("p1")
            events: list[str] = []
            got: dict[str, bytes] = {}

            async def collect(name: str, stream: trio.SocketStream) -> None:
                got[name] = await _read_all(stream)
                events.append(f"{name}-eof")

            async with trio.open_nursery() as n:
                n.start_soon(collect, "out", out)
                n.start_soon(collect, "err", err)
                with trio.fail_after(30):
                    assert await agent.client.wait_process("p1") == 4
                events.append("exit")
            # The streams were complete and closed before WaitProcess answered.
            assert events[-1] == "exit"
            assert got == {"out": b"o" * 300000, "err": b"err\n"}
            await agent.client.remove_container("p1")
            await out.aclose()
            await err.aclose()

    trio.run(main)


@pytest.mark.root
def test_one_mebibyte_stdin_through_cat_and_stdin_eof(busybox_rootfs: Path) -> None:
    payload = os.urandom(1 << 20)

    async def main() -> None:
        async with running_agent() as agent:
            inp, out = _feed(agent, 7101), _feed(agent, 7102)
            spec = _spec(busybox_rootfs, "cat")
            await agent.client.create_container("p2", spec, stdio_ports=StdioPorts(7101, 7102, 0))
            await agent.client.start_container("p2")
            got: list[bytes] = []
            async with trio.open_nursery() as n:

                async def feed() -> None:
                    await inp.send_all(payload)
                    await inp.send_eof()  # EOF on the stream closes cat's stdin

                async def collect() -> None:
                    got.append(await _read_all(out))

                n.start_soon(feed)
                n.start_soon(collect)
                with trio.fail_after(30):
                    assert await agent.client.wait_process("p2") == 0
            assert got[0] == payload
            await agent.client.remove_container("p2")
            await inp.aclose()
            await out.aclose()

    trio.run(main)


@pytest.mark.root
def test_missing_port_is_a_clear_error_and_leaves_nothing(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            agent.service.passfd.wait = 0.2
            out = _feed(agent, 7201)
            spec = _spec(busybox_rootfs, "true")
            with pytest.raises(AgentFailedPrecondition, match="7202"):
                await agent.client.create_container("p3", spec, stdio_ports=StdioPorts(0, 7201, 7202))
            assert agent.service.containers == {}
            assert os.listdir(agent.run_dir) == []
            assert await out.receive_some(10) == b""  # the stream it had taken was closed
            await out.aclose()

    trio.run(main)


@pytest.mark.root
def test_exec_and_terminal_use_stdout_only(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            await agent.client.create_container("p4", _spec(busybox_rootfs, "sleep", "30"))
            await agent.client.start_container("p4")
            inp, out = _feed(agent, 7301), _feed(agent, 7302)
            err = _feed(agent, 7303)
            proc = Process(["sh", "-c", "read x; echo got-$x; echo e >&2"], terminal=True)
            await agent.client.exec_process("p4", "e1", proc, stdio_ports=StdioPorts(7301, 7302, 7303))
            assert len(agent.service.passfd) == 1  # a terminal does not take the stderr stream
            await inp.send_all(b"hello\n")
            with trio.fail_after(10):
                assert await agent.client.wait_process("p4", "e1") == 0
            text = await _read_all(out)
            assert b"got-hello" in text and b"e" in text  # a tty merges stderr into stdout
            await agent.client.remove_container("p4")
            for s in (inp, out, err):
                await s.aclose()

    trio.run(main)


@pytest.mark.root
def test_a_failed_exec_closes_the_streams_it_took(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            await agent.client.create_container("p5", _spec(busybox_rootfs, "sleep", "30"))  # not started
            out = _feed(agent, 7401)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                with pytest.raises(AgentFailedPrecondition, match="not running"):
                    await agent.client.exec_process(
                        "p5", "e1", Process(["true"]), stdio_ports=StdioPorts(0, 7401, 0)
                    )
                gc.collect()
            # closed by the agent, not left to the garbage collector (which warns of an unclosed socket)
            assert not [w for w in caught if issubclass(w.category, ResourceWarning)], caught
            assert len(agent.service.passfd) == 0  # taken, then closed: not left for a later request
            with trio.fail_after(5):
                assert await out.receive_some(10) == b""
            await out.aclose()
            await agent.client.remove_container("p5")

    trio.run(main)


def test_kernel_param_takes_the_last_value_of_exactly_that_name() -> None:
    assert kernel_param("a=1 agent.log=debug b agent.log=info", "agent.log") == "info"
    assert kernel_param("agent.logx=debug agent.log", "agent.log") is None  # no '=': not a value
    assert kernel_param("agent.log=", "agent.log") == ""
