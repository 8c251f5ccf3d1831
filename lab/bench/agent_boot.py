"""Boot-to-agent-ready of the sandbox guest on kata-vmm, container Create+Start time, the agent's RSS.

Run inside the lab VM:
    lab/labvm exec -- .nox/tests/bin/python lab/bench/agent_boot.py [--boots 5]

Each boot: `kata-vmm run` with the sandbox recipe (lab/framework/sandbox.py), then kata-agent-client dials
hybrid vsock port 1024 until Health.Check answers SERVING; "ready" is the time from spawning the VMM to that
answer. On every boot: CreateSandbox with the virtio-fs share, CreateContainer+StartContainer of a busybox
`true`, its exit, and GetMetrics (the agent's own resident memory). Prints medians; no absolute gate.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

LAB = Path(__file__).resolve().parents[1]
if str(LAB) not in sys.path:
    sys.path.insert(0, str(LAB))

from framework.sandbox import (  # noqa: E402
    SANDBOX_CMDLINE,
    SHARE_TAG,
    make_busybox_rootfs,
    spawn_sandbox,
    wait_for_socket,
)

from kata_agent_client import AgentClient, ContainerSpec, Mount, Process, Storage, open_agent_client  # noqa: E402

SHARED_MOUNT = "/run/kata-containers/shared/containers"


def agent_rss(metrics: str) -> int:
    match = re.search(r"^kata_agent_process_resident_memory_bytes (\d+)", metrics, re.MULTILINE)
    return int(match.group(1)) if match else -1


async def guest_output(agent: AgentClient, cid: str, script: str) -> str:
    """Run ``script`` in a busybox container that sees the guest's /run at /guest-run; its stdout."""
    spec = ContainerSpec(root=f"{SHARED_MOUNT}/bb/rootfs", process=Process(["sh", "-c", script]))
    spec.mounts.append(Mount("/guest-run", "bind", "/run", ["rbind", "ro"]))
    await agent.create_container(cid, spec)
    await agent.start_container(cid)
    out = await agent.read_all(cid)
    await agent.wait_process(cid)
    await agent.remove_container(cid)
    return out.decode()


async def trace(agent: AgentClient, ready_host: float) -> None:
    """Print the guest's boot marks (uptime at each step) and the agent's slowest imports."""
    t0 = time.monotonic()
    marks = await guest_output(agent, "trace", "cat /proc/uptime /guest-run/kata-boot.log")
    lag = time.monotonic() - t0
    lines = marks.splitlines()
    uptime_now = float(lines[0].split()[0])
    print(f"  guest uptime at SERVING ~ {uptime_now - lag:.2f} s (host: {ready_host:.2f} s after spawn)")
    for line in lines[1:]:
        print(f"  {line}")
    imports = await guest_output(agent, "imports", "grep '^import time:' /guest-run/kata-agent.log || true")
    rows = []
    for line in imports.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    if rows:
        print("  slowest imports (cumulative us):")
        for cumulative, name in sorted(rows, reverse=True)[:25]:
            print(f"    {cumulative:>9} {name}")


async def one_boot(
    workdir: Path, index: int, cmdline: str, do_trace: bool, kernel: Path | None
) -> dict[str, float]:
    sandbox = spawn_sandbox(workdir, name=f"boot{index}", cmdline=cmdline, kernel=kernel)
    try:
        make_busybox_rootfs(sandbox.share / "bb" / "rootfs")
        await trio.to_thread.run_sync(wait_for_socket, sandbox.uds)
        async with open_agent_client(sandbox.agent_address, ready_timeout=600, retry_interval=0.1) as agent:
            ready = time.monotonic() - sandbox.started_at
            await agent.create_sandbox(
                f"bench{index}",
                storages=[Storage("virtio-fs", SHARED_MOUNT, source=SHARE_TAG, fstype="virtiofs")],
            )
            spec = ContainerSpec(root=f"{SHARED_MOUNT}/bb/rootfs", process=Process(["true"]))
            t0 = time.monotonic()
            await agent.create_container("c", spec)
            t1 = time.monotonic()
            await agent.start_container("c")
            t2 = time.monotonic()
            status = await agent.wait_process("c")
            await agent.remove_container("c")
            rss = agent_rss(await agent.get_metrics())
            if do_trace:
                await trace(agent, ready)
            await agent.destroy_sandbox()
        if status != 0:
            raise RuntimeError(f"`true` exited {status}")
        return {"ready": ready, "create": t1 - t0, "start": t2 - t1, "rss": rss}
    except BaseException:
        print(sandbox.vm.console[-3000:], file=sys.stderr)
        raise
    finally:
        sandbox.vm.kill()


async def bench(boots: int, cmdline: str, do_trace: bool, kernel: Path | None) -> None:
    with tempfile.TemporaryDirectory(prefix="agent-boot-", dir="/tmp") as tmp:
        rows = []
        for i in range(boots):
            row = await one_boot(Path(tmp), i, cmdline, do_trace, kernel)
            rows.append(row)
            print(
                f"boot {i}: agent ready {row['ready']:.2f} s, create {row['create'] * 1e3:.0f} ms, "
                f"start {row['start'] * 1e3:.0f} ms, agent RSS {row['rss'] / (1 << 20):.1f} MiB",
                flush=True,
            )

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"--- kata-vmm sandbox guest, {boots} boots (medians) ---")
    print(
        f"VM start -> Health.Check SERVING : {med('ready'):.2f} s  (all: "
        + ", ".join(f"{r['ready']:.2f}" for r in rows)
        + ")"
    )
    print(
        f"CreateContainer + StartContainer : {(med('create') + med('start')) * 1e3:.0f} ms "
        f"(create {med('create') * 1e3:.0f} ms, start {med('start') * 1e3:.0f} ms)"
    )
    print(f"agent RSS after one container    : {med('rss') / (1 << 20):.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--boots", type=int, default=5)
    parser.add_argument("--cmdline", default=SANDBOX_CMDLINE, help="guest kernel command line")
    parser.add_argument(
        "--trace", action="store_true", help="print the guest's boot marks and the agent's slowest imports"
    )
    parser.add_argument("--kernel", type=Path, help="boot this kernel instead of build/lab/guest/vmlinuz")
    args = parser.parse_args()
    cmdline = args.cmdline + (" kata.importtime" if args.trace else "")
    print(f"cmdline: {cmdline}")
    trio.run(bench, args.boots, cmdline, args.trace, args.kernel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
