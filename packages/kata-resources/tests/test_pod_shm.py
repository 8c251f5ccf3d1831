"""The pod's /dev/shm size and storage."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kata_resources import (
    DEFAULT_SHM_SIZE,
    GUEST_SANDBOX_SHM,
    pod_shm_mount,
    pod_shm_size,
    pod_shm_storage,
)


def test_size_from_a_tmpfs_mount_option() -> None:
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc"},
        {"destination": "/dev/shm", "type": "tmpfs", "options": ["nosuid", "size=128m"]},
    ]
    assert pod_shm_size(mounts) == 128 << 20
    assert pod_shm_size([{"destination": "/dev/shm", "type": "tmpfs", "options": ["size=4096"]}]) == 4096


def test_default_when_nothing_states_a_size() -> None:
    assert pod_shm_size([]) == DEFAULT_SHM_SIZE
    assert (
        pod_shm_size([{"destination": "/dev/shm", "type": "tmpfs", "options": ["size=50%"]}])
        == DEFAULT_SHM_SIZE
    )
    missing = {"destination": "/dev/shm", "type": "bind", "source": "/nonexistent/shm", "options": ["rbind"]}
    assert pod_shm_size([missing]) == DEFAULT_SHM_SIZE


@pytest.mark.root
def test_size_of_a_bound_host_tmpfs(scratch: Path) -> None:
    """containerd's sandbox shm: a host tmpfs bound on /dev/shm; its statfs size is the pod's."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mount)")
    shm = scratch / "shm"
    shm.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "shm", str(shm)], check=True)
    try:
        mount = {"destination": "/dev/shm", "type": "bind", "source": str(shm), "options": ["rbind", "ro"]}
        assert pod_shm_size([mount]) == 32 << 20
    finally:
        subprocess.run(["umount", str(shm)], check=True)


def test_storage_and_container_mount() -> None:
    storage = pod_shm_storage(128 << 20)
    assert (storage.driver, storage.source, storage.fstype) == ("ephemeral", "shm", "tmpfs")
    assert storage.mount_point == GUEST_SANDBOX_SHM
    assert f"size={128 << 20}" in storage.options and "mode=1777" in storage.options
    assert pod_shm_mount() == {
        "destination": "/dev/shm",
        "type": "bind",
        "source": GUEST_SANDBOX_SHM,
        "options": ["rbind"],
    }
