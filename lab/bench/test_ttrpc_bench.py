"""ttrpc unary round trips over a unix socket: latency with 1 caller, throughput with 64.

Host side, no lab VM. The server runs in its own process (as containerd, the shim and the
agent do), the client here. Each benchmark round opens one connection and makes
`CALLS` calls (spread over the callers), so one round's time divided by `CALLS` is the
cost of a call; `extra_info` records that and calls per second.

    .nox/tests/bin/pytest lab/bench/test_ttrpc_bench.py --benchmark-only
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_ECHO = _ROOT / "packages" / "kata-proto" / "tests"
if str(_ECHO) not in sys.path:
    sys.path.insert(0, str(_ECHO))

from ttrpc_echo import (  # type: ignore[import-not-found]  # noqa: E402
    SERVICE,
    SERVICE_NAME,
    EchoRequest,
    EchoResponse,
    EchoService,
)

from kata_proto.ttrpc import TtrpcServer, open_ttrpc_client  # noqa: E402

CALLS = 2000
ROUNDS = 8


def _serve(path: str) -> None:
    server = TtrpcServer()
    server.register(SERVICE, EchoService())
    trio.run(server.serve_unix, path)


@pytest.fixture(scope="module")
def server_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ttrpc-bench-") as d:
        path = os.path.join(d, "echo.sock")
        proc = subprocess.Popen([sys.executable, __file__, path])
        try:
            deadline = time.monotonic() + 20
            while True:
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(path)
                        break
                    except OSError:
                        pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("benchmark ttrpc server did not start")
                time.sleep(0.05)
            yield path
        finally:
            proc.kill()
            proc.wait()


def _round(path: str, callers: int) -> None:
    request = EchoRequest(text="ping")
    per_caller = CALLS // callers

    async def caller(client: Any) -> None:
        for _ in range(per_caller):
            resp = await client.call(SERVICE_NAME, "Echo", request, EchoResponse)
            assert resp.text == "ping"

    async def main() -> None:
        async with open_ttrpc_client(path) as client, trio.open_nursery() as nursery:
            for _ in range(callers):
                nursery.start_soon(caller, client)

    trio.run(main)


@pytest.mark.parametrize("callers", [1, 64])
def test_unary_round_trip_over_unix_socket(benchmark: Any, server_path: str, callers: int) -> None:
    benchmark.group = "ttrpc unary echo, unix socket, server in another process"
    benchmark.extra_info["calls_per_round"] = CALLS
    benchmark.extra_info["callers"] = callers
    benchmark.pedantic(_round, args=(server_path, callers), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["median_us_per_call"] = round(median / CALLS * 1e6, 1)
    benchmark.extra_info["calls_per_second"] = round(CALLS / median)


if __name__ == "__main__":
    _serve(sys.argv[1])
