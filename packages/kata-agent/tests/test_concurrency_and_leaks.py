"""Concurrent containers, no fd leak after remove, and the README example."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest
import trio
from agent_harness import running_agent

from kata_agent_client import ContainerSpec, Process

pytestmark = pytest.mark.root

README = Path(__file__).resolve().parents[1] / "README.md"


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_concurrent_containers_keep_their_own_output(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            results: dict[str, tuple[bytes, int]] = {}

            async def one(cid: str) -> None:
                spec = ContainerSpec(
                    str(busybox_rootfs), Process(["sh", "-c", f"echo {cid}; exit {len(cid)}"])
                )
                await c.create_container(cid, spec)
                await c.start_container(cid)
                out = await c.read_all(cid)
                results[cid] = (out, await c.wait_process(cid))
                await c.remove_container(cid)

            async with trio.open_nursery() as n:
                for cid in ("a", "bb", "ccc", "dddd"):
                    n.start_soon(one, cid)
            assert results == {cid: (f"{cid}\n".encode(), len(cid)) for cid in ("a", "bb", "ccc", "dddd")}

    trio.run(main)


def test_remove_releases_every_fd_even_with_reads_pending(busybox_rootfs: Path) -> None:
    async def main() -> None:
        async with running_agent() as agent:
            c = agent.client
            spec = ContainerSpec(str(busybox_rootfs), Process(["sleep", "100"]))
            await c.create_container("warm", spec)  # first use opens lazily created fds (libc, ...)
            await c.remove_container("warm")
            before = _fd_count()
            for i in range(3):
                await c.create_container(f"x{i}", spec)
                await c.start_container(f"x{i}")
                await c.exec_process(f"x{i}", "e", Process(["sleep", "100"], terminal=True))
            async with trio.open_nursery() as n:
                for i in range(3):
                    n.start_soon(c.read_stdout, f"x{i}", "")  # long polls cut short by the remove
                    n.start_soon(c.wait_process, f"x{i}", "e")
                await trio.sleep(0.1)
                for i in range(3):
                    await c.remove_container(f"x{i}")
            assert _fd_count() == before
            assert os.listdir(agent.run_dir) == []

    trio.run(main)


def test_readme_example_runs(busybox_rootfs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None
    base = os.path.join(tempfile.mkdtemp(prefix="kar-", dir="/tmp"), "new")  # the agent makes it
    try:
        source = code.group(1).replace("/tmp/ka", base).replace("/srv/busybox", str(busybox_rootfs))
        exec(compile(source, str(README), "exec"), {"__name__": "readme"})
    finally:
        import shutil

        shutil.rmtree(os.path.dirname(base), ignore_errors=True)
    assert capsys.readouterr().out.strip() == "b'hi\\n' 0"
