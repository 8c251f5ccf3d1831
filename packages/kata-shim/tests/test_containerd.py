"""The real shim driven by a real containerd 1.6 on the host (no VM): containerd runs `start`, calls
Create on the printed address, gets our configuration error as the Create failure that `ctr` prints,
then shuts the shim down; nothing is left behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "kata-proto" / "tests"))
from containerd_fixture import PrivateContainerd, private_containerd, skip_reason  # type: ignore[import-not-found]

from kata_shim.shim import socket_address
from kata_shim.shim._address import socket_path

pytestmark = [
    pytest.mark.containerd,
    pytest.mark.root,
    pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
]

SHIM = str(Path(sys.executable).parent / "containerd-shim-kata-v2")


@pytest.fixture
def env_containerd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[PrivateContainerd, Path]]:
    # containerd hands its environment to the shims it starts.
    monkeypatch.setenv("KATA_SHIM_STATE_ROOT", str(tmp_path / "run-kata"))
    monkeypatch.setenv("KATA_SHIM_SHARED_ROOT", str(tmp_path / "shared"))
    bad = tmp_path / "env-config.toml"
    bad.write_text('[hypervisor.dragonball]\nkernel = "/bin/sh"\n[runtime]\nhypervisor_name = "nosuchvmm"\n')
    monkeypatch.setenv("KATA_CONF_FILE", str(bad))
    with private_containerd() as ctrd:
        yield ctrd, tmp_path


def shim_processes(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if any(b"containerd-shim-kata-v2" in a for a in argv) and marker.encode() in b" ".join(argv):
                    pids.append(int(entry.name))
    return pids


def ctr_run(ctrd: PrivateContainerd, tmp: Path, id: str, *extra: str) -> subprocess.CompletedProcess[str]:
    rootfs = tmp / f"rootfs-{id}"
    rootfs.mkdir()
    argv = [*ctrd.ctr(), "run", "--rm", *extra, "--rootfs", "--runtime", SHIM, str(rootfs), id, "true"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    print(f"ctr run {id}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def assert_nothing_left(ctrd: PrivateContainerd, tmp: Path, id: str) -> None:
    end = time.monotonic() + 15
    while shim_processes(str(ctrd.base)) and time.monotonic() < end:
        time.sleep(0.1)
    assert shim_processes(str(ctrd.base)) == []
    assert not os.path.exists(socket_path(socket_address(ctrd.address, "default", id)))
    assert not (tmp / "run-kata" / id).exists()


def test_ctr_run_shows_the_config_error_from_kata_conf_file(
    env_containerd: tuple[PrivateContainerd, Path],
) -> None:
    ctrd, tmp = env_containerd
    result = ctr_run(ctrd, tmp, "k1")
    assert result.returncode != 0
    assert (
        f"{tmp / 'env-config.toml'}: runtime.hypervisor_name: unknown hypervisor 'nosuchvmm'" in result.stderr
    ), result.stderr + ctrd.log()
    assert "Traceback" not in result.stderr
    assert_nothing_left(ctrd, tmp, "k1")
    # The shim logged through the bundle's log fifo, which containerd copies into its own log.
    assert "shim k1 serving unix:///run/containerd/s/" in ctrd.log()
    assert "WARNING kata_shim.service: Create failed: " in ctrd.log()


def test_kata_conf_file_wins_over_the_config_path_option(
    env_containerd: tuple[PrivateContainerd, Path],
) -> None:
    # upstream runtime-rs (runtimes/src/manager.rs load_config) reads KATA_CONF_FILE before the option
    ctrd, tmp = env_containerd
    config = tmp / "option-config.toml"
    config.write_text(f'[hypervisor.dragonball]\nkernel = "{tmp}/no-such-vmlinuz"\n')
    result = ctr_run(ctrd, tmp, "k2", "--runtime-config-path", str(config))
    assert result.returncode != 0
    expected = f"{tmp / 'env-config.toml'}: runtime.hypervisor_name: unknown hypervisor 'nosuchvmm'"
    assert expected in result.stderr, result.stderr + ctrd.log()
    assert_nothing_left(ctrd, tmp, "k2")


def test_runtime_config_path_option_names_the_missing_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KATA_SHIM_STATE_ROOT", str(tmp_path / "run-kata"))
    monkeypatch.setenv("KATA_SHIM_SHARED_ROOT", str(tmp_path / "shared"))
    monkeypatch.delenv("KATA_CONF_FILE", raising=False)
    config = tmp_path / "option-config.toml"
    config.write_text(f'[hypervisor.dragonball]\nkernel = "{tmp_path}/no-such-vmlinuz"\n')
    with private_containerd() as ctrd:
        result = ctr_run(ctrd, tmp_path, "k3", "--runtime-config-path", str(config))
        assert result.returncode != 0
        expected = f"{config}: hypervisor.dragonball.kernel: {tmp_path}/no-such-vmlinuz does not exist"
        assert expected in result.stderr, result.stderr + ctrd.log()
        assert_nothing_left(ctrd, tmp_path, "k3")
