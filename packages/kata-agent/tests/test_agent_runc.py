"""The agent in-process on a unix socket, driven by kata-agent-client, running busybox with runc."""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path

import pytest
import trio
from agent_harness import AgentUnderTest, mounts_under, running_agent
from google.protobuf.empty_pb2 import Empty

from kata_agent_client import (
    AgentAlreadyExists,
    AgentCallError,
    AgentFailedPrecondition,
    AgentInvalidArgument,
    AgentNotFound,
    AgentUnimplemented,
    ContainerSpec,
    Process,
    Resources,
    Storage,
)
from kata_proto import ttrpc
from kata_proto.agent import agent_pb2

pytestmark = pytest.mark.root


def _spec(rootfs: Path, *args: str, terminal: bool = False, memory: int = 0) -> ContainerSpec:
    spec = ContainerSpec(root=str(rootfs), process=Process(list(args), terminal=terminal))
    spec.memory_limit = memory
    return spec


async def _run(agent: AgentUnderTest, cid: str, spec: ContainerSpec) -> None:
    await agent.client.create_container(cid, spec)
    await agent.client.start_container(cid)


def test_check_answers_serving_and_version() -> None:
    async def main() -> None:
        async with running_agent() as agent:
            assert await agent.client.check()
            version = await agent.client.version()
            assert version.agent_version

    trio.run(main)


