"""`kata-agent-ctl`: talk to an agent by hand (connect, check, version, run, exec, kill, wait, rm, ...)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal as _signal
import sys
import uuid

import trio

from kata_agent_client._client import AgentClient, open_agent_client
from kata_agent_client._errors import AgentCallError, AgentError
from kata_agent_client._logs import forward_logs
from kata_agent_client._types import ContainerSpec, Process


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kata-agent-ctl", description="Drive a Kata agent over ttrpc.")
    p.add_argument(
        "--addr", required=True, help="unix:PATH, hvsock:PATH[:PORT] (hybrid vsock) or vsock://CID:PORT"
    )
    p.add_argument("--ready-timeout", type=float, default=10.0, help="seconds to wait for the agent")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("connect", help="wait until the agent is ready and say how long it took")
    sub.add_parser("check", help="Health.Check")
    sub.add_parser("version", help="Health.Version")
    run = sub.add_parser("run", help="run a container from a rootfs directory, wait, remove it")
    run.add_argument("--id", default="", help="container id (default: random)")
    run.add_argument("-i", "--interactive", action="store_true", help="copy our stdin to the container")
    run.add_argument("--memory", type=int, default=0, help="memory limit in bytes")
    run.add_argument("--keep", action="store_true", help="leave the container running (do not wait/remove)")
    run.add_argument("rootfs")
    run.add_argument("args", nargs=argparse.REMAINDER)
    ex = sub.add_parser("exec", help="run a process in a running container and wait for it")
    ex.add_argument("--exec-id", default="")
    ex.add_argument("-i", "--interactive", action="store_true")
    ex.add_argument("id")
    ex.add_argument("args", nargs=argparse.REMAINDER)
    kill = sub.add_parser("kill", help="signal a process")
    kill.add_argument("--exec-id", default="")
    kill.add_argument("id")
    kill.add_argument("signal", nargs="?", default="TERM")
    wait = sub.add_parser("wait", help="wait for a process and print its status")
    wait.add_argument("--exec-id", default="")
    wait.add_argument("id")
    rm = sub.add_parser("rm", help="remove a container")
    rm.add_argument("id")
    for name, text in (("stats", "memory/CPU/pids of a container"), ("pause", "freeze"), ("resume", "thaw")):
        sub.add_parser(name, help=text).add_argument("id")
    sub.add_parser("logs", help="follow the agent's log stream (port 1025) as JSON lines")
    return p


def _signal_number(text: str) -> int:
    if text.isdigit():
        return int(text)
    name = text.upper()
    return int(_signal.Signals[name if name.startswith("SIG") else "SIG" + name])


async def _pump(client: AgentClient, cid: str, eid: str, interactive: bool) -> int:
    drained = [trio.Event(), trio.Event()]

    async def copy(stderr: bool) -> None:
        out = sys.stderr.buffer if stderr else sys.stdout.buffer
        read = client.read_stderr if stderr else client.read_stdout
        while chunk := await read(cid, eid):
            out.write(chunk)
            out.flush()
        drained[stderr].set()

    async def feed() -> None:
        stdin = trio.lowlevel.FdStream(os.dup(0))
        async with stdin:
            while data := await stdin.receive_some(65536):
                await client.write_stdin(cid, eid, data)
        await client.close_stdin(cid, eid)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(copy, False)
        nursery.start_soon(copy, True)
        if interactive:
            nursery.start_soon(feed)
        status = await client.wait_process(cid, eid)
        # stdout/stderr end on their own once every writer is gone; stdin does not.
        with trio.move_on_after(5):
            for event in drained:
                await event.wait()
        nursery.cancel_scope.cancel()
    return status


async def _main(args: argparse.Namespace) -> int:
    start = trio.current_time()
    async with open_agent_client(args.addr, ready_timeout=args.ready_timeout) as client:
        if args.command == "connect":
            print(f"ready after {trio.current_time() - start:.3f} s")
        elif args.command == "check":
            ok = await client.check()
            print("SERVING" if ok else "NOT_SERVING")
            return 0 if ok else 1
        elif args.command == "version":
            v = await client.version()
            print(f"agent {v.agent_version} ({v.grpc_version})")
        elif args.command == "run":
            cid = args.id or uuid.uuid4().hex[:12]
            argv = args.args[1:] if args.args[:1] == ["--"] else args.args
            spec = ContainerSpec(root=args.rootfs, process=Process(argv or ["sh"]))
            spec.memory_limit = args.memory
            await client.create_container(cid, spec)
            try:
                await client.start_container(cid)
                if args.keep:
                    print(cid)
                    return 0
                return await _pump(client, cid, "", args.interactive)
            finally:
                if not args.keep:
                    with trio.CancelScope(shield=True):
                        await client.remove_container(cid)
        elif args.command == "exec":
            eid = args.exec_id or uuid.uuid4().hex[:12]
            argv = args.args[1:] if args.args[:1] == ["--"] else args.args
            await client.exec_process(args.id, eid, Process(argv))
            return await _pump(client, args.id, eid, args.interactive)
        elif args.command == "kill":
            await client.signal_process(args.id, args.exec_id, _signal_number(args.signal))
        elif args.command == "wait":
            print(await client.wait_process(args.id, args.exec_id))
        elif args.command == "rm":
            await client.remove_container(args.id)
        elif args.command == "stats":
            stats = await client.stats_container(args.id)
            fields = {k: v for k, v in vars(stats).items() if k != "memory_stats"}
            print(" ".join(f"{k}={v}" for k, v in fields.items()))
        elif args.command == "pause":
            await client.pause_container(args.id)
        elif args.command == "resume":
            await client.resume_container(args.id)
        elif args.command == "logs":
            await forward_logs(args.addr, _stdout_logger())
    return 0


def _stdout_logger() -> logging.Logger:
    logger = logging.getLogger("kata_agent_client.ctl")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_JsonLine())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger


class _JsonLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(getattr(record, "agent", None) or {"msg": record.getMessage()})


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kata-agent-ctl`; a failure prints one line and exits 1 (2 for bad usage)."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        args.rootfs = os.path.abspath(args.rootfs)
    try:
        return trio.run(_main, args)
    except AgentCallError as err:  # "WaitProcess: NOT_FOUND: container 'x' not found"
        print(f"kata-agent-ctl: {err}", file=sys.stderr)
        return 1
    except (AgentError, OSError, KeyError) as err:
        print(f"kata-agent-ctl: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
