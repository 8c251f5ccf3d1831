"""`[hypervisor.clh]` and `[hypervisor.firecracker]` load with upstream's key names (the keys the back-ends
read fill `HypervisorConfig`; upstream-only keys such as firecracker's `jailer_path` are kept as unused),
select the back-ends, and map upstream's default block drivers to what each serves (clh: virtio-blk-pci,
firecracker: virtio-mmio)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kata_shim.config import load_config_file
from kata_shim.hypervisor import hypervisor_factory
from kata_shim.hypervisor._clh import CloudHypervisor
from kata_shim.hypervisor._firecracker import Firecracker


def _write(tmp_path: Path, name: str, table: str) -> Path:
    for asset in ("vmlinux", "rootfs.img"):
        (tmp_path / asset).write_bytes(b"\0")
    path = tmp_path / "configuration.toml"
    path.write_text(
        f"""
[hypervisor.{name}]
path = "/usr/bin/{name}"
kernel = "{tmp_path / "vmlinux"}"
image = "{tmp_path / "rootfs.img"}"
kernel_params = "root=/dev/vda1"
default_vcpus = 1
default_maxvcpus = 4
default_memory = 2048
{table}

[agent.kata]

[runtime]
name = "virt_container"
hypervisor_name = "{name}"
"""
    )
    return path


@pytest.mark.parametrize(
    ("name", "table", "cls", "driver"),
    [
        (
            "clh",
            'shared_fs = "virtio-fs"\nvirtio_fs_daemon = "/usr/libexec/virtiofsd"\n'
            'virtio_fs_cache = "never"\nblock_device_driver = "virtio-blk"\nvirtio_fs_cache_size = 0',
            CloudHypervisor,
            "virtio-blk-pci",
        ),
        (
            "firecracker",
            'shared_fs = "none"\nblock_device_driver = "virtio-blk"\njailer_path = "/usr/bin/jailer"',
            Firecracker,
            "virtio-mmio",
        ),
    ],
)
def test_tables_load_and_select_the_back_end(
    tmp_path: Path, name: str, table: str, cls: type, driver: str
) -> None:
    config = load_config_file(_write(tmp_path, name, table))
    assert config.runtime.hypervisor_name == name
    assert hypervisor_factory(name) is cls
    hv = config.hypervisor
    assert (hv.path, hv.default_maxvcpus, hv.default_memory) == (f"/usr/bin/{name}", 4, 2048)
    assert hv.block_device_driver == driver
    if name == "clh":
        assert (hv.shared_fs, hv.virtio_fs_daemon, hv.virtio_fs_cache) == (
            "virtio-fs",
            "/usr/libexec/virtiofsd",
            "never",
        )
        assert "hypervisor.clh.virtio_fs_cache_size" in config.unused_keys
    else:
        assert hv.shared_fs == "none"
        assert "hypervisor.firecracker.jailer_path" in config.unused_keys