def test_stdout_stderr_and_exit_status_are_exact(
    busybox_rootfs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kata_agent")

    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            await _run(agent, "c1", _spec(busybox_rootfs, "sh", "-c", "echo out; echo err >&2; exit 3"))
            async with trio.open_nursery() as n:
                got: dict[str, bytes] = {}

                async def read(stderr: bool) -> None:
                    got["err" if stderr else "out"] = await c.read_all("c1", stderr=stderr)

                n.start_soon(read, False)
                n.start_soon(read, True)
                assert await c.wait_process("c1") == 3
            assert got == {"out": b"out\n", "err": b"err\n"}
            await c.remove_container("c1")
            assert os.listdir(agent.run_dir) == []

    trio.run(main)
    # the create's steps, in the order they ran, in one debug line (issue 16: each step's time)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("container c1: created, ")]
    steps = re.findall(r"([a-z-]+) \d+\.\d\d", line.split(": ", 2)[2])
    assert steps == ["spec", "devices", "stdio", "storages", "runtime-create"], line


def test_one_mebibyte_through_cat_is_byte_identical(busybox_rootfs: Path) -> None:
    data = os.urandom(1 << 20)

    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            await _run(agent, "cat", _spec(busybox_rootfs, "cat"))
            out: list[bytes] = []
            async with trio.open_nursery() as n:

                async def feed() -> None:
                    for i in range(0, len(data), 200_000):
                        await c.write_stdin("cat", "", data[i : i + 200_000])
                    assert await c.write_stdin("cat", "", b"") == 0  # empty = close stdin

                async def drain() -> None:
                    out.append(await c.read_all("cat"))

                n.start_soon(feed)
                n.start_soon(drain)
            assert await c.wait_process("cat") == 0
            assert out[0] == data

    trio.run(main)


def test_exec_second_process_and_signals_reach_it(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            script = 'trap "exit 7" TERM; echo ready; while true; do sleep 0.05; done'
            await _run(agent, "svc", _spec(busybox_rootfs, "sh", "-c", script))
            assert await c.read_stdout("svc") == b"ready\n"
            await c.exec_process("svc", "e1", Process(["sh", "-c", "echo exec $$; cat /proc/1/cmdline"]))
            out = await c.read_all("svc", "e1")
            assert out.startswith(b"exec ") and b"sh\0-c\0trap" in out
            assert await c.wait_process("svc", "e1") == 0
            assert await c.read_stderr("svc", "e1") == b""
            # status and both streams collected: the exec is forgotten and its fds closed
            assert "e1" not in agent.service.containers["svc"].execs
            # a child left behind keeps the pipe open: EOF comes once the exec has exited
            await c.exec_process("svc", "bg", Process(["sh", "-c", "sleep 100 & echo started"]))
            with trio.fail_after(10):
                assert await c.read_all("svc", "bg") == b"started\n"
            assert await c.wait_process("svc", "bg") == 0
            await c.exec_process("svc", "sleeper", Process(["sleep", "100"]))
            await c.signal_process("svc", "sleeper", signal.SIGKILL)
            assert await c.wait_process("svc", "sleeper") == 128 + signal.SIGKILL
            with pytest.raises(AgentAlreadyExists):  # its output was never read: still known
                await c.exec_process("svc", "sleeper", Process(["true"]))
            await c.signal_process("svc", "", signal.SIGTERM)
            assert await c.wait_process("svc") == 7
            with pytest.raises(AgentNotFound):
                await c.signal_process("svc", "", signal.SIGTERM)
            await c.remove_container("svc")

    trio.run(main)


def test_sigkill_reaches_init(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            await _run(agent, "k", _spec(busybox_rootfs, "sleep", "100"))
            await agent.client.signal_process("k", "", signal.SIGKILL)
            assert await agent.client.wait_process("k") == 128 + signal.SIGKILL

    trio.run(main)


def test_terminal_process_sees_resize(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            script = 'stty size; trap "stty size; exit 0" WINCH; echo armed; while true; do sleep 0.05; done'
            await _run(agent, "tty", _spec(busybox_rootfs, "sh", "-c", script, terminal=True))
            text = b""
            with trio.fail_after(10):
                while b"armed" not in text:
                    text += await c.read_stdout("tty")
            await c.tty_win_resize("tty", "", 33, 101)
            with trio.fail_after(10):
                while chunk := await c.read_stdout("tty"):
                    text += chunk
            assert b"33 101" in text
            assert await c.wait_process("tty") == 0
            with pytest.raises(AgentFailedPrecondition):
                await c.exec_process("tty", "x", Process(["true"]))

    trio.run(main)


def test_pause_resume_and_stats_report_memory(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            script = "i=0; while true; do i=$((i+1)); echo $i > /tmp/n; sleep 0.02; done"
            await _run(agent, "p", _spec(busybox_rootfs, "sh", "-c", script, memory=64 << 20))
            await trio.sleep(0.2)
            stats = await c.stats_container("p")
            assert stats.memory_usage > 0
            assert stats.memory_limit == 64 << 20
            assert stats.pids_current >= 1
            await c.pause_container("p")
            with pytest.raises(AgentFailedPrecondition):
                await c.exec_process("p", "frozen", Process(["true"]))
            await trio.sleep(0.1)
            paused = await c.stats_container("p")
            await trio.sleep(0.3)
            still = await c.stats_container("p")
            assert still.cpu_total_ns == paused.cpu_total_ns
            await c.resume_container("p")
            await trio.sleep(0.3)
            assert (await c.stats_container("p")).cpu_total_ns > still.cpu_total_ns
            await c.update_container("p", Resources(memory_limit=96 << 20))
            assert (await c.stats_container("p")).memory_limit == 96 << 20
            await c.remove_container("p")

    trio.run(main)


def test_oom_event_for_container_over_its_limit(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            # tail keeps an ever-growing line of zeros in memory: the OOM killer takes it.
            spec = _spec(busybox_rootfs, "sh", "-c", "tail /dev/zero; sleep 100", memory=16 << 20)
            await _run(agent, "hog", spec)
            with trio.fail_after(30):
                assert await c.get_oom_event() == "hog"
            await c.remove_container("hog")
            # the init itself OOM-killed, its exit collected first: the event still comes
            await _run(agent, "hog2", _spec(busybox_rootfs, "tail", "/dev/zero", memory=16 << 20))
            assert await c.wait_process("hog2") == 128 + signal.SIGKILL
            with trio.fail_after(10):
                assert await c.get_oom_event() == "hog2"
            await c.remove_container("hog2")

    trio.run(main)


def test_unknown_container_duplicate_id_and_bad_spec(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            with pytest.raises(AgentNotFound):
                await c.start_container("nope")
            with pytest.raises(AgentNotFound):
                await c.wait_process("nope")
            with pytest.raises(AgentNotFound):
                await c.read_stdout("nope")
            await agent.client.create_container("dup", _spec(busybox_rootfs, "true"))
            with pytest.raises(AgentAlreadyExists):
                await agent.client.create_container("dup", _spec(busybox_rootfs, "true"))
            with pytest.raises(AgentNotFound):
                await c.wait_process("dup", "no-such-exec")
            await c.remove_container("dup")
            with pytest.raises(AgentInvalidArgument):
                await c.create_container("empty", _spec(busybox_rootfs))  # no args
            with pytest.raises(AgentInvalidArgument):
                await c.call("CreateContainer", agent_pb2.CreateContainerRequest(container_id="x"), Empty)
            with pytest.raises(AgentInvalidArgument):
                await c.create_container("../evil", _spec(busybox_rootfs, "true"))
            assert not agent.service.containers
            assert os.listdir(agent.run_dir) == []

    trio.run(main)


def test_failed_create_leaves_no_mount_process_or_bundle(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            scratch = os.path.join(os.path.dirname(agent.run_dir), "scratch")
            storages = [Storage("ephemeral", scratch, source="tmpfs", fstype="tmpfs")]
            # runc fails: the executable does not exist in the rootfs.
            spec = _spec(busybox_rootfs, "/no/such/binary")
            spec.mounts.append(type(spec.mounts[0])("/scratch", "bind", scratch, ["rbind"]))
            before = set(os.listdir("/proc"))
            with pytest.raises(AgentCallError) as info:
                await c.create_container("bad", spec, storages=storages)
                await c.start_container("bad")
            assert info.value.code in (ttrpc.Code.INVALID_ARGUMENT, ttrpc.Code.FAILED_PRECONDITION)
            if "bad" in agent.service.containers:  # the start failed: removing cleans up
                await c.remove_container("bad")
            assert mounts_under(scratch) == []
            assert not os.path.lexists(scratch)  # noqa: ASYNC240
            assert os.listdir(agent.run_dir) == []
            # a bad storage driver fails before anything is mounted
            with pytest.raises(AgentInvalidArgument):
                await c.create_container(
                    "bad2", _spec(busybox_rootfs, "true"), storages=[Storage("nfs", scratch)]
                )
            assert os.listdir(agent.run_dir) == []
            await trio.sleep(0.1)
            leftover = [p for p in set(os.listdir("/proc")) - before if p.isdigit() and _is_runc(p)]
            assert leftover == []

    trio.run(main)


def _is_runc(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"runc" in f.read()
    except OSError:
        return False


def test_unimplemented_rpc_answers_status_12() -> None:
    async def main() -> None:
        async with running_agent() as agent:
            with pytest.raises(AgentUnimplemented):
                await agent.client.call("AddSwap", agent_pb2.AddSwapRequest(), Empty)

    trio.run(main)


def test_create_start_timing_and_rss(busybox_rootfs: Path) -> None:
    """Measures CreateContainer+StartContainer with runc (printed; never gated on an absolute time)."""

    async def main() -> None:
        async with running_agent() as agent:
            times = []
            for i in range(5):
                t0 = trio.current_time()
                await _run(agent, f"t{i}", _spec(busybox_rootfs, "true"))
                times.append(trio.current_time() - t0)
                assert await agent.client.wait_process(f"t{i}") == 0
                await agent.client.remove_container(f"t{i}")
            metrics = await agent.client.get_metrics()
            rss = int(
                next(x for x in metrics.splitlines() if x.startswith("kata_agent_process_resident")).split()[
                    1
                ]
            )
            times.sort()
            print(f"\ncreate+start median {times[2] * 1000:.0f} ms (runc), in-process RSS {rss >> 20} MiB")
            assert rss > 0

    trio.run(main)
