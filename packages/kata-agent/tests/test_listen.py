"""Listening addresses of the agent (no root needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import pytest
import trio

from kata_agent._listen import open_listener


def test_unix_listener_makes_its_directory_and_bad_addresses_fail() -> None:
    async def main() -> None:
        base = tempfile.mkdtemp(prefix="kal-", dir="/tmp")
        path = os.path.join(base, "sub", "a.sock")
        listener, cleanup = await open_listener(f"unix:{path}")
        assert cleanup == path and os.path.exists(path)  # noqa: ASYNC240
        await listener.aclose()
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
        os.rmdir(base)
        with pytest.raises(ValueError, match="neither"):
            await open_listener("tcp://0.0.0.0:1024")

    trio.run(main)


def test_vsock_listener_binds_any_cid() -> None:
    try:
        probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        probe.close()
    except OSError as err:
        pytest.skip(f"no AF_VSOCK here: {err}")

    async def main() -> None:
        listener, cleanup = await open_listener("vsock://41024")
        assert cleanup is None
        assert listener.socket.getsockname()[1] == 41024
        await listener.aclose()

    trio.run(main)


def test_python_dash_m_entry_points() -> None:
    for module in ("kata_agent", "kata_agent_client"):
        out = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=False
        )
        assert out.returncode == 0 and "usage:" in out.stdout
