"""`kata-agent`: the in-guest agent's command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import trio

from kata_agent._agent import open_agent
from kata_agent._listen import AGENT_VSOCK_PORT, LOG_VSOCK_PORT
from kata_agent._logs import LOG_LEVELS, JsonFormatter, agent_loggers, log_level_from_cmdline
from kata_agent._passfd import passfd_port_from_cmdline
from kata_agent._runtime import preload_runtime
from kata_agent._service import AgentConfig
from kata_proto.agent import LOG_CMDLINE_PARAM, PASSFD_CMDLINE_PARAM


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kata-agent", description="The Kata agent (grpc.AgentService over ttrpc)."
    )
    p.add_argument("--listen", default=f"vsock://{AGENT_VSOCK_PORT}", help="vsock://PORT or unix:PATH")
    p.add_argument(
        "--log-listen", default=f"vsock://{LOG_VSOCK_PORT}", help="vsock://PORT, unix:PATH or none"
    )
    p.add_argument("--runtime", default="/usr/bin/crun", help="OCI runtime binary (crun, runc)")
    p.add_argument("--runtime-root", default=None, help="the runtime's --root state directory")
    p.add_argument("--run-dir", default="/run/kata-containers", help="where container bundles go")
    p.add_argument(
        "--passfd-port",
        type=int,
        default=None,
        help=f"vsock port of the passfd stdio listener (0 = off; default: {PASSFD_CMDLINE_PARAM}=N "
        "in /proc/cmdline)",
    )
    p.add_argument(
        "--log-level",
        default=None,
        help=f"debug, info, warning, error (default: {LOG_CMDLINE_PARAM}=LEVEL in /proc/cmdline, else info)",
    )
    return p


async def _serve(args: argparse.Namespace) -> None:
    config = AgentConfig(
        runtime=args.runtime,
        runtime_root=args.runtime_root,
        run_dir=args.run_dir,
        passfd_port=args.passfd_port,
    )
    log_listen = None if args.log_listen == "none" else args.log_listen
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_agent(args.listen, config, log_listen=log_listen):
            async for _ in signals:
                break


def main(argv: list[str] | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT."""
    args = _parser().parse_args(argv)
    try:
        with open("/proc/cmdline") as f:
            cmdline = f.read()
    except OSError:
        cmdline = ""
    if args.passfd_port is None:
        args.passfd_port = passfd_port_from_cmdline(cmdline)
    level = (args.log_level or log_level_from_cmdline(cmdline)).upper()
    if level not in LOG_LEVELS:
        print(f"kata-agent: unknown log level {level.lower()!r}, using info", file=sys.stderr)
        level = "INFO"
    level = LOG_LEVELS[level]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for logger in agent_loggers():
        logger.setLevel(level)
        logger.addHandler(handler)
    took = preload_runtime(args.runtime)
    log = logging.getLogger("kata_agent")
    if took is None:
        log.warning("runtime %s did not run (--version)", args.runtime)
    else:
        log.debug("runtime %s preloaded in %.2f s", args.runtime, took)
    try:
        trio.run(_serve, args)
    except OSError as err:
        print(f"kata-agent: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
